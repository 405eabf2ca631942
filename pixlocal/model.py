"""The Pixtral decoder (Mistral-Nemo shaped) with its vision tower (pure nn.Modules).

Module names are the checkpoint's: tok_embeddings, layers.N.{attention_norm,
attention.wq/wk/wv/wo, ffn_norm, feed_forward.w1/w2/w3}, norm, output, vision_encoder,
vision_language_adapter. Batch size is 1: a local runner answers one conversation at a time.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .config import PixtralArgs
from .layers import FeedForward, RMSNorm
from .qlinear import Fused, QLinear
from .rope import apply_rotary_emb, freqs_cis_1d
from .vision import VisionEncoder, VisionLanguageAdapter

# Shapes: L new tokens · S cached + new tokens · D model dim · H heads · Hkv kv heads
#         Dh head dim · V vocab · N image patches


class KVCache(nn.Module):
    """Preallocated rotated keys and values, one (Hkv, capacity, Dh) pair per layer, each on
    its layer's device (`device`: one for all layers, or a list with one per layer)."""

    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, capacity: int,
                 dtype: torch.dtype, device: torch.device | str | list[torch.device] = "cpu"):
        super().__init__()
        devs = device if isinstance(device, list) else [torch.device(device)] * n_layers
        shape = (n_kv_heads, capacity, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=d) for d in devs]
        self.v = [torch.zeros(shape, dtype=dtype, device=d) for d in devs]
        self.capacity = capacity

    @property
    def nbytes(self) -> int:
        return sum(2 * t.numel() * t.element_size() for t in self.k)

    def grow(self, capacity: int) -> None:
        """Reallocate to a larger capacity, keeping what is stored."""
        if capacity <= self.capacity:
            return
        for buf in (self.k, self.v):
            for i, old in enumerate(buf):
                new = old.new_zeros(old.shape[0], capacity, old.shape[2])
                new[:, : self.capacity] = old
                buf[i] = new
        self.capacity = capacity


class Attention(nn.Module):
    def __init__(self, args: PixtralArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)
        self.qkv: Callable[[torch.Tensor], list[torch.Tensor]] | None = None  # fused (loader)

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor, layer: int,
                cache: KVCache | None, start: int) -> torch.Tensor:
        L, _ = x.shape
        q, k, v = self.qkv(x) if self.qkv is not None else (self.wq(x), self.wk(x), self.wv(x))
        q = q.view(L, self.n_heads, self.head_dim)  # (L, H, Dh)
        k = k.view(L, self.n_kv_heads, self.head_dim)  # (L, Hkv, Dh)
        v = v.view(L, self.n_kv_heads, self.head_dim)
        q, k = apply_rotary_emb(q, freqs_cis), apply_rotary_emb(k, freqs_cis)
        q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)  # (H*, L, Dh)
        ck, cv = k, v
        if cache is not None:
            ck, cv = cache.k[layer], cache.v[layer]  # (Hkv, capacity, Dh)
            ck[:, start : start + L] = k
            cv[:, start : start + L] = v
            k, v = ck[:, : start + L], cv[:, : start + L]  # (Hkv, S, Dh)
        S = k.shape[1]
        if L == 1 and x.device.type == "cpu":  # torch's SDPA is slow for one query here
            return self.wo(kernels.decode_attention(q, ck, cv, S).reshape(1, -1))
        if L == 1:
            mask, causal = None, False  # one new token sees everything before it
        elif S == L:
            mask, causal = None, True
        else:  # new tokens after a cached prefix: query i sees keys 0 .. S-L+i
            mask = torch.ones(L, S, dtype=torch.bool, device=x.device).tril(S - L)
            causal = False
        # 4-D: torch's fused (flash) kernels take only batched inputs; 3-D ones ran the math
        # path, 3.5x slower (1064 tokens, 32/8 heads, bfloat16, 2 cores: 344 vs 99 ms a layer)
        o = F.scaled_dot_product_attention(q[None], k.type_as(q)[None], v.type_as(q)[None],
                                           attn_mask=mask, is_causal=causal,
                                           enable_gqa=True)[0]  # (H, L, Dh)
        return self.wo(o.transpose(0, 1).reshape(L, -1))


class Block(nn.Module):
    def __init__(self, args: PixtralArgs):
        super().__init__()
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.attention = Attention(args)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward = FeedForward(args.dim, args.hidden_dim)

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor, layer: int,
                cache: KVCache | None, start: int) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), freqs_cis, layer, cache, start)
        return h + self.feed_forward(self.ffn_norm(h))


class FusedDecode:
    """Decode steps through the backend's one-call-per-layer kernel (kernels.decode_stack)
    instead of the modules: for models whose every layer has wq/wk/wv and w1/w3 fused
    (qlinear.fuse) on one backend. It answers None, and the modules run, wherever it does
    not apply: another dtype or device, or weights replaced since it was built."""

    def __init__(self, model: PixtralModel) -> None:
        self.stack, self.mods, self.norms = None, [], []
        self.norm_mods = [m for blk in model.layers for m in (blk.attention_norm, blk.ffn_norm)]
        layers = []
        for blk in model.layers:
            a, f = blk.attention, blk.feed_forward
            if not (isinstance(a.qkv, Fused) and isinstance(f.w13, Fused)
                    and isinstance(a.wo, QLinear) and isinstance(f.w2, QLinear)):
                return
            self.mods += [(m, m.prepared()) for m in (*a.qkv.mods, a.wo, *f.w13.mods, f.w2)]
            n1, n2 = blk.attention_norm.weight, blk.ffn_norm.weight
            self.norms += [(n, n._version) for n in (n1, n2)]
            layers.append((n1, a.qkv.p, a.wo.prepared(), n2, f.w13.p, f.w2.prepared()))
        r = model.args
        backends = {m.backend for m, _ in self.mods}
        if len(backends) == 1:
            self.stack = kernels.decode_stack(layers, r.n_heads, r.n_kv_heads, r.head_dim,
                                              r.norm_eps, backends.pop())

    def __call__(self, h: torch.Tensor, start: int, cache: KVCache, freqs_cis: torch.Tensor
                 ) -> torch.Tensor | None:
        """h (1, D) at position start through every layer, or None if this cannot."""
        if (self.stack is None or h.dtype not in (torch.bfloat16, torch.float32)
                or h.device.type != "cpu" or any(k.dtype != h.dtype for k in cache.k)
                or any(m.prepared() is not p for m, p in self.mods)
                or any(mod.weight is not n or n._version != v
                       for mod, (n, v) in zip(self.norm_mods, self.norms, strict=True))):
            return None
        out: torch.Tensor = self.stack(h, start, cache.k, cache.v, freqs_cis)
        return out


class PixtralModel(nn.Module):
    def __init__(self, args: PixtralArgs):
        super().__init__()
        self.args = args
        # nn.Embedding's own init (normal_) on the meta device, where the loader builds the
        # model, imports torch._dynamo: 1.6 s of every load. Meta tensors need no init.
        emb = torch.empty(args.vocab_size, args.dim)
        if not emb.is_meta:
            nn.init.normal_(emb)
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim, _weight=emb)
        self.layers = nn.ModuleList(Block(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        v = args.vision_encoder
        if v is not None:
            self.vision_encoder = VisionEncoder(v)
            self.vision_language_adapter = VisionLanguageAdapter(v.hidden_size, args.dim,
                                                                 v.adapter_bias)
        self.fused_decode: FusedDecode | None = None  # set by the loader (FusedDecode)

    def image_features(self, images: list[torch.Tensor]) -> torch.Tensor:
        """Images (C, H, W) -> (ΣN, D) rows for the [IMG] positions, in order."""
        return self.vision_language_adapter(self.vision_encoder(images))

    def embed(self, tokens: torch.Tensor, image_rows: torch.Tensor | None) -> torch.Tensor:
        """tokens (L,) -> (L, D); the [IMG] positions take image_rows (N, D) in order."""
        h = self.tok_embeddings(tokens)
        if image_rows is not None and image_rows.numel():
            assert self.args.vision_encoder is not None
            is_img = tokens == self.args.vision_encoder.image_token_id
            assert int(is_img.sum()) == image_rows.shape[0], (int(is_img.sum()),
                                                              image_rows.shape)
            h = h.clone()
            h[is_img] = image_rows.to(h.device, h.dtype)
        return h

    def forward(self, h: torch.Tensor, start: int = 0, cache: KVCache | None = None,
                logits_from: int = 0) -> torch.Tensor:
        """h (L, D) embeddings at positions start.. -> logits (L - logits_from, V) fp32.

        logits_from skips the output head for positions whose logits nobody reads (the
        head is a 131072-row matmul: most of a prefill's waste).
        """
        L = h.shape[0]
        pos = torch.arange(start, start + L, device=h.device)
        freqs_cis = freqs_cis_1d(pos, self.args.head_dim, self.args.rope_theta)  # (L, Dh/2)
        fused = self.fused_decode if L == 1 and cache is not None else None
        out = None if fused is None else fused(h, start, cache, freqs_cis)
        for i, layer in enumerate(self.layers if out is None else ()):
            dev = layer.attention_norm.weight.device  # partial offload: cross CPU <-> GPU
            h, freqs_cis = h.to(dev), freqs_cis.to(dev)  # (a no-op on the same device)
            h = layer(h, freqs_cis, i, cache, start)
        h = h if out is None else out
        h = h[logits_from:].to(self.norm.weight.device)
        return self.output(self.norm(h)).float()
