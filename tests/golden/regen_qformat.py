"""Rewrite tests/golden/qformat_layout.json: python tests/golden/regen_qformat.py

Each case pins one scheme's bit layout: a 2 x 64 matrix of known values, quantized with
pixlocal.qformat.quantize_ref (plain round-to-nearest, so the case depends on the layout and
the rounding rule, not on the search), to its exact qweight bytes, scale and zero codes (or
float16 scales) and dequantized values. Review the diff before committing: any change means
the on-disk format changed and FORMAT_VERSION must be bumped.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from pixlocal.qformat import FORMAT_VERSION, QuantSpec, dequantize
from pixlocal.quant.quantizer import quantize_ref

PATH = Path(__file__).with_name("qformat_layout.json")
SCHEMES = ("int4-g32", "int4-g64", "int8-g32", "int8-g64")


def known_matrix() -> torch.Tensor:
    """(2, 64) float32, every value exact: a ramp (the nibble order shows as a sequence) and a
    scrambled row whose second half is 4x larger and mostly negative (asymmetric groups)."""
    k = torch.arange(64)
    ramp = (k - 24) / 32
    scrambled = ((k * 37) % 64 - 29).float() / 256 * torch.where(k < 32, 1.0, -4.0)
    return torch.stack([ramp, scrambled]).float()


def case(scheme: str) -> dict[str, object]:
    w = known_matrix()
    q = quantize_ref(w, QuantSpec.parse(scheme))
    out: dict[str, object] = {
        "scheme": scheme,
        "weight": w.tolist(),
        "qweight_hex": [bytes(r.view(torch.uint8).tolist()).hex() for r in q.qweight],
        "scales": (q.scales.tolist() if q.zeros is not None
                   else [bytes(r.view(torch.uint8).tolist()).hex() for r in q.scales]),
        "dequant": dequantize(q).tolist(),
    }
    if q.zeros is not None:
        out["zeros"] = q.zeros.tolist()
    return out


def main() -> None:
    note = ("regenerate with: python tests/golden/regen_qformat.py; int4 scales/zeros are uint8 "
            "codes, int8 scales the float16 little-endian bytes in hex")
    cases = [",\n".join(f'   "{k}": {json.dumps(v)}' for k, v in case(s).items())
             for s in SCHEMES]
    PATH.write_text(f'{{\n "format_version": {FORMAT_VERSION},\n "note": {json.dumps(note)},\n'
                    ' "cases": [\n  {\n' + "\n  },\n  {\n".join(cases) + "\n  }\n ]\n}\n")


if __name__ == "__main__":
    main()
