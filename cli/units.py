"""How sizes are printed, everywhere: binary units (KiB, MiB, GiB, TiB; 1 KiB = 1024 B)."""

from __future__ import annotations

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


def human_bytes(n: float) -> str:
    """Bytes as people read them: '512 B', '1.5 KiB', '8.4 GiB' (one decimal above bytes)."""
    for unit in _UNITS:
        if n < 1024 or unit == _UNITS[-1]:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError(n)
