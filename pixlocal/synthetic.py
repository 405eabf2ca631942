"""Random-weight Pixtral checkpoints in the real on-disk formats, for tests and benchmarks.

    python -m pixlocal.synthetic OUT --preset tiny|pixtral-12b [--layers N] [--vision-layers N]
        [--format mistral|hf] [--dtype bfloat16|float32] [--seed S]

Names, shapes and layout are exactly those of the official files (Mistral: params.json,
consolidated.safetensors, tekken.json; HF: config.json, model-*.safetensors + index, q/k rows
permuted). Values are deterministic in (seed, tensor name) and scaled so activations stay
O(1) through the network: linears ~ N(0, 1/fan_in), norms ~ 1 + N(0, 0.1²), biases small.
Tensors are generated and written in chunks of rows, so a 25 GB checkpoint streams through a
few hundred MB of RAM. Output goes to OUT.tmp-* and is renamed to OUT when complete.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
import zlib
from pathlib import Path

import torch

from .checkpoint import mistral_to_hf_name, permute_to_hf, rope_heads
from .config import PixtralArgs
from .model import PixtralModel
from .shards import StreamingWriter

_CHUNK = 1 << 24  # elements generated at once (64 MB of float32)
_HF_SHARD_BYTES = 5 << 30


def tensor_specs(args: PixtralArgs) -> list[tuple[str, tuple[int, ...]]]:
    """(Mistral name, shape) of every tensor of a model with `args`, in state-dict order."""
    with torch.device("meta"):
        model = PixtralModel(args)
    return [(k, tuple(v.shape)) for k, v in model.state_dict().items()]


def _std(name: str, shape: tuple[int, ...]) -> tuple[float, float]:
    """(mean, std) of the values of tensor `name`."""
    if name.endswith("norm.weight") or name.endswith("ln_pre.weight"):
        return 1.0, 0.1
    if name.endswith(".bias"):
        return 0.0, 0.02
    if name == "tok_embeddings.weight":
        return 0.0, 1.0
    return 0.0, math.prod(shape[1:]) ** -0.5  # 1 / sqrt(fan_in)


def _chunks(name: str, shape: tuple[int, ...], seed: int, dtype: torch.dtype):
    """The tensor's values as row blocks (deterministic in seed, name and _CHUNK)."""
    mean, std = _std(name, shape)
    rows = shape[0]
    step = max(1, _CHUNK // math.prod(shape[1:]))
    for i, r0 in enumerate(range(0, rows, step)):
        g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()) + i)
        n = min(step, rows - r0)
        t = torch.randn((n, *shape[1:]), generator=g).mul_(std).add_(mean)
        yield t.to(dtype)


def _tensor(name: str, shape: tuple[int, ...], seed: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.cat(list(_chunks(name, shape, seed, dtype)))


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return math.prod(shape) * dtype.itemsize


def _write_mistral(tmp: Path, args: PixtralArgs, dtype: torch.dtype, seed: int,
                   progress) -> None:
    specs = tensor_specs(args)
    (tmp / "params.json").write_text(json.dumps(args.to_params(), indent=2) + "\n")
    with StreamingWriter(tmp / "consolidated.safetensors",
                         [(n, dtype, s) for n, s in specs]) as w:
        for name, shape in specs:
            w.write_parts(name, _counted(_chunks(name, shape, seed, dtype), progress))


def _counted(blocks, progress):
    for b in blocks:
        yield b
        progress(b.numel() * b.element_size())


def _write_hf(tmp: Path, args: PixtralArgs, dtype: torch.dtype, seed: int, progress) -> None:
    specs = tensor_specs(args)
    (tmp / "config.json").write_text(json.dumps(args.to_hf_config(), indent=2) + "\n")
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in specs:
        n = _nbytes(shape, dtype)
        if shards[-1] and size + n > _HF_SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += n
    weight_map = {}
    for i, group in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        with StreamingWriter(tmp / fname, [(mistral_to_hf_name(n), dtype, s) for n, s in group],
                             {"format": "pt"}) as w:
            for name, shape in group:
                t = _tensor(name, shape, seed, dtype)
                heads = rope_heads(name, args)
                if heads:
                    t = permute_to_hf(t, heads)
                w.write(mistral_to_hf_name(name), t)
                weight_map[mistral_to_hf_name(name)] = fname
                progress(t.numel() * dtype.itemsize)
    total = sum(_nbytes(s, dtype) for _, s in specs)
    (tmp / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")


def write_checkpoint(out: str | Path, args: PixtralArgs, fmt: str = "mistral",
                     dtype: torch.dtype = torch.bfloat16, seed: int = 0,
                     progress=lambda n: None) -> Path:
    """Write a random checkpoint to `out` (which must not exist); returns `out`."""
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out}: already exists")
    if fmt not in ("mistral", "hf"):
        raise ValueError(f"unknown format {fmt!r} (mistral or hf)")
    tmp = out.with_name(f"{out.name}.tmp-{time.time_ns()}")
    tmp.mkdir(parents=True)
    try:
        (_write_mistral if fmt == "mistral" else _write_hf)(tmp, args, dtype, seed, progress)
        if fmt == "mistral":
            import mistral_common
            shutil.copy(Path(mistral_common.__file__).parent / "data" / "tekken_240911.json",
                        tmp / "tekken.json")
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pixlocal.synthetic", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--preset", choices=["tiny", "pixtral-12b"], default="tiny")
    ap.add_argument("--layers", type=int, help="decoder layers (default: the preset's)")
    ap.add_argument("--vision-layers", type=int, help="vision encoder layers")
    ap.add_argument("--format", choices=["mistral", "hf"], default="mistral")
    ap.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    import dataclasses
    args = PixtralArgs.tiny() if a.preset == "tiny" else PixtralArgs.pixtral_12b()
    if a.layers:
        args = dataclasses.replace(args, n_layers=a.layers)
    if a.vision_layers and args.vision_encoder is not None:
        args = dataclasses.replace(args, vision_encoder=dataclasses.replace(
            args.vision_encoder, num_hidden_layers=a.vision_layers))
    dtype = getattr(torch, a.dtype)
    total = sum(_nbytes(s, dtype) for _, s in tensor_specs(args))
    done, t0, shown = [0], time.perf_counter(), [0.0]

    def progress(n: int) -> None:
        done[0] += n
        el = time.perf_counter() - t0
        if el - shown[0] < 0.5 and done[0] < total:
            return
        shown[0] = el
        print(f"\r{done[0] / 1e9:6.2f} / {total / 1e9:.2f} GB  {done[0] / 1e6 / max(el, 1e-9):6.0f}"
              " MB/s", end="", file=sys.stderr, flush=True)

    try:
        write_checkpoint(a.out, args, a.format, dtype, a.seed, progress)
    except (FileExistsError, OSError) as e:
        print(f"\nerror: {e}", file=sys.stderr)
        return 1
    print(f"\nwrote {a.out} ({total / 1e9:.2f} GB, {a.format}, {a.dtype}) in "
          f"{time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
