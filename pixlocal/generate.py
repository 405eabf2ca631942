"""Generation: the Pixtral runner (load, encode, logits, stream), sampling, ChatSession.

The runner owns one KV cache and the token "keys" it holds. A new request is prefilled
only from the first position where it differs from what the cache holds, so a chat turn
costs its new tokens only. Keys compare text ids by id and image positions by (image
content digest, patch index): two different images of one size give the same [IMG] ids.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .checkpoint import Checkpoint, tokenizer_path
from .config import DEFAULT_CONTEXT, PixtralArgs
from .errors import ContextOverflow, PixlocalError
from .kernels.threads import ThreadPolicy
from .loader import load_model, parse_device, parse_dtype, prepare_quantized
from .model import KVCache, PixtralModel
from .placement import (
    GpuLayers,
    Plan,
    apply,
    checkpoint_bytes,
    free_vram,
    image_tokens,
    kv_bytes_per_layer,
    module_device,
    plan,
)
from .prompt import Encoded, PromptEncoder, StreamDecoder

Key = int | tuple[bytes, int]


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


def sample(logits: torch.Tensor, temperature: float, top_p: float, top_k: int,
           generator: torch.Generator | None) -> int:
    """logits (V,) fp32 -> token id. temperature 0 is greedy (argmax)."""
    if temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_k > 0:
        kth = torch.topk(probs, min(top_k, probs.numel())).values[-1]
        probs = torch.where(probs >= kth, probs, 0.0)
    if top_p < 1.0:
        sorted_p, idx = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_p, 0) - sorted_p < top_p  # always keeps the top token
        probs = torch.zeros_like(probs).scatter_(0, idx[keep], sorted_p[keep])
    return int(torch.multinomial(probs / probs.sum(), 1, generator=generator))


def _digest(a: np.ndarray) -> bytes:
    return hashlib.blake2b(np.ascontiguousarray(a).tobytes(), digest_size=16).digest() + \
        str(a.shape).encode()


class Pixtral:
    """A loaded model with its tokenizer: `pixlocal.load(path)` returns one."""

    def __init__(self, model: PixtralModel, encoder: PromptEncoder, path: Path,
                 checkpoint: Checkpoint | None = None, threads: ThreadPolicy | None = None):
        self.model, self.encoder, self.path = model, encoder, path
        self.threads = threads or ThreadPolicy()  # CPU threads per step (kernels/threads.py)
        self.checkpoint = checkpoint
        self.args: PixtralArgs = model.args
        self.dtype: torch.dtype = getattr(model, "compute_dtype", next(model.parameters()).dtype)
        self.device = module_device(model.tok_embeddings)  # where token ids go
        self.vision_device = (module_device(model.vision_encoder)
                              if model.args.vision_encoder is not None else self.device)
        self.context_len = model.args.max_seq_len  # load() lowers it to the memory plan's
        self.plan: Plan | None = None
        self._cache: KVCache | None = None
        self._keys: list[Key] = []  # what positions 0..len-1 of the cache hold
        self.images_encoded = 0  # images run through the vision encoder (for tests and stats)

    # ---- one-shot API ------------------------------------------------------------------
    def encode(self, messages: list[dict[str, Any]]) -> Encoded:
        return self.encoder.encode(messages)

    def _image_tensors(self, images: list[np.ndarray]) -> list[torch.Tensor]:
        if images and self.args.vision_encoder is None:
            raise PixlocalError(f"{self.path}: this model has no vision encoder; it cannot "
                                "take images")
        return [torch.from_numpy(np.asarray(a, dtype=np.float32)).to(self.vision_device,
                                                                      self.dtype)
                for a in images]

    @torch.inference_mode()
    def vision_features(self, images: list[np.ndarray]) -> torch.Tensor:
        """Vision encoder output before the adapter: (ΣN, vision dim) fp32."""
        return self.model.vision_encoder(self._image_tensors(images)).float()

    @torch.inference_mode()
    def image_features(self, images: list[np.ndarray]) -> torch.Tensor:
        """Rows spliced in at the [IMG] positions: (ΣN, dim) fp32."""
        self.images_encoded += len(images)
        return self.model.image_features(self._image_tensors(images)).float()

    @torch.inference_mode()
    def logits(self, tokens: list[int], images: list[np.ndarray]) -> torch.Tensor:
        """One full causal forward without cache: (len(tokens), vocab) fp32."""
        self._check_context(len(tokens), 0)
        rows = self.image_features(images) if images else None
        t = torch.tensor(tokens, device=self.device)
        return self.model(self.model.embed(t, rows))

    # ---- generation ----------------------------------------------------------------------
    def _check_context(self, n_prompt: int, max_tokens: int) -> None:
        if max_tokens < 0:
            raise PixlocalError(f"max_tokens must be >= 0, got {max_tokens}")
        limit = min(self.args.max_seq_len, self.context_len)
        if n_prompt + max_tokens > limit:
            raise ContextOverflow(f"prompt ({n_prompt} tokens) + max_tokens ({max_tokens}) "
                                  f"exceeds the context window of {limit} tokens")
        self._check_kv_memory(n_prompt + max_tokens)

    def _check_kv_memory(self, tokens: int) -> None:
        # The CPU cache grows on demand; a request whose cache cannot fit in the RAM still free
        # is refused here, up front, instead of the OS killing the process mid-answer.
        if self._cache is not None and tokens <= self._cache.capacity:
            return  # allocated already
        layers = sum(module_device(layer).type == "cpu" for layer in self.model.layers)
        need = kv_bytes_per_layer(self.args, tokens, self.dtype.itemsize) * layers
        free = available_ram() if need else None
        if free is not None and need > free:
            raise ContextOverflow(f"{self.path}: a KV cache for {tokens} tokens needs "
                                  f"{need / 2**30:.1f} GiB of RAM but {free / 2**30:.1f} GiB "
                                  "is available; lower max_tokens or shorten the prompt")

    def _keys_of(self, enc: Encoded) -> list[Key]:
        img_id = self.encoder.img_id
        digests = iter([_digest(a) for a in enc.images])
        keys: list[Key] = []
        current, patch = b"", 0
        for i, t in enumerate(enc.tokens):
            if t == img_id:
                if i == 0 or enc.tokens[i - 1] not in (img_id, self.encoder.img_break_id):
                    current, patch = next(digests), 0  # first [IMG] of a new image
                keys.append((current, patch))
                patch += 1
            else:
                keys.append(t)
        return keys

    def reset(self) -> None:
        """Forget the cached prefix (the cache memory stays allocated)."""
        self._keys = []

    def _ensure_cache(self, needed: int) -> KVCache:
        a = self.args
        if self._cache is None:
            cap = min(a.max_seq_len, self.context_len, max(needed, 512))
            self._cache = KVCache(a.n_layers, a.n_kv_heads, a.head_dim, cap, self.dtype,
                                  [module_device(layer) for layer in self.model.layers])
        elif needed > self._cache.capacity:
            self._cache.grow(min(a.max_seq_len, self.context_len,
                                 max(needed, 2 * self._cache.capacity)))
        return self._cache

    @torch.inference_mode()
    def _prefill(self, enc: Encoded) -> tuple[torch.Tensor, int]:
        """Run the uncached suffix of enc; returns (last logits (V,), tokens computed)."""
        keys = self._keys_of(enc)
        keep = 0
        for a, b in zip(self._keys, keys, strict=False):
            if a != b:
                break
            keep += 1
        keep = min(keep, len(keys) - 1)  # always compute the last position's logits
        while keep > 0 and isinstance(keys[keep], tuple) and keys[keep][1] != 0:
            keep -= 1  # never start inside an image block
        # images whose first [IMG] lies at or after `keep` need encoding
        starts = [i for i, k in enumerate(keys) if isinstance(k, tuple) and k[1] == 0]
        first_new = sum(1 for s in starts if s < keep)
        new_images = enc.images[first_new:]
        rows = self.image_features(new_images) if new_images else None
        cache = self._ensure_cache(len(keys))
        self.threads.use()
        self._keys = keys[:keep]
        t = torch.tensor(enc.tokens[keep:], device=self.device)
        h = self.model.embed(t, rows)
        logits = self.model(h, keep, cache, logits_from=h.shape[0] - 1)[-1]
        self._keys = keys
        return logits, len(keys) - keep

    @torch.inference_mode()
    def _decode_one(self, token: int, key: Key) -> torch.Tensor:
        pos = len(self._keys)
        cache = self._ensure_cache(pos + 1)
        with self.threads.step():
            h = self.model.embed(torch.tensor([token], device=self.device), None)
            logits = self.model(h, pos, cache)[-1]
        self._keys.append(key)
        return logits

    def prefill(self, enc: Encoded) -> torch.Tensor:
        """Run the prompt through the model (reusing the cached prefix): its last logits (V,).
        For benchmarks and custom decoding loops; stream() is the usual entry point."""
        self._check_context(len(enc.tokens), 0)
        return self._prefill(enc)[0]

    def decode(self, token: int) -> torch.Tensor:
        """Append one token at the end of the cached sequence: its logits (V,)."""
        self._check_context(len(self._keys) + 1, 0)
        return self._decode_one(token, token)

    def stream_encoded(self, enc: Encoded, *, max_tokens: int, temperature: float = 0.0,
                       top_p: float = 1.0, top_k: int = 0, seed: int | None = None
                       ) -> Iterator[Step]:
        """Generate from already-encoded tokens + images, keeping the cache for reuse."""
        self._check_context(len(enc.tokens), max_tokens)
        t0 = time.perf_counter()
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        if temperature > 0 and gen is None:
            gen = torch.Generator().manual_seed(int.from_bytes(np.random.bytes(8), "little") >> 1)
        if max_tokens == 0:
            return
        logits, computed = self._prefill(enc)
        prefill_s = time.perf_counter() - t0
        detok = StreamDecoder(self.encoder)
        eos = self.encoder.eos_id
        for i in range(max_tokens):
            tok = sample(logits.float().cpu(), temperature, top_p, top_k, gen)
            last = i == max_tokens - 1
            if tok == eos:
                yield Step(detok.flush(), tok, i, len(enc.tokens), computed, prefill_s,
                           time.perf_counter() - t0, "stop")
                return
            text = detok.add(tok)
            if last:
                text += detok.flush()
            if not last:  # the last token is not run: a next request computes it
                logits = self._decode_one(tok, tok)
            yield Step(text, tok, i, len(enc.tokens), computed, prefill_s,
                       time.perf_counter() - t0, "length" if last else None)

    def stream(self, messages: list[dict[str, Any]], *, max_tokens: int,
               temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
               seed: int | None = None) -> Iterator[Step]:
        """Answer a conversation, token by token."""
        enc = self.encode(messages)
        yield from self.stream_encoded(enc, max_tokens=max_tokens, temperature=temperature,
                                       top_p=top_p, top_k=top_k, seed=seed)

    def generate(self, messages: list[dict[str, Any]], **kw: Any) -> str:
        return "".join(s.text for s in self.stream(messages, **kw))


class ChatSession:
    """A multi-turn conversation that keeps the KV cache between turns."""

    def __init__(self, model: Pixtral, system: str | None = None):
        self.model, self.system = model, system
        self.messages: list[dict[str, Any]] = []

    def reset(self) -> None:
        self.messages = []
        self.model.reset()

    def send(self, content: str | list[dict[str, Any]], **kw: Any) -> Iterator[Step]:
        """Add a user turn and stream the answer; the answer joins the history when done
        (or when the caller stops iterating: the partial answer is kept)."""
        msgs = ([{"role": "system", "content": self.system}] if self.system else [])
        msgs += self.messages + [{"role": "user", "content": content}]
        enc = self.model.encode(msgs)
        self.messages.append({"role": "user", "content": content})
        parts: list[str] = []
        try:
            for step in self.model.stream_encoded(enc, **kw):
                parts.append(step.text)
                yield step
        finally:
            self.messages.append({"role": "assistant", "content": "".join(parts)})


def available_ram() -> int | None:
    """Bytes of RAM the kernel can hand out now (MemAvailable), None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def load(path: str | Path, device: str = "auto", dtype: str = "auto",
         max_image_size: int | None = None, gpu_layers: GpuLayers = "auto",
         max_vram: int | None = None, context_len: int = DEFAULT_CONTEXT,
         threads: int | None = None) -> Pixtral:
    """Load a model directory (Mistral or Hugging Face format) for generation.

    device "auto" picks CUDA when present. On CUDA the weights load on the CPU (memory-mapped)
    and placement.plan() decides what moves to the GPU: `gpu_layers` decoder layers ("auto":
    as many as fit, PixlocalError if an explicit count cannot), `max_vram` bytes at most, a KV
    cache for `context_len` tokens (longer prompts raise ContextOverflow). `threads` fixes the
    CPU thread count (else $PIXLOCAL_THREADS, else chosen per decode step from the usable
    cores: kernels/threads.py)."""
    policy = ThreadPolicy(threads)  # ConfigError for a bad $PIXLOCAL_THREADS, before any work
    policy.use()
    dev = parse_device(device)
    dt = parse_dtype(dtype, dev)
    model, ckpt = load_model(path, device="cpu" if dev.type == "cuda" else dev, dtype=dt)
    context_len = min(context_len, model.args.max_seq_len)
    p = None
    if dev.type == "cuda":
        p = plan(model.args, checkpoint_bytes(ckpt, dt), free_vram(dev),
                 context_len, image_tokens(model.args, max_image_size), gpu_layers, max_vram,
                 dt.itemsize)
        apply(model, p, dev)
    prepare_quantized(model, ckpt)
    encoder = PromptEncoder(tokenizer_path(Path(path).expanduser(), ckpt.kind),
                            max_image_size=max_image_size)
    runner = Pixtral(model, encoder, Path(path).expanduser(), ckpt, policy)
    if p is not None:  # the CPU's KV cache grows on demand: only a GPU plan caps the context
        runner.context_len, runner.plan = context_len, p
    return runner
