"""Model directory -> ready PixtralModel: config, modules on meta, weights, device.

Weights are never all in RAM at once: modules are built on the meta device and each
parameter is assigned from the memory-mapped checkpoint. When the stored dtype is the
wanted one the parameter *is* the mapped file (zero-copy, paged in on first use).

A pixlocal quantized dir (checkpoint.py) loads the same way: every nn.Linear whose
`{name}.qweight` is stored becomes a QLinear and an nn.Embedding a QEmbedding, their buffers
the mapped shard tensors themselves. A backend that repacks (cpu: interleaved row blocks;
cuda: tinygemm) does so in `prepare_quantized`, which then drops the file's mapped pages the
repacked copy replaces, so the weights are resident once. Opening checks the index, the
metadata (format_version) and each shard's presence and size; it does not hash 8 GB of shards
on every load: `pixlocal verify DIR` checks the sha256 checksums.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from . import kernels
from .checkpoint import Checkpoint, open_checkpoint
from .config import PixtralArgs, read_args
from .errors import FormatError, ModelNotFound, PixlocalError
from .layers import FeedForward
from .model import Attention, FusedDecode, PixtralModel
from .qembedding import QEmbedding
from .qlinear import QLinear, fuse

DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float32": torch.float32,
          "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16}


# float32 compute on a CPU keeps these in their 16-bit file dtype, memory-mapped (CastLinear
# casts them as used): the vision encoder stays 0.87 GB on disk, not 1.74 GB of RAM, and is
# paged in only when an image comes
_NARROW_OK = ("vision_encoder.", "vision_language_adapter.")


def parse_dtype(dtype: str | torch.dtype, device: str | torch.device = "cpu") -> torch.dtype:
    """A dtype name → torch dtype; "auto" is bfloat16 on a GPU or on a CPU that multiplies it
    natively (kernels.native_bf16), else float32 (5x faster GEMMs there, at twice the bytes
    for the weights kept unquantized, e.g. the vision encoder, and for the KV cache)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        gpu = parse_device(device).type != "cpu"
        return torch.bfloat16 if gpu or kernels.native_bf16() else torch.float32
    try:
        return DTYPES[dtype]
    except KeyError:
        raise PixlocalError(f"unknown dtype {dtype!r} (choose from auto, "
                            f"{', '.join(sorted(DTYPES))})") from None


def parse_device(device: str | torch.device) -> torch.device:
    d = torch.device("cuda" if str(device) == "auto" and torch.cuda.is_available() else
                     "cpu" if str(device) == "auto" else device)
    if d.type == "cuda" and not torch.cuda.is_available():
        raise PixlocalError("--device cuda: no CUDA device is available (torch "
                            f"{torch.__version__} sees none); use --device cpu")
    if d.type not in ("cpu", "cuda"):
        raise PixlocalError(f"unsupported device {device!r} (choose cpu, cuda or auto)")
    return d


def resolve_dir(path: str | Path) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise ModelNotFound(f"{p}: model directory not found")
    if not p.is_dir():
        raise ModelNotFound(f"{p}: not a directory (a model is a directory with params.json "
                            "or config.json and safetensors weights)")
    return p


def default_backend(device: torch.device) -> str:
    """The qmatmul backend for `device`: kernels.default_backend if the kernels provide one."""
    pick = getattr(kernels, "default_backend", None)
    return pick(device) if pick is not None else "ref"


def _swap_quantized(model: PixtralModel, ckpt: Checkpoint, dev: torch.device, dt: torch.dtype,
                    model_dir: Path) -> set[str]:
    """Replace the modules stored quantized; returns the checkpoint names they consumed."""
    modules = dict(model.named_modules())
    backend, used = default_backend(dev), set()
    for name in ckpt.quantized():
        mod = modules.get(name)
        if not isinstance(mod, (nn.Linear, nn.Embedding)):
            raise FormatError(f"{ckpt.file_of(name + '.qweight')}: quantized tensor "
                              f"{name + '.qweight'!r} matches no linear or embedding layer of "
                              f"the model {_config_name(model_dir)} describes")
        q = ckpt.qtensor(name)
        want = tuple(mod.weight.shape)
        if q.shape != want:
            raise FormatError(f"{ckpt.file_of(name + '.qweight')}: quantized {name!r} is "
                              f"{list(q.shape)}, {_config_name(model_dir)} implies {list(want)}")
        q.qweight, q.scales = q.qweight.to(dev), q.scales.to(dev)
        q.zeros = None if q.zeros is None else q.zeros.to(dev)
        used |= {f"{name}.{p}" for p in ("qweight", "scales", "zeros")}
        if isinstance(mod, nn.Embedding):
            new: nn.Module = QEmbedding(q, dtype=dt)
        else:
            bias = ckpt.get(f"{name}.bias").to(dev, dt) if mod.bias is not None else None
            new = QLinear.from_qtensor(q, bias=bias, backend=backend)
            used.add(f"{name}.bias")
        parent, _, leaf = name.rpartition(".")
        setattr(modules[parent] if parent else model, leaf, new)
    return used


def prepare_quantized(model: nn.Module, ckpt: Checkpoint) -> None:
    """Repack every QLinear on the CPU for its backend now, not at its first token; drop the
    mapped pages of the stored tensors a cpu repack copied (they reload from the file if
    touched): RSS holds each weight once, not twice. Then stacks wq/wk/wv and w1/w3 where
    the backend can (qlinear.fuse): one kernel call each per token; and where every layer
    is so stacked, decode runs a layer per kernel call (model.FusedDecode)."""
    for name, mod in model.named_modules():
        if isinstance(mod, QLinear) and mod.qweight.device.type == "cpu":
            mod.prepared()
            if mod.backend == "cpu":
                for part in ("qweight", "scales", "zeros"):
                    if f"{name}.{part}" in ckpt:
                        ckpt.release(f"{name}.{part}")
    for mod in model.modules():
        if isinstance(mod, Attention):
            mod.qkv = fuse([mod.wq, mod.wk, mod.wv])
        elif isinstance(mod, FeedForward):
            mod.w13 = fuse([mod.w1, mod.w3])
    if isinstance(model, PixtralModel):
        model.fused_decode = FusedDecode(model)


def load_model(path: str | Path, device: str | torch.device = "cpu",
               dtype: str | torch.dtype = "auto") -> tuple[PixtralModel, Checkpoint]:
    model_dir = resolve_dir(path)
    dt, dev = parse_dtype(dtype, device), parse_device(device)
    args = read_args(model_dir)
    ckpt = open_checkpoint(model_dir, args)
    with torch.device("meta"):
        model = PixtralModel(args)
    used = _swap_quantized(model, ckpt, dev, dt, model_dir) if ckpt.kind == "pixlocal" else set()
    state = {}
    for name, p in model.state_dict().items():
        if name in used:
            continue
        if name not in ckpt:
            raise FormatError(f"{model_dir}: checkpoint lacks tensor {name!r} that "
                              f"{_config_name(model_dir)} calls for")
        shape = ckpt.shape(name)
        if shape != tuple(p.shape):
            raise FormatError(f"{ckpt.file_of(name)}: tensor {name!r} has shape {list(shape)}, "
                              f"{_config_name(model_dir)} implies {list(p.shape)}")
        if not ckpt.dtype(name).is_floating_point:  # would be cast to garbage weights
            raise FormatError(f"{ckpt.file_of(name)}: tensor {name!r} is stored as "
                              f"{ckpt.dtype(name)}, not a float type: corrupt header")
        stored = ckpt.get(name)
        keep = (name.startswith(_NARROW_OK) and dt == torch.float32 and dev.type == "cpu"
                and stored.dtype in (torch.bfloat16, torch.float16))
        state[name] = stored.to(device=dev, dtype=stored.dtype if keep else dt)
        if state[name].data_ptr() != stored.data_ptr():  # a converted copy: free the pages
            ckpt.release(name)
    extra = sorted(set(ckpt.names()) - set(state) - used)
    if extra:
        raise FormatError(f"{ckpt.file_of(extra[0])}: unexpected tensor {extra[0]!r} "
                          f"(params and weights disagree; {len(extra)} unexpected in all)")
    model.load_state_dict(state, assign=True, strict=False)
    missing = [k for k in model.state_dict() if k not in state and k not in used]
    assert not missing, missing  # every key was either loaded or swapped in above
    model.requires_grad_(False)
    model.compute_dtype = dt
    return model.eval(), ckpt


def _config_name(model_dir: Path) -> str:
    return "params.json" if (model_dir / "params.json").is_file() else "config.json"


def args_of(path: str | Path) -> PixtralArgs:
    return read_args(resolve_dir(path))
