"""The prompt cache: one KV cache and the token "keys" of the positions it holds. A new
request is prefilled only from the first position where it differs from what the cache holds,
so a chat turn costs its new tokens only. Keys compare text ids by id and image positions by
(image content digest, patch index): two different images of one size give the same [IMG]
ids."""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from .config import PixtralArgs
from .kernels.backend import is_gpu
from .model import KVCache
from .prompt import Encoded

Key = int | tuple[bytes, int]


def _digest(a: np.ndarray) -> bytes:
    return hashlib.blake2b(np.ascontiguousarray(a).tobytes(), digest_size=16).digest() + \
        str(a.shape).encode()


def keys_of(enc: Encoded, img_id: int, img_break_id: int) -> list[Key]:
    """What each position of `enc` holds: its token id, or (image digest, patch index)."""
    digests = iter([_digest(a) for a in enc.images])
    keys: list[Key] = []
    current, patch = b"", 0
    for i, t in enumerate(enc.tokens):
        if t == img_id:
            if i == 0 or enc.tokens[i - 1] not in (img_id, img_break_id):
                current, patch = next(digests), 0  # first [IMG] of a new image
            keys.append((current, patch))
            patch += 1
        else:
            keys.append(t)
    return keys


class PromptCache:
    """A KV cache (one buffer pair per layer, on the layer's device) and the keys of the
    positions 0..len-1 it holds. It grows on demand up to `limit` tokens."""

    def __init__(self, args: PixtralArgs, dtype: torch.dtype, devices: list[torch.device],
                 limit: int) -> None:
        self.args, self.dtype, self.devices, self.limit = args, dtype, devices, limit
        self.kv: KVCache | None = None
        self.keys: list[Key] = []

    def __len__(self) -> int:
        return len(self.keys)

    def reset(self) -> None:
        """Forget the cached prefix (the cache memory stays allocated)."""
        self.keys = []

    def reusable(self, keys: list[Key]) -> int:
        """Positions of `keys` the cache already holds: the common prefix, less the last
        position (its logits are needed) and never ending inside an image block."""
        n = min(len(self.keys), len(keys))
        keep = min(next((i for i in range(n) if self.keys[i] != keys[i]), n), len(keys) - 1)
        while keep > 0 and isinstance(keys[keep], tuple) and keys[keep][1] != 0:
            keep -= 1
        return keep

    def ensure(self, needed: int) -> KVCache:
        """The KV cache, allocated (or grown) to hold `needed` positions. Where a layer is on
        a GPU it is allocated once at its planned size (`limit`): growing would hold the old
        and the new buffers at once, which the plan does not reserve. In RAM it grows on
        demand (check_context refuses what the free RAM cannot hold)."""
        a = self.args
        if self.kv is None:
            size = self.limit if any(is_gpu(d) for d in self.devices) else \
                min(self.limit, max(needed, 512))
            self.kv = KVCache(a.n_layers, a.n_kv_heads, a.head_dim, size, self.dtype,
                              self.devices)
        elif needed > self.kv.capacity:
            self.kv.grow(min(self.limit, max(needed, 2 * self.kv.capacity)))
        return self.kv
