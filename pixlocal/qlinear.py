"""QLinear: a linear layer whose weight is a pixlocal quantized tensor (see qformat)."""

from __future__ import annotations

import torch
from torch import nn

from .errors import FormatError
from .kernels.backend import Backend, get
from .qformat import QTensor, QuantSpec

# Shapes: L tokens · K in-features · M out-features · G group size


class QLinear(nn.Module):
    """y = x @ W.T + b with W stored quantized.

    Buffers are named like the safetensors entries (`qweight`, `scales`, `zeros` for int4,
    `bias` if any), so a module at `layers.0.attention.wq` has the state-dict keys
    `layers.0.attention.wq.qweight` … exactly as in the shard. int8 scales may be float16 or
    bfloat16 (qformat); load with `load_state_dict(..., assign=True)` to keep the file's dtype.
    `backend` is the kernels' Backend (set from a name too); the loader picks it per layer
    from the plan and calls `prepare()` at load. The weight is prepared again whenever the
    buffers or the backend change (load_state_dict, .to(), a test switching to "ref"). Where
    the backend copied the weight the loader releases the file's pages behind the buffers, or
    (a device copy) empties them with `drop_source` (state_dict() then no longer holds the
    weight). The output has the input's dtype.
    """

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    bias: torch.Tensor | None

    def __init__(self, in_features: int, out_features: int, spec: QuantSpec, bias: bool = False,
                 device: torch.device | str | None = None, backend: Backend | str = "ref"
                 ) -> None:
        super().__init__()
        K, M, G = in_features, out_features, spec.group_size
        if K % G:
            raise FormatError(f"in-features K={K} is not a multiple of the group size {G} "
                              f"({spec.name})")
        self.in_features, self.out_features, self.spec = K, M, spec
        self.backend = backend
        for name, dt, shape in spec.layout((M, K)):  # qweight, scales[, zeros]: qformat.SCHEMES
            self.register_buffer(name, torch.zeros(shape, dtype=dt, device=device))
        if "zeros" not in self._buffers:
            self.register_buffer("zeros", None)
        self.register_buffer("bias", torch.zeros(M, device=device) if bias else None)
        self._prepared: tuple[tuple[object, ...], object] | None = None

    @property
    def backend(self) -> Backend:
        return self._backend

    @backend.setter
    def backend(self, b: Backend | str) -> None:
        self._backend = get(b) if isinstance(b, str) else b

    def qtensor(self) -> QTensor:
        """The weight as a QTensor (views of the buffers, no copy)."""
        return QTensor(self.qweight, self.scales, self.zeros,
                       (self.out_features, self.in_features), self.spec)

    def _key(self) -> tuple[object, ...]:
        return (self.qweight, self.scales, self.zeros, self._backend)

    def prepared(self) -> object:
        """The weight as the backend's kernels read it; prepared once per set of buffers."""
        old = self._prepared
        if old is None or any(a is not b for a, b in zip(old[0], self._key(), strict=True)):
            if self.qweight.numel() == 0:
                raise RuntimeError(f"{self!r}: the stored weight was released after the "
                                   f"{self._backend} backend copied it; reload the model to "
                                   "change it")
            self._prepared = (self._key(), self._backend.prepare(self.qtensor()))
        return self._prepared[1]

    def prepare(self) -> bool:
        """Prepare now (the loader does, at load): whether the prepared weight is a copy that
        no longer reads the stored buffers."""
        p = self.prepared()
        return getattr(p, "qweight", None) is not self.qweight

    def drop_source(self) -> None:
        """Empty the stored buffers (the prepared copy stays): a weight copied to a device
        is not kept twice there. The empty buffers keep dtype and device."""
        p = self.prepared()
        self.qweight, self.scales = self.qweight.new_empty(0), self.scales.new_empty(0)
        self.zeros = None if self.zeros is None else self.zeros.new_empty(0)
        self.use_prepared(p)

    def use_prepared(self, p: object) -> None:
        """Take `p` as the prepared weight of the current buffers (a view `fuse` made)."""
        self._prepared = (self._key(), p)

    @property
    def nbytes(self) -> int:
        """Bytes of weight one pass reads (Backend.weight_bytes of the prepared form)."""
        return self._backend.weight_bytes(self.prepared())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        y = self._backend.qmatmul(x.reshape(-1, self.in_features), self.prepared())  # (L, M)
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype).reshape(*lead, self.out_features)

    @classmethod
    def from_qtensor(cls, q: QTensor, bias: torch.Tensor | None = None,
                     backend: Backend | str = "ref") -> QLinear:
        M, K = q.shape
        m = cls(K, M, q.spec, bias=bias is not None, device="meta", backend=backend)
        m.qweight, m.scales, m.zeros = q.qweight, q.scales, q.zeros
        m.bias = None if bias is None else bias.detach().clone()
        return m

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"quant={self.spec.name}, bias={self.bias is not None}, backend={self.backend}")


class Fused:
    """QLinear layers reading the same input (wq/wk/wv, w1/w3) as one qmatmul over their
    weights stacked by rows (Backend.fuse); calling it returns each layer's output in x's
    dtype. Should a layer re-prepare its weight (new buffers or backend), the call falls back
    to the layers one by one."""

    def __init__(self, mods: list[QLinear], p: object, views: list[object]) -> None:
        self.mods, self.p, self.views = mods, p, views
        self.backend = mods[0].backend
        self.sizes = [m.out_features for m in mods]

    def valid(self) -> bool:
        """Whether every layer still computes with its view of the stack."""
        return all(m.prepared() is v for m, v in zip(self.mods, self.views, strict=True))

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        if not self.valid():
            return [m(x) for m in self.mods]
        lead = x.shape[:-1]
        y = self.backend.qmatmul(x.reshape(-1, x.shape[-1]), self.p)
        return [t.reshape(*lead, t.shape[-1]) for t in y.to(x.dtype).split(self.sizes, -1)]


def fuse(mods: list[nn.Module]) -> Fused | None:
    """One Fused call for bias-free QLinears of one backend, where it stacks them."""
    if not all(isinstance(m, QLinear) and m.bias is None and m.backend is mods[0].backend
               for m in mods):
        return None
    got = mods[0].backend.fuse([m.prepared() for m in mods])  # type: ignore[union-attr]
    if got is None:
        return None
    p, views = got
    for m, v in zip(mods, views, strict=True):
        m.use_prepared(v)
    return Fused(mods, p, views)  # type: ignore[arg-type]
