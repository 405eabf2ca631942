"""Rotary position embeddings in Mistral's interleaved-pair convention.

Pair p of a head is (x[2p], x[2p+1]), rotated as the complex number x[2p] + i·x[2p+1].
Tables are computed on the fly in fp32 for just the positions in use: for decode that is
one row, and nothing has to be stored for a 128k context.
"""

from __future__ import annotations

import torch

# Shapes: L tokens · H heads · Dh head dim · N image patches


def inv_freq(head_dim: int, theta: float, device: torch.device | None = None) -> torch.Tensor:
    """theta^(-2k/Dh), k = 0..Dh/2-1, as mistral-inference's precompute_freqs_cis."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device)[: head_dim // 2]
                            .float() / head_dim))


def freqs_cis_1d(positions: torch.Tensor, head_dim: int, theta: float) -> torch.Tensor:
    """positions (L,) int -> (L, Dh/2) complex64."""
    angles = torch.outer(positions.float(), inv_freq(head_dim, theta, positions.device))
    return torch.polar(torch.ones_like(angles), angles)


def freqs_cis_2d(rows: int, cols: int, head_dim: int, theta: float,
                 device: torch.device | None = None) -> torch.Tensor:
    """Patch grid -> (rows*cols, Dh/2) complex64, row-major patch order.

    The first Dh/4 pairs turn with the row index at the even frequencies, the last Dh/4
    with the column index at the odd ones (PIXTRAL_SPEC.md §3.4); every image starts at
    (0, 0).
    """
    f = inv_freq(head_dim, theta, device)  # (Dh/2,)
    r = torch.arange(rows, device=device).float()
    c = torch.arange(cols, device=device).float()
    fr = torch.outer(r, f[::2])  # (rows, Dh/4)
    fc = torch.outer(c, f[1::2])  # (cols, Dh/4)
    angles = torch.cat([fr[:, None, :].expand(rows, cols, -1),
                        fc[None, :, :].expand(rows, cols, -1)], dim=-1)
    angles = angles.reshape(rows * cols, -1)
    return torch.polar(torch.ones_like(angles), angles)


def apply_rotary_emb(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """x (L, H, Dh), freqs_cis (L, Dh/2) -> rotated x in x's dtype (math in fp32)."""
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))  # (L, H, Dh/2)
    out = torch.view_as_real(xc * freqs_cis[:, None, :]).flatten(-2)
    return out.type_as(x)
