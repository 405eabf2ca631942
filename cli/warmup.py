"""`pixlocal warmup`: compile the CPU kernels now, so that the first `ask` does not wait."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Annotated

import typer

from .common import DeviceOpt, compile_kernels, err, escape, user_errors


def precompile(device: str = "cpu", dtype: str = "auto") -> float | None:
    """Compile the kernels a quantized model's CPU path calls, on a tiny random model of the
    same kinds of weights (int4 layers, int8 layers and head): numba specializes on types,
    not shapes, so a 12B model finds them cached. Seconds spent, None if all were cached."""
    import torch

    import pixlocal
    from pixlocal.config import PixtralArgs
    from pixlocal.kernels.backend import CpuBackend, for_device, parse_device
    from pixlocal.loader import parse_dtype

    from .warm import marker, up_to_date

    dev = parse_device(device)
    if not isinstance(for_device(dev), CpuBackend):
        return None  # no numba kernels on this path
    from pixlocal.kernels import cpu_decode  # noqa: F401  (loads the kernels up_to_date checks)
    if up_to_date(marker(parse_dtype(dtype, dev), [4, 8], dev)):
        return None  # compiled before, and numba's cache still has them
    from pixlocal.quant import quantize_checkpoint

    from pixlocal.synthetic import write_checkpoint

    with tempfile.TemporaryDirectory(prefix="pixlocal-warmup-") as tmp:
        src, out = Path(tmp, "src"), Path(tmp, "q")
        write_checkpoint(src, PixtralArgs.tiny(), fmt="mistral", dtype=torch.bfloat16, seed=0)
        quantize_checkpoint(src, out, bits=4, overrides=("layers.0.*=int8",))
        m = pixlocal.load(out, device=device, dtype=dtype)
        return compile_kernels(m)


def warmup(
    model: Annotated[str | None, typer.Option(
        "--model", "-m", help="Compile for this model (directory or registry name) instead "
        "of a tiny stand-in; the kernels are the same for every model of the same kind.")
    ] = None,
    device: DeviceOpt = "auto",
    dtype: Annotated[str, typer.Option(help="Activation dtype (as for ask).")] = "auto",
) -> None:
    """Compile the CPU kernels ahead of the first run (15-60 s once; cached after)."""
    with user_errors():
        if model is not None:
            import pixlocal

            from .registry import resolve
            r = resolve(model)
            with err.status(f"loading {escape(r.label)} …"):
                m = pixlocal.load(r.path, device=device, dtype=dtype)
            s = compile_kernels(m)
        else:
            s = precompile("cpu" if device == "auto" else device, dtype)
        if s is None:
            err.print("CPU kernels already compiled (nothing to do)")
