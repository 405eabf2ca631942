"""QEmbedding: a token embedding table stored quantized (see qformat); a lookup dequantizes
only the rows it returns, so the (V, D) table is never expanded."""

from __future__ import annotations

import torch
from torch import nn

from .qformat import QTensor, QuantSpec, dequantize

# Shapes: L tokens · V vocab · D model dim · G group size


class QEmbedding(nn.Module):
    """nn.Embedding's forward over a quantized (V, D) table; rows come back in `dtype`.

    Buffers are named like the shard entries (`qweight`, `scales`, `zeros` for int4), so the
    module at `tok_embeddings` has the state-dict keys `tok_embeddings.qweight` ….
    """

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None

    def __init__(self, q: QTensor, dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = q.shape
        self.spec: QuantSpec = q.spec
        self.dtype = dtype
        self.register_buffer("qweight", q.qweight)
        self.register_buffer("scales", q.scales)
        self.register_buffer("zeros", q.zeros)

    def qtensor(self) -> QTensor:
        return QTensor(self.qweight, self.scales, self.zeros,
                       (self.num_embeddings, self.embedding_dim), self.spec)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (...,) int → (..., D) in self.dtype."""
        idx = tokens.reshape(-1)  # (L,)
        rows = QTensor(self.qweight[idx], self.scales[idx],
                       None if self.zeros is None else self.zeros[idx],
                       (idx.numel(), self.embedding_dim), self.spec)
        return dequantize(rows, self.dtype).reshape(*tokens.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, quant={self.spec.name}, "
                f"dtype={self.dtype}")
