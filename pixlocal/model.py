"""The Pixtral decoder (Mistral-Nemo shaped) with its vision tower (pure nn.Modules).

Module names are the checkpoint's: tok_embeddings, layers.N.{attention_norm,
attention.wq/wk/wv/wo, ffn_norm, feed_forward.w1/w2/w3}, norm, output, vision_encoder,
vision_language_adapter. Batch size is 1: a local runner answers one conversation at a time.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .config import PixtralArgs
from .layers import FeedForward, Projections, RMSNorm, attention
from .rope import apply_rotary_emb, freqs_cis_1d
from .vision import VisionEncoder, VisionLanguageAdapter

# Shapes: L new tokens · S cached + new tokens · D model dim · H heads · Hkv kv heads
#         Dh head dim · V vocab · N image patches

Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]


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
    """Grouped-query attention over the KV cache. `qkv` computes wq/wk/wv (the loader stacks
    them into one call where the backend can) and `attend` is the attention op
    (layers.attention's contract; the loader gives each layer its backend's)."""

    def __init__(self, args: PixtralArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)
        self.qkv: Callable[[torch.Tensor], list[torch.Tensor]] = Projections(self, "wq", "wk",
                                                                             "wv")
        self.attend: Attend = attention

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor, layer: int,
                cache: KVCache | None, start: int) -> torch.Tensor:
        L, _ = x.shape
        q, k, v = self.qkv(x)
        q = q.view(L, self.n_heads, self.head_dim)  # (L, H, Dh)
        k = k.view(L, self.n_kv_heads, self.head_dim)  # (L, Hkv, Dh)
        v = v.view(L, self.n_kv_heads, self.head_dim)
        q, k = apply_rotary_emb(q, freqs_cis), apply_rotary_emb(k, freqs_cis)
        q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)  # (H*, L, Dh)
        if cache is not None:
            ck, cv = cache.k[layer], cache.v[layer]  # (Hkv, capacity, Dh)
            ck[:, start : start + L] = k
            cv[:, start : start + L] = v
            k, v = ck, cv
        o = self.attend(q, k, v, start + L)  # (H, L, Dh)
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
            h[is_img] = image_rows.to(h.dtype)
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
        for i, layer in enumerate(self.layers):
            h = layer(h, freqs_cis, i, cache, start)
        return self.head(h[logits_from:])

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """h (L, D) after the last layer -> logits (L, V) fp32."""
        return self.output(self.norm(h)).float()
