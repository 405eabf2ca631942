"""Which scheme each tensor gets: the default recipe and per-tensor overrides.

Default (bits B, group size G; B = 4 and G = 32 unless asked):
  decoder linears  layers.*.attention.w{q,k,v,o}.weight, layers.*.feed_forward.w{1,2,3}.weight
                   → intB-gG
  output.weight, tok_embeddings.weight → int8-gG (the head and the table are ~10% of the
                   weights and the most sensitive ones: int8 costs ~4% more disk than int4)
  vision_encoder.*, vision_language_adapter.* → bfloat16
  norms (any *norm.weight, ln_pre) and everything else → unchanged (the source's dtype)

Overrides are `PATTERN=VALUE` (fnmatch over Mistral tensor names, applied in order, the last
match wins), VALUE one of bf16 / float32 / float16 / keep / int4[-gN] / int8[-gN]. A quantized
VALUE applies only to 2-D `.weight` tensors (so `layers.0.*=int8` leaves that layer's norms
alone); an override that applies to no tensor at all is an error (a typo would otherwise pass
silently). When the group size was not given explicitly and does not divide a weight's
in-features, the largest supported one that does is used (a weight no group size divides
stays in bfloat16); an explicit `-gN` that does not divide is an error.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from pixlocal.errors import FormatError
from pixlocal.qformat import DECODER_LINEAR, GROUP_SIZES, HEAD_TENSORS, QuantSpec

FLOATS = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "float32": torch.float32,
          "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16}

# What a tensor becomes: a QuantSpec, a float dtype to cast to, or None (kept as stored)
Target = QuantSpec | torch.dtype | None


@dataclass(frozen=True)
class Override:
    pattern: str
    value: str  # as written: "bf16", "keep", "int8", "int4-g64" …
    target: Target
    strict_group: bool  # the value named its group size

    @classmethod
    def parse(cls, text: str, group_size: int) -> Override:
        pattern, eq, value = text.partition("=")
        pattern, value = pattern.strip(), value.strip().lower()
        if not eq or not pattern or not value:
            raise FormatError(f"override {text!r}: expected PATTERN=VALUE, e.g. "
                              "'vision_encoder.*=bf16' or 'layers.0.*=int8-g64'")
        if value == "keep":
            return cls(pattern, value, None, False)
        if value in FLOATS:
            return cls(pattern, value, FLOATS[value], False)
        m = re.fullmatch(r"int(\d+)(?:-g(\d+))?", value)
        if m is None:
            raise FormatError(f"override {text!r}: unknown value {value!r} (use bf16, float32, "
                              "float16, keep, int4[-gN] or int8[-gN])")
        spec = QuantSpec(int(m[1]), int(m[2]) if m[2] else group_size)
        return cls(pattern, value, spec, m[2] is not None)


@dataclass
class Recipe:
    bits: int = 4
    group_size: int | None = None  # None: each scheme's default (32)
    overrides: list[Override] = field(default_factory=list)

    @classmethod
    def build(cls, bits: int = 4, group_size: int | None = None,
              overrides: Iterable[str] = ()) -> Recipe:
        QuantSpec.default(bits)  # FormatError for bits other than 4 or 8
        if group_size is not None:
            QuantSpec(bits, group_size)  # FormatError for an unsupported group size
        g = group_size or QuantSpec.default(bits).group_size
        return cls(bits, group_size, [Override.parse(o, g) for o in overrides])

    @property
    def default_spec(self) -> QuantSpec:
        g = self.group_size or QuantSpec.default(self.bits).group_size
        return QuantSpec(self.bits, g)

    def default_target(self, name: str) -> Target:
        last = name.rsplit(".", 2)[-2] if name.count(".") else name
        if last.endswith("norm") or last == "ln_pre":
            return None
        if name.startswith(("vision_encoder.", "vision_language_adapter.")):
            return torch.bfloat16
        g = self.default_spec.group_size
        if DECODER_LINEAR.fullmatch(name):
            return self.default_spec
        if name in HEAD_TENSORS:
            return QuantSpec(8, g)
        return None

    def plan(self, tensors: list[tuple[str, tuple[int, ...]]]) -> dict[str, Target]:
        """Target of every (name, shape); FormatError for an override that fits nothing."""
        out: dict[str, Target] = {}
        used = [False] * len(self.overrides)
        for name, shape in tensors:
            target = self._fit(name, shape, self.default_target(name), strict=False)
            for i, o in enumerate(self.overrides):
                if not fnmatch.fnmatchcase(name, o.pattern):
                    continue
                if isinstance(o.target, QuantSpec) and not _quantizable(name, shape):
                    continue
                target, used[i] = self._fit(name, shape, o.target, o.strict_group), True
            out[name] = target
        for o, u in zip(self.overrides, used, strict=True):
            if not u:
                raise FormatError(f"override '{o.pattern}={o.value}' matches no "
                                  f"{'2-D weight' if isinstance(o.target, QuantSpec) else 'tensor'}"
                                  " of the checkpoint (patterns match names like "
                                  "'layers.0.attention.wq.weight')")
        return out

    @staticmethod
    def _fit(name: str, shape: tuple[int, ...], target: Target, strict: bool) -> Target:
        if not isinstance(target, QuantSpec) or shape[1] % target.group_size == 0:
            return target
        if strict:
            raise FormatError(f"{name}: in-features {shape[1]} is not a multiple of the group "
                              f"size in {target.name}")
        fits = [g for g in GROUP_SIZES if g <= target.group_size and shape[1] % g == 0]
        return QuantSpec(target.bits, max(fits)) if fits else torch.bfloat16


def _quantizable(name: str, shape: tuple[int, ...]) -> bool:
    return name.endswith(".weight") and len(shape) == 2


def describe(target: Target, src_dtype: torch.dtype) -> str:
    """A short label of what a tensor became: 'int4-g32', 'bfloat16', 'float32'."""
    if isinstance(target, QuantSpec):
        return target.name
    return str(src_dtype if target is None else target).removeprefix("torch.")


def kind_of(name: str) -> str:
    """The summary row a tensor is counted in."""
    last = name.rsplit(".", 2)[-2] if name.count(".") else name
    if name.startswith("vision_encoder."):
        return "vision encoder"
    if name.startswith("vision_language_adapter."):
        return "vision adapter"
    if last.endswith("norm") or last == "ln_pre":
        return "norms"
    if ".attention." in name:
        return "attention"
    if ".feed_forward." in name:
        return "feed-forward"
    if name.startswith("tok_embeddings."):
        return "embeddings"
    if name.startswith("output."):
        return "output head"
    return "other"
