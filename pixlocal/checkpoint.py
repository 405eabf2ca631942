"""A model directory's tensors, by native Mistral name, one tensor at a time.

Formats:
  mistral   consolidated.safetensors or consolidated-*.safetensors (+ params.json, tekken.json)
  hf        model.safetensors or model-*.safetensors + model.safetensors.index.json
            (Llava names; q/k rows permuted for rotate-half RoPE, un-permuted here)
  pixlocal  quantized.index.json + quantized-NNNNN-of-NNNNN.safetensors (+ params.json,
            tekken.json), written by `pixlocal quantize`; Mistral names, quantized weights as
            `{module}.qweight/.scales/.zeros` (pixlocal.qformat). The kind is decided by the
            `format` in the index's and the shards' metadata, never by a file name alone.
Files are memory-mapped (pixlocal.shards); nothing is read until a tensor is asked for.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from .config import PixtralArgs
from .errors import FormatError, ModelNotFound
from .integrity import check_once
from .qformat import FORMAT_NAME, SUFFIXES, QTensor, read_metadata
from .shards import SafetensorsFile

QUANT_INDEX = "quantized.index.json"


def quant_shard_name(i: int, n: int) -> str:
    """File name of shard i (0-based) of n in a pixlocal quantized dir."""
    return f"quantized-{i + 1:05d}-of-{n:05d}.safetensors"

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
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def permute_from_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rotate-half rows (HF) -> interleaved-pair rows (Mistral), per head."""
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


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

    def release(self, name: str) -> None:
        """Drop the tensor's mapped pages from this process (see SafetensorsFile.release)."""
        f, key = self._where[name]
        f.release(key)

    def quantized(self) -> list[str]:
        """Module names whose weight is stored quantized (`{module}.qweight` present)."""
        return [n[: -len(".qweight")] for n in self._where if n.endswith(".qweight")]

    def qtensor(self, module: str) -> QTensor:
        """The quantized weight of `module`, zero-copy views of the mapped shard."""
        parts = {f"{module}.{p}": self.get(f"{module}.{p}")
                 for p in SUFFIXES if f"{module}.{p}" in self}
        try:
            return QTensor.from_tensors(module, parts)
        except FormatError as e:
            raise FormatError(f"{self.file_of(module + '.qweight')}: {e}") from None


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


def read_quant_index(model_dir: Path) -> dict:
    """The index of a quantized dir, checked: metadata (format, format_version), every shard
    present with the size the index records. Checksums: integrity.check_once, at open."""
    index = model_dir / QUANT_INDEX
    try:
        d = json.loads(index.read_text())
        md, shards, weight_map = d["metadata"], d["shards"], d["weight_map"]
        sizes = {str(k): int(v["size"]) for k, v in shards.items()}
        if not (isinstance(weight_map, dict) and isinstance(md, dict) and all(
                isinstance(v, str) for v in [*weight_map.values(), *md.values()])):
            raise TypeError
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError,
            ValueError, AttributeError):
        raise FormatError(f"{index}: unreadable quantized index (expected JSON with metadata, "
                          "shards and weight_map); re-run `pixlocal quantize`") from None
    read_metadata(md, str(index))
    unknown = sorted(set(weight_map.values()) - set(sizes))
    if unknown:
        raise FormatError(f"{index}: weight_map names shard {unknown[0]} that is not in its "
                          "shard list")
    for name, size in sorted(sizes.items()):
        p = model_dir / name
        if "/" in name or not p.is_file():
            raise FormatError(f"{p}: missing shard listed in {QUANT_INDEX}; re-download or "
                              "re-quantize the model")
        got = p.stat().st_size
        if got != size:
            raise FormatError(f"{p}: {got} bytes but {QUANT_INDEX} says {size}: "
                              f"{'truncated' if got < size else 'corrupt'}; re-quantize")
    return d


def _open_quantized(model_dir: Path, args: PixtralArgs) -> Checkpoint:
    d = read_quant_index(model_dir)
    files = [SafetensorsFile(model_dir / n) for n in sorted(d["shards"])]
    for f in files:
        read_metadata(f.metadata, str(f.path))
    check_once(model_dir, d["shards"])  # sha256, on the first load of these files only
    return Checkpoint("pixlocal", files, args)


def open_checkpoint(model_dir: Path, args: PixtralArgs) -> Checkpoint:
    """Find the weights in a model directory and open them lazily."""
    if not model_dir.is_dir():
        raise ModelNotFound(f"{model_dir}: model directory not found")
    if (model_dir / QUANT_INDEX).is_file():
        return _open_quantized(model_dir, args)
    mistral = sorted(model_dir.glob("consolidated*.safetensors"))
    index = model_dir / "model.safetensors.index.json"
    hf = [] if mistral else _index_files(model_dir, index) if index.is_file() else sorted(
        model_dir.glob("model*.safetensors"))
    files = [SafetensorsFile(p) for p in mistral or hf or sorted(model_dir.glob("*.safetensors"))]
    for f in files:  # facts come from metadata: a pixlocal shard whatever its name
        if f.metadata.get("format") == FORMAT_NAME:
            raise FormatError(f"{f.path}: a pixlocal quantized shard, but {model_dir} lacks "
                              f"its {QUANT_INDEX}: incomplete copy; re-quantize")
    if mistral or hf:
        return Checkpoint("mistral" if mistral else "hf", files, args)
    raise FormatError(f"{model_dir}: no weights (expected consolidated.safetensors or "
                      "model-*.safetensors)")


def tokenizer_path(model_dir: Path, kind: str) -> Path:
    """The model's tekken.json; an HF dir without one uses mistral-common's Pixtral file."""
    p = model_dir / "tekken.json"
    if p.is_file():
        return p
    if kind != "hf":
        raise FormatError(f"{model_dir}: missing tekken.json (the tokenizer)")
    import mistral_common
    return Path(mistral_common.__file__).parent / "data" / "tekken_240911.json"
