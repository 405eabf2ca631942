"""Generation in tiers (as mlx-lm): `sample` → `generate_step` → `stream` → `generate`, and
the Pixtral runner (a thin facade) over the prompt cache (promptcache.py); ChatSession is in
session.py. A prompt runs through the decoder in chunks of what the plan reserves
activations for; every decode step runs inside the runner's thread policy
(`threads.step()`).
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .checkpoint import Checkpoint, tokenizer_path
from .config import DEFAULT_CONTEXT, PixtralArgs
from .errors import ContextOverflow, NonFiniteLogits, PixlocalError
from .fastdecode import FastDecode
from .host import available_ram
from .kernels.backend import is_gpu, synchronize
from .kernels.threads import ThreadPolicy
from .loader import Loaded
from .loader import load as load_weights
from .memory import kv_bytes_per_layer, prefill_chunk
from .model import KVCache, PixtralModel
from .placement import GpuLayers, Plan
from .prompt import Encoded, PromptEncoder, StreamDecoder
from .promptcache import PromptCache, keys_of

Sampler = Callable[[torch.Tensor], int]


@dataclass(frozen=True)
class Step:
    """One generated token and the text it completes (text may be "" mid-character)."""
    text: str
    token: int
    index: int  # 0-based count of generated tokens
    prompt_tokens: int  # tokens in the whole prompt
    prefilled_tokens: int  # of those, how many were computed (the rest came from the cache)
    prefill_s: float  # time to first token, including image encoding
    elapsed_s: float  # since the request started
    finish_reason: str | None = None  # "stop" (EOS), "length" (max_tokens) on the last step

    @property
    def gen_tps(self) -> float:
        t = self.elapsed_s - self.prefill_s
        return self.index / t if t > 0 and self.index else 0.0

    @property
    def prompt_tps(self) -> float:
        return self.prefilled_tokens / self.prefill_s if self.prefill_s > 0 else 0.0


# ---- tier 1: sampling --------------------------------------------------------------------

def sample(logits: torch.Tensor, temperature: float, top_p: float, top_k: int,
           generator: torch.Generator | None) -> int:
    """logits (V,) fp32 -> token id. temperature 0 is greedy (argmax). NonFiniteLogits
    where the logits hold NaN or +inf (corrupt weights): argmax picks such a value, so
    greedy checks only the chosen one."""
    if temperature <= 0:
        tok = int(torch.argmax(logits))
        if not float(logits[tok]) < math.inf:
            raise NonFiniteLogits()
        return tok
    if not bool((logits < math.inf).all()):  # False for NaN and +inf (-inf bans a token)
        raise NonFiniteLogits()
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_k > 0:
        kth = torch.topk(probs, min(top_k, probs.numel())).values[-1]
        probs = torch.where(probs >= kth, probs, 0.0)
    if top_p < 1.0:
        sorted_p, idx = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_p, 0) - sorted_p < top_p  # always keeps the top token
        probs = torch.zeros_like(probs).scatter_(0, idx[keep], sorted_p[keep])
    return int(torch.multinomial(probs / probs.sum(), 1, generator=generator))


def make_sampler(temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                 seed: int | None = None) -> Sampler:
    """logits → token with these settings; unseeded sampling draws a seed from the OS."""
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    if temperature > 0 and gen is None:
        gen = torch.Generator().manual_seed(int.from_bytes(np.random.bytes(8), "little") >> 1)
    return lambda logits: sample(logits.float().cpu(), temperature, top_p, top_k, gen)


# ---- tier 2: the decode loop -------------------------------------------------------------

def generate_step(runner: Pixtral, logits: torch.Tensor, sampler: Sampler) -> Iterator[int]:
    """Tokens sampled from `logits` (a prefill's, runner.prefill) and then from each sampled
    token run through the runner's cache in turn. A token is run only when the next one is
    asked for: the last token a caller takes is left for a next request to compute."""
    while True:
        tok = sampler(logits)
        yield tok
        logits = runner.decode(tok)


# ---- tier 3 and 4: text ------------------------------------------------------------------

def stream(runner: Pixtral, enc: Encoded, *, max_tokens: int, temperature: float = 0.0,
           top_p: float = 1.0, top_k: int = 0, seed: int | None = None) -> Iterator[Step]:
    """Generate from encoded tokens + images, reusing and keeping the runner's cache."""
    runner.check_context(len(enc.tokens), max_tokens)
    t0 = time.perf_counter()
    sampler = make_sampler(temperature, top_p, top_k, seed)
    if max_tokens == 0:
        return
    logits, computed = runner._prefill(enc)
    runner.synchronize()  # GPU work is asynchronous: the clock waits for it
    prefill_s = time.perf_counter() - t0
    detok = StreamDecoder(runner.encoder)
    eos, n = runner.encoder.eos_id, len(enc.tokens)
    tokens = generate_step(runner, logits, sampler)
    for i, tok in enumerate(itertools.islice(tokens, max_tokens)):
        if tok == eos:
            yield Step(detok.flush(), tok, i, n, computed, prefill_s,
                       time.perf_counter() - t0, "stop")
            return
        last = i == max_tokens - 1
        text = detok.add(tok) + (detok.flush() if last else "")
        yield Step(text, tok, i, n, computed, prefill_s, time.perf_counter() - t0,
                   "length" if last else None)


def generate(runner: Pixtral, enc: Encoded, **kw: Any) -> str:
    return "".join(s.text for s in stream(runner, enc, **kw))


# ---- the runner --------------------------------------------------------------------------

class Pixtral:
    """A loaded model with its tokenizer and prompt cache: `pixlocal.load(path)` returns one.
    `context_len` (from the plan) bounds every request, with the model's own max_seq_len."""

    def __init__(self, loaded: Loaded, encoder: PromptEncoder, path: Path,
                 threads: ThreadPolicy | None = None):
        self.model: PixtralModel = loaded.model
        self.encoder, self.path = encoder, path
        self.threads = threads or ThreadPolicy()  # CPU threads per step (kernels/threads.py)
        self.checkpoint: Checkpoint = loaded.checkpoint
        self.plan: Plan = loaded.plan
        self.args: PixtralArgs = loaded.model.args
        self.dtype: torch.dtype = loaded.dtype
        self.device = loaded.devices["embeddings"]  # where token ids go
        self.vision_device = loaded.devices.get("vision", self.device)
        self.context_len = loaded.plan.context_len
        self.fast_decode: FastDecode | None = loaded.fast_decode
        self.layer_devices = [loaded.devices[f"layers.{i}"] for i in range(self.args.n_layers)]
        self.cache = PromptCache(self.args, self.dtype, self.layer_devices, self.context_limit)
        # tokens per decoder call in prefill: what the plan reserves activations for
        self.prefill_chunk = prefill_chunk(self.context_len, loaded.plan.image_patches)
        self.images_encoded = 0  # images run through the vision encoder (for tests and stats)

    @property
    def context_limit(self) -> int:
        """Most tokens (prompt + answer) a request may hold."""
        return min(self.args.max_seq_len, self.context_len)

    # ---- one-shot API ------------------------------------------------------------------
    def encode(self, messages: list[dict[str, Any]]) -> Encoded:
        return self.encoder.encode(messages)

    def _image_tensors(self, images: list[np.ndarray]) -> list[torch.Tensor]:
        if images and self.args.vision_encoder is None:
            raise PixlocalError(f"{self.path}: this model has no vision encoder; it cannot "
                                "take images")
        dev, dt = self.vision_device, self.dtype
        return [torch.from_numpy(np.asarray(a, dtype=np.float32)).to(dev, dt) for a in images]

    @torch.inference_mode()
    def vision_features(self, images: list[np.ndarray]) -> torch.Tensor:
        """Vision encoder output before the adapter: (ΣN, vision dim) fp32."""
        return self.model.vision_encoder(self._image_tensors(images)).float()

    @torch.inference_mode()
    def image_features(self, images: list[np.ndarray]) -> torch.Tensor:
        """Rows spliced in at the [IMG] positions: (ΣN, dim) fp32. The encoder takes one
        image at a time (its activations are planned for the largest image, not for all)."""
        self.images_encoded += len(images)
        if not images:
            return torch.empty(0, self.args.dim)
        return torch.cat([self.model.image_features(self._image_tensors([a])).float()
                          for a in images])

    @torch.inference_mode()
    def logits(self, tokens: list[int], images: list[np.ndarray]) -> torch.Tensor:
        """Every position's logits of one causal forward from position 0, the prompt cache
        untouched: (len(tokens), vocab) fp32, on the CPU when the head is on a GPU (each
        chunk's logits are copied out as they are made)."""
        self.check_context(len(tokens), 0)
        kv = KVCache(self.args.n_layers, self.args.n_kv_heads, self.args.head_dim,
                     len(tokens), self.dtype, self.layer_devices)
        out = torch.empty(len(tokens), self.args.vocab_size)
        self._chunks(tokens, images, 0, kv, out)
        return out

    def _chunks(self, tokens: list[int], images: list[np.ndarray], start: int, kv: KVCache,
                out: torch.Tensor | None = None) -> torch.Tensor:
        """Run tokens[start:] (positions start..) through the decoder into `kv`, at most
        `prefill_chunk` tokens per call, each image encoded when its first row is needed
        (`images`: those with an [IMG] at or after start). The last position's logits (V,);
        with `out` (len(tokens), V), every position's logits from `start` on as well."""
        pending = iter(images)
        rows: list[torch.Tensor] = []  # encoded rows not yet spliced in, in order
        img_id = self.encoder.img_id

        def take(n: int) -> torch.Tensor | None:
            got, have = [], 0
            while have < n:
                if not rows:
                    rows.append(self.image_features([next(pending)]).to(self.device))
                r = rows.pop(0)
                if have + r.shape[0] > n:
                    r, rest = r[: n - have], r[n - have :]
                    rows.insert(0, rest)
                got.append(r)
                have += r.shape[0]
            return torch.cat(got) if got else None

        ids = torch.tensor(tokens, device=self.device)
        logits = torch.empty(0)
        for a in range(start, len(tokens), self.prefill_chunk):
            t = ids[a : a + self.prefill_chunk]
            h = self.model.embed(t, take(int((t == img_id).sum())))
            logits = self.model(h, a, kv, logits_from=0 if out is not None else len(t) - 1)
            if out is not None:
                out[a : a + len(t)].copy_(logits)
        return logits[-1]

    # ---- the cache -----------------------------------------------------------------------
    def check_context(self, n_prompt: int, max_tokens: int) -> None:
        """ContextOverflow unless n_prompt + max_tokens fit the context and the RAM."""
        if max_tokens < 0:
            raise PixlocalError(f"max_tokens must be >= 0, got {max_tokens}")
        limit = self.context_limit
        if n_prompt + max_tokens > limit:
            raise ContextOverflow(f"prompt ({n_prompt} tokens) + max_tokens ({max_tokens}) "
                                  f"exceeds the context window of {limit} tokens")
        # The CPU cache grows on demand; a request whose cache cannot fit in the RAM still free
        # is refused here, up front, instead of the OS killing the process mid-answer.
        tokens = n_prompt + max_tokens
        kv = self.cache.kv
        if kv is not None and tokens <= kv.capacity:
            return  # allocated already
        layers = sum(not is_gpu(d) for d in self.layer_devices)
        need = kv_bytes_per_layer(self.args, tokens, self.dtype.itemsize) * layers
        free = available_ram() if need else None
        if free is not None and need > free:
            raise ContextOverflow(f"{self.path}: a KV cache for {tokens} tokens needs "
                                  f"{need / 2**30:.1f} GiB of RAM but {free / 2**30:.1f} GiB "
                                  "is available; lower max_tokens or shorten the prompt")

    def reset(self) -> None:
        """Forget the cached prefix (the cache memory stays allocated)."""
        self.cache.reset()

    @torch.inference_mode()
    def _prefill(self, enc: Encoded) -> tuple[torch.Tensor, int]:
        """Run the uncached suffix of enc; returns (last logits (V,), tokens computed)."""
        keys = keys_of(enc, self.encoder.img_id, self.encoder.img_break_id)
        keep = self.cache.reusable(keys)
        # images whose first [IMG] lies before `keep` are cached; the others need encoding
        cached = sum(1 for k in keys[:keep] if isinstance(k, tuple) and k[1] == 0)
        kv = self.cache.ensure(len(keys))
        self.threads.use()
        self.cache.keys = keys[:keep]
        logits = self._chunks(enc.tokens, enc.images[cached:], keep, kv)
        self.cache.keys = keys
        return logits, len(keys) - keep

    def synchronize(self) -> None:
        """Wait for the work queued on any GPU of the plan (timings read the clock after)."""
        synchronize({self.device, self.vision_device, *self.layer_devices})

    @torch.inference_mode()
    def _decode_one(self, token: int) -> torch.Tensor:
        pos = len(self.cache)
        kv = self.cache.ensure(pos + 1)
        with self.threads.step():
            h = self.model.embed(torch.tensor([token], device=self.device), None)
            out = None if self.fast_decode is None else self.fast_decode(h, pos, kv)
            logits = (self.model(h, pos, kv) if out is None else self.model.head(out))[-1]
        self.cache.keys.append(token)
        return logits

    def prefill(self, enc: Encoded) -> torch.Tensor:
        """Run the prompt through the model (reusing the cached prefix): its last logits (V,).
        For benchmarks and custom decoding loops (generate_step); stream() is the usual
        entry point."""
        self.check_context(len(enc.tokens), 0)
        return self._prefill(enc)[0]

    def decode(self, token: int) -> torch.Tensor:
        """Append one token at the end of the cached sequence: its logits (V,)."""
        self.check_context(len(self.cache) + 1, 0)
        return self._decode_one(token)

    # ---- generation (the tiers above) ----------------------------------------------------
    def stream_encoded(self, enc: Encoded, **kw: Any) -> Iterator[Step]:
        """Generate from already-encoded tokens + images (`stream`'s keywords)."""
        return stream(self, enc, **kw)

    def stream(self, messages: list[dict[str, Any]], **kw: Any) -> Iterator[Step]:
        """Answer a conversation, token by token (max_tokens, temperature, top_p, top_k,
        seed)."""
        return stream(self, self.encode(messages), **kw)

    def generate(self, messages: list[dict[str, Any]], **kw: Any) -> str:
        return generate(self, self.encode(messages), **kw)


def load(path: str | Path, device: str = "auto", dtype: str = "auto",
         max_image_size: int | None = None, gpu_layers: GpuLayers = "auto",
         max_vram: int | None = None, context_len: int = DEFAULT_CONTEXT,
         threads: int | None = None) -> Pixtral:
    """Load a model directory (Mistral or Hugging Face format) for generation.

    device "auto" picks CUDA when present. The loader (loader.load) plans what goes where:
    on CUDA `gpu_layers` decoder layers ("auto": as many as fit, PixlocalError if an
    explicit count cannot), `max_vram` bytes at most, a KV cache for `context_len` tokens;
    prompt + answer longer than `context_len` raise ContextOverflow on any device. `threads`
    fixes the CPU thread count (else $PIXLOCAL_THREADS, else chosen per decode step from
    the usable cores: kernels/threads.py)."""
    policy = ThreadPolicy(threads)  # ConfigError for a bad $PIXLOCAL_THREADS, before any work
    policy.use()
    loaded = load_weights(path, device, dtype, context_len=context_len, gpu_layers=gpu_layers,
                          max_vram=max_vram, max_image_size=max_image_size)
    p = Path(path).expanduser()
    encoder = PromptEncoder(tokenizer_path(p, loaded.checkpoint.kind),
                            max_image_size=max_image_size)
    return Pixtral(loaded, encoder, p, policy)
