"""The one forward-only load: model directory → a model built in place, ready to run.

    args (params.json) → plan (placement.plan, from the checkpoint headers: which part on
    which device) → modules on the meta device → each weight read onto its part's device;
    each QLinear built with its part's Backend and prepared there, now (cpu: interleaved
    row blocks; cuda: tinygemm's packing) → qkv and w1/w3 stacked (qlinear.fuse) → each
    layer given its backend's attention op → device boundaries (placement) → the backend's
    whole-layer decode where it applies (fastdecode: with a partial offload, the CPU layers)

A part computes in its backend's dtype for the load dtype (Backend.compute_dtype): on a GPU
below compute capability 8.0 a bfloat16 load puts the vision encoder and adapter in float16
(their inputs are cast on the way in); the decoder's residual stream and KV cache keep the
load dtype, its GEMMs and attention cast to float16 per call (kernels/cuda.py). `max_vram`
also caps torch's allocator on the GPU (backend.limit_vram), not the plan alone.

Weights are never all in RAM at once: each parameter is assigned from the memory-mapped
checkpoint. When the stored dtype and device are the wanted ones the parameter *is* the mapped
file (zero-copy, paged in on first use). A pixlocal quantized dir (checkpoint.py) loads the
same way: every nn.Linear whose `{name}.qweight` is stored becomes a QLinear and an
nn.Embedding a QEmbedding. Where a backend copied a weight (Backend.copies_weights) the
file's mapped pages are released (they reload from the file if touched), and a copy moved to
a device is emptied: weights are resident once. Opening checks the index, the metadata
(format_version) and each shard's presence and size; it does not hash 8 GB of shards on
every load: integrity.check_once hashes the shards on their first load only.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import kernels
from .checkpoint import Checkpoint, open_checkpoint
from .config import DEFAULT_CONTEXT, read_args
from .errors import FormatError, ModelNotFound, PixlocalError
from .fastdecode import FastDecode, build
from .kernels.backend import (
    Backend,
    for_device,
    free_vram,
    get,
    is_gpu,
    limit_vram,
    parse_device,
)
from .layers import FeedForward
from .memory import checkpoint_bytes, image_tokens
from .model import Attention, PixtralModel
from .placement import GPU, GpuLayers, Plan, insert_boundaries, part_of, plan
from .qembedding import QEmbedding
from .qformat import SUFFIXES
from .qlinear import QLinear, fuse

DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float32": torch.float32,
          "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16}
CPU = torch.device("cpu")

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
        return torch.bfloat16 if is_gpu(parse_device(device)) or kernels.native_bf16() \
            else torch.float32
    try:
        return DTYPES[dtype]
    except KeyError:
        raise PixlocalError(f"unknown dtype {dtype!r} (choose from auto, "
                            f"{', '.join(sorted(DTYPES))})") from None


def resolve_dir(path: str | Path) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise ModelNotFound(f"{p}: model directory not found")
    if not p.is_dir():
        raise ModelNotFound(f"{p}: not a directory (a model is a directory with params.json "
                            "or config.json and safetensors weights)")
    return p


@dataclass
class Loaded:
    """What `load` built: the model, its checkpoint (mapped), the plan it follows, the
    compute dtype and the decode fast path (None where it does not apply)."""
    model: PixtralModel
    checkpoint: Checkpoint
    plan: Plan
    dtype: torch.dtype
    devices: dict[str, torch.device]  # plan part → the device it was built on
    fast_decode: FastDecode | None


def load(path: str | Path, device: str | torch.device = "auto",
         dtype: str | torch.dtype = "auto", *, context_len: int = DEFAULT_CONTEXT,
         gpu_layers: GpuLayers = "auto", max_vram: int | None = None,
         max_image_size: int | None = None, prepare: bool = True,
         gpu: torch.device | str | None = None, gpu_free: int | None = None,
         backends: Mapping[str, str] | None = None) -> Loaded:
    """Load a model directory (module docstring). device "auto" is CUDA when present; there
    the plan puts as many decoder layers on the GPU as fit (`gpu_layers`, `max_vram`, a KV
    cache for `context_len` tokens), the rest on the CPU. `prepare=False` leaves each weight
    to be prepared at its first use (a load that only checks names and shapes).

    For tests, the GPU side of a plan can be any device: `gpu` (its device; default the
    CUDA device), `gpu_free` (the free bytes the plan assumes) and `backends` (plan device
    kind → backend name, e.g. {"cuda": "cuda", "cpu": "ref"}: the cuda backend's CPU twins)."""
    model_dir = resolve_dir(path)
    dev = parse_device(device)
    dt = parse_dtype(dtype, dev)
    args = read_args(model_dir)
    ckpt = open_checkpoint(model_dir, args)
    gpu_dev = torch.device(gpu) if gpu is not None else dev
    free = gpu_free if gpu_free is not None else free_vram(dev)
    gpu_backend = (get(backends[GPU]) if backends and GPU in backends
                   else for_device(gpu_dev) if free is not None else None)
    p = plan(args, checkpoint_bytes(ckpt, dt), free, min(context_len, args.max_seq_len),
             image_tokens(args, max_image_size), gpu_layers, max_vram, dt.itemsize,
             gpu_backend is not None and gpu_backend.int4_pairs(gpu_dev))
    if max_vram is not None and p.free_vram is not None and is_gpu(gpu_dev):
        limit_vram(gpu_dev, max_vram)
    devices = {part: gpu_dev if p.on_gpu(part) else CPU for part in p.devices}
    chosen: dict[str, Backend] = {
        part: get(backends[p.devices[part]]) if backends and p.devices[part] in backends
        else for_device(devices[part]) for part in p.devices}
    dtypes = dict.fromkeys(p.devices, dt)  # the decoder's GPU layers cast per call instead
    if "vision" in p.devices:
        dtypes["vision"] = chosen["vision"].compute_dtype(devices["vision"], dt)
    with torch.device("meta"):
        model = PixtralModel(args)
    used = (_swap_quantized(model, ckpt, devices, chosen, dt, model_dir, prepare)
            if ckpt.kind == "pixlocal" else set())
    _assign(model, ckpt, devices, dtypes, model_dir, used)
    if "vision" in dtypes and dtypes["vision"] != dt:  # images come in the load dtype
        model.vision_encoder.register_forward_pre_hook(_images_to(dtypes["vision"]))
    for i, blk in enumerate(model.layers):
        blk.attention.attend = chosen[f"layers.{i}"].attention
    for mod in model.modules() if prepare else ():  # one kernel call for wq/wk/wv, w1/w3
        if isinstance(mod, Attention):
            mod.qkv = fuse([mod.wq, mod.wk, mod.wv]) or mod.qkv
        elif isinstance(mod, FeedForward):
            mod.w13 = fuse([mod.w1, mod.w3]) or mod.w13
    insert_boundaries(model, devices)
    model.requires_grad_(False)
    return Loaded(model.eval(), ckpt, p, dt, devices, build(model) if prepare else None)


def _swap_quantized(model: PixtralModel, ckpt: Checkpoint, devices: dict[str, torch.device],
                    backends: dict[str, Backend], dt: torch.dtype, model_dir: Path,
                    prepare: bool) -> set[str]:
    """Replace the modules stored quantized, each built on its device with its backend and
    prepared there; returns the checkpoint names they consumed."""
    modules = dict(model.named_modules())
    used = set()
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
        part = part_of(name + ".weight")
        dev = devices[part]
        stored = q.qweight
        q.qweight, q.scales = q.qweight.to(dev), q.scales.to(dev)
        q.zeros = None if q.zeros is None else q.zeros.to(dev)
        stored_names = [f"{name}.{s}" for s in SUFFIXES if f"{name}.{s}" in ckpt]
        used |= set(stored_names) | {f"{name}.bias"}
        moved = q.qweight is not stored
        if isinstance(mod, nn.Embedding):
            new: nn.Module = QEmbedding(q, dtype=dt)
        else:
            bias = ckpt.get(f"{name}.bias").to(dev, dt) if mod.bias is not None else None
            new = ql = QLinear.from_qtensor(q, bias=bias, backend=backends[part])
            if prepare and ql.prepare() and ql.backend.copies_weights:
                if moved:
                    ql.drop_source()  # the device holds the backend's copy only
                moved = True
        if moved:  # the file's pages are copied: drop them from this process
            for n in stored_names:
                ckpt.release(n)
        parent, _, leaf = name.rpartition(".")
        setattr(modules[parent] if parent else model, leaf, new)
    return used


def _images_to(dtype: torch.dtype):  # noqa: ANN202
    def cast(_mod: nn.Module, args: tuple) -> tuple:  # (images,)
        return ([img.to(dtype) for img in args[0]],)
    return cast


def _assign(model: PixtralModel, ckpt: Checkpoint, devices: dict[str, torch.device],
            dtypes: dict[str, torch.dtype], model_dir: Path, used: set[str]) -> None:
    """Every other tensor, read onto its part's device in its part's dtype."""
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
        dev, dt = devices[part_of(name)], dtypes[part_of(name)]
        keep = (name.startswith(_NARROW_OK) and dt == torch.float32 and not is_gpu(dev)
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


def load_model(path: str | Path, device: str | torch.device = "cpu",
               dtype: str | torch.dtype = "auto") -> tuple[PixtralModel, Checkpoint]:
    """The model and its checkpoint, weights unprepared (quant/verify checks names and
    shapes with it)."""
    r = load(path, device, dtype, prepare=False)
    return r.model, r.checkpoint


def _config_name(model_dir: Path) -> str:
    return "params.json" if (model_dir / "params.json").is_file() else "config.json"
