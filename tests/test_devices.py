"""A device string torch rejects is one PixlocalError line from the library too (the CLI
checks --device first; Python callers get the same kind of message)."""

from __future__ import annotations

import pytest

from pixlocal.errors import PixlocalError
from pixlocal.kernels.backend import parse_device


@pytest.mark.parametrize("bad", ["CPU", "tpu", "cuda:x", "meta", ""])
def test_bad_device_is_one_line(bad):
    with pytest.raises(PixlocalError) as e:
        parse_device(bad)
    assert "\n" not in str(e.value) and "cpu" in str(e.value)


def test_good_devices():
    assert parse_device("auto").type in ("cpu", "cuda")
    assert parse_device("cpu").type == "cpu"
