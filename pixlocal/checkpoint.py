"""A model directory's tensors, by native Mistral name, one tensor at a time.

Formats:
  mistral   consolidated.safetensors or consolidated-*.safetensors (+ params.json, tekken.json)
  hf        model.safetensors or model-*.safetensors + model.safetensors.index.json
            (Llava names; q/k rows permuted for rotate-half RoPE, un-permuted here)
Files are memory-mapped (pixlocal.shards); nothing is read until a tensor is asked for.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from .config import PixtralArgs
from .errors import FormatError, ModelNotFound
from .shards import SafetensorsFile

# HF (Llava + Pixtral) name fragments <-> Mistral name fragments, within each part
_TEXT_PAIRS = [
    (".embed_tokens.", ".tok_embeddings."), (".input_layernorm.", ".attention_norm."),
    (".post_attention_layernorm.", ".ffn_norm."),
    (".self_attn.q_proj.", ".attention.wq."), (".self_attn.k_proj.", ".attention.wk."),
    (".self_attn.v_proj.", ".attention.wv."), (".self_attn.o_proj.", ".attention.wo."),
    (".mlp.gate_proj.", ".feed_forward.w1."), (".mlp.down_proj.", ".feed_forward.w2."),
    (".mlp.up_proj.", ".feed_forward.w3."),
]
_VISION_PAIRS = [
    (".attention.q_proj.", ".attention.wq."), (".attention.k_proj.", ".attention.wk."),
    (".attention.v_proj.", ".attention.wv."), (".attention.o_proj.", ".attention.wo."),
    (".feed_forward.gate_proj.", ".feed_forward.w1."),
    (".feed_forward.down_proj.", ".feed_forward.w2."),
    (".feed_forward.up_proj.", ".feed_forward.w3."),
]
# (HF prefix pattern, Mistral prefix, fragment table); the first pattern is what
# mistral-community/pixtral-12b stores, the (?:model.) forms are what newer transformers save
_PARTS = [
    (r"(?:language_model\.lm_head|lm_head)\.", "output.", [], "language_model.lm_head."),
    (r"(?:language_model\.model|model\.language_model)\.", "", _TEXT_PAIRS,
     "language_model.model."),
    (r"(?:model\.)?vision_tower\.", "vision_encoder.", _VISION_PAIRS, "vision_tower."),
    (r"(?:model\.)?multi_modal_projector\.linear_1\.", "vision_language_adapter.w_in.", [],
     "multi_modal_projector.linear_1."),
    (r"(?:model\.)?multi_modal_projector\.linear_2\.", "vision_language_adapter.w_out.", [],
     "multi_modal_projector.linear_2."),
]


def _swap(rest: str, pairs: list[tuple[str, str]], forward: bool) -> str:
    s = "." + rest
    for hf, mi in pairs:
        a, b = (hf, mi) if forward else (mi, hf)
        if a in s:
            return s.replace(a, b, 1)[1:]
    return rest


def hf_to_mistral_name(name: str) -> str | None:
    """The Mistral name of an HF tensor name, or None for a name Pixtral has no use for."""
    for pat, prefix, pairs, _ in _PARTS:
        m = re.match(pat, name)
        if m:
            return prefix + _swap(name[m.end():], pairs, True)
    return None


def mistral_to_hf_name(name: str) -> str:
    """Inverse of hf_to_mistral_name, giving mistral-community/pixtral-12b's stored names."""
    for _, prefix, pairs, hf_prefix in _PARTS:
        if prefix and name.startswith(prefix):
            return hf_prefix + _swap(name[len(prefix):], pairs, False)
    return "language_model.model." + _swap(name, _TEXT_PAIRS, False)


def permute_to_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Interleaved-pair rows (Mistral) -> rotate-half rows (HF), per head. w: (n_heads*d, in)."""
    rows, cols = w.shape
    d = rows // n_heads
    return w.view(n_heads, d // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def permute_from_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rotate-half rows (HF) -> interleaved-pair rows (Mistral), per head."""
    rows, cols = w.shape
    d = rows // n_heads
    return w.view(n_heads, 2, d // 2, cols).transpose(1, 2).reshape(rows, cols)


def rope_heads(name: str, args: PixtralArgs) -> int | None:
    """How many RoPE heads the rows of a q/k weight hold; None for every other tensor."""
    if name.endswith("attention.wq.weight") or name.endswith("attention.wk.weight"):
        if name.startswith("vision_encoder."):
            assert args.vision_encoder is not None
            return args.vision_encoder.num_attention_heads
        return args.n_heads if name.endswith("wq.weight") else args.n_kv_heads
    return None


class Checkpoint:
    """Tensors of one model directory under their Mistral names."""

    def __init__(self, kind: str, files: list[SafetensorsFile], args: PixtralArgs):
        self.kind, self.files, self.args = kind, files, args
        self._where: dict[str, tuple[SafetensorsFile, str]] = {}
        for f in files:
            for key in f.keys():
                name = hf_to_mistral_name(key) if kind == "hf" else key
                if name is None:
                    continue
                if name in self._where:
                    raise FormatError(f"{f.path}: tensor {key!r} also appears in "
                                      f"{self._where[name][0].path.name}")
                self._where[name] = (f, key)
        self.metadata = files[0].metadata if files else {}

    def names(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def shape(self, name: str) -> tuple[int, ...]:
        f, key = self._where[name]
        return f.shape(key)

    def dtype(self, name: str) -> torch.dtype:
        f, key = self._where[name]
        return f.dtype(key)

    def file_of(self, name: str) -> Path:
        return self._where[name][0].path

    def get(self, name: str) -> torch.Tensor:
        """The tensor in native layout; a zero-copy view unless HF q/k needed un-permuting."""
        f, key = self._where[name]
        t = f.get(key)
        heads = rope_heads(name, self.args) if self.kind == "hf" else None
        return permute_from_hf(t, heads) if heads else t


def _index_files(model_dir: Path, index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
        raise FormatError(f"{index}: unreadable index (expected JSON with a weight_map)") from None
    names = sorted(set(weight_map.values()))
    missing = [n for n in names if not (model_dir / n).is_file()]
    if missing:
        raise FormatError(f"{model_dir}: missing shard {missing[0]} listed in {index.name}"
                          + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    return [model_dir / n for n in names]


def open_checkpoint(model_dir: Path, args: PixtralArgs) -> Checkpoint:
    """Find the weights in a model directory and open them lazily."""
    if not model_dir.is_dir():
        raise ModelNotFound(f"{model_dir}: model directory not found")
    mistral = sorted(model_dir.glob("consolidated*.safetensors"))
    if mistral:
        return Checkpoint("mistral", [SafetensorsFile(p) for p in mistral], args)
    index = model_dir / "model.safetensors.index.json"
    hf = _index_files(model_dir, index) if index.is_file() else sorted(
        model_dir.glob("model*.safetensors"))
    if hf:
        return Checkpoint("hf", [SafetensorsFile(p) for p in hf], args)
    raise FormatError(f"{model_dir}: no weights (expected consolidated.safetensors or "
                      "model-*.safetensors)")


def tokenizer_path(model_dir: Path, kind: str) -> Path:
    """The model's tekken.json; an HF dir without one uses mistral-common's Pixtral file."""
    p = model_dir / "tekken.json"
    if p.is_file():
        return p
    if kind == "mistral":
        raise FormatError(f"{model_dir}: missing tekken.json (the tokenizer)")
    import mistral_common
    return Path(mistral_common.__file__).parent / "data" / "tekken_240911.json"
