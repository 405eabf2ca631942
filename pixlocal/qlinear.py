"""QLinear: a linear layer whose weight is a pixlocal quantized tensor (see qformat)."""

from __future__ import annotations

import torch
from torch import nn

from . import kernels
from .errors import FormatError
from .qformat import QTensor, QuantSpec
from .quantizer import quantize

# Shapes: L tokens · K in-features · M out-features · G group size


class QLinear(nn.Module):
    """y = x @ W.T + b with W stored quantized.

    Buffers are named like the safetensors entries (`qweight`, `scales`, `zeros` for int4,
    `bias` if any), so a module at `layers.0.attention.wq` has the state-dict keys
    `layers.0.attention.wq.qweight` … exactly as in the shard. int8 scales may be float16 or
    bfloat16 (qformat); load with `load_state_dict(..., assign=True)` to keep the file's dtype.
    `backend` names the qmatmul kernel (kernels.BACKENDS); the loader sets it per device.
    The weight is prepared for the backend (kernels.prepare) at the first forward and again
    whenever the buffers are replaced (load_state_dict, .to()); the cpu backend's prepared
    weight is a repacked copy (the loader then releases the file's pages the buffers map,
    and may stack layers: `fuse`); the cuda backend's int4 repack replaces it, so the
    stored buffers are then emptied (state_dict() no longer holds the weight). The output has
    the input's dtype.
    """

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    bias: torch.Tensor | None

    def __init__(self, in_features: int, out_features: int, spec: QuantSpec, bias: bool = False,
                 device: torch.device | str | None = None, backend: str = "ref") -> None:
        super().__init__()
        K, M, G = in_features, out_features, spec.group_size
        if K % G:
            raise FormatError(f"in-features K={K} is not a multiple of the group size {G} "
                              f"({spec.name})")
        self.in_features, self.out_features, self.spec, self.backend = K, M, spec, backend
        int4 = spec.bits == 4
        self.register_buffer("qweight", torch.zeros(
            M, K // 2 if int4 else K, dtype=torch.uint8 if int4 else torch.int8, device=device))
        self.register_buffer("scales", torch.zeros(
            M, K // G, dtype=torch.uint8 if int4 else torch.float16, device=device))
        self.register_buffer("zeros", torch.zeros(M, K // G, dtype=torch.uint8, device=device)
                             if int4 else None)
        self.register_buffer("bias", torch.zeros(M, device=device) if bias else None)
        self._prepared: tuple[tuple[object, ...], object] | None = None

    def qtensor(self) -> QTensor:
        """The weight as a QTensor (views of the buffers, no copy)."""
        return QTensor(self.qweight, self.scales, self.zeros,
                       (self.out_features, self.in_features), self.spec)

    def prepared(self) -> object:
        """The weight as the backend's kernels read it; prepared once per set of buffers."""
        key = (self.qweight, self.scales, self.zeros, self.backend)
        old = self._prepared
        if old is None or any(a is not b for a, b in zip(old[0], key, strict=True)):
            if self.qweight.numel() == 0:
                raise RuntimeError(f"{self!r}: the stored weight was released after repacking "
                                   "for the cuda backend; reload the model to change it")
            p = kernels.prepare(self.qtensor(), self.backend)
            if self.backend == "cuda" and p.qweight is not self.qweight:
                # tinygemm repacked a copy: drop the stored layout, or the weight takes twice
                # its size in VRAM. The empty buffers keep dtype and device (and the key).
                self.qweight, self.scales = self.qweight.new_empty(0), self.scales.new_empty(0)
                self.zeros = None if self.zeros is None else self.zeros.new_empty(0)
                key = (self.qweight, self.scales, self.zeros, self.backend)
            self._prepared = (key, p)
        return self._prepared[1]

    def use_prepared(self, p: object) -> None:
        """Take `p` as the prepared weight of the current buffers (a view `fuse` made)."""
        self._prepared = ((self.qweight, self.scales, self.zeros, self.backend), p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        y = kernels.qmatmul(x.reshape(-1, self.in_features), self.prepared(),
                            self.backend)  # (L, M) float32
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype).reshape(*lead, self.out_features)

    @classmethod
    def from_qtensor(cls, q: QTensor, bias: torch.Tensor | None = None,
                     backend: str = "ref") -> QLinear:
        M, K = q.shape
        m = cls(K, M, q.spec, bias=bias is not None, device="meta", backend=backend)
        m.qweight, m.scales, m.zeros = q.qweight, q.scales, q.zeros
        m.bias = None if bias is None else bias.detach().clone()
        return m

    @classmethod
    def from_linear(cls, linear: nn.Linear, spec: QuantSpec, backend: str = "ref") -> QLinear:
        """Quantize an nn.Linear's weight with `spec` (keeps its bias in its own dtype)."""
        return cls.from_qtensor(quantize(linear.weight, spec), linear.bias, backend)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"quant={self.spec.name}, bias={self.bias is not None}, backend={self.backend}")


class Fused:
    """QLinear layers reading the same input (wq/wk/wv, w1/w3) as one qmatmul over their
    weights stacked by rows (kernels.fuse); calling it returns each layer's output in x's
    dtype. Should a layer re-prepare its weight (new buffers or backend), the call falls back
    to the layers one by one."""

    def __init__(self, mods: list[QLinear], p: object, views: list[object]) -> None:
        self.mods, self.p, self.views = mods, p, views
        self.sizes = [m.out_features for m in mods]

    def valid(self) -> bool:
        """Whether every layer still computes with its view of the stack."""
        return all(m.prepared() is v for m, v in zip(self.mods, self.views, strict=True))

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        if not self.valid():
            return [m(x) for m in self.mods]
        lead = x.shape[:-1]
        y = kernels.qmatmul(x.reshape(-1, x.shape[-1]), self.p, self.mods[0].backend)
        return [t.reshape(*lead, t.shape[-1]) for t in y.to(x.dtype).split(self.sizes, -1)]


def fuse(mods: list[nn.Module]) -> Fused | None:
    """One Fused call for bias-free QLinears of one backend, where it stacks them."""
    if not all(isinstance(m, QLinear) and m.bias is None and m.backend == mods[0].backend
               for m in mods):
        return None
    got = kernels.fuse([m.prepared() for m in mods], mods[0].backend)
    if got is None:
        return None
    p, views = got
    for m, v in zip(mods, views, strict=True):
        m.use_prepared(v)
    return Fused(mods, p, views)  # type: ignore[arg-type]
