"""models.toml -> ModelSpec; --model resolution: path, name, alias, variant, env, default."""

from __future__ import annotations

import shutil
from pathlib import Path

import cli_fixtures
import pytest

from pixlocal.cli import registry
from pixlocal.errors import ConfigError, FormatError, ModelNotFound

tiny_registry = cli_fixtures.tiny_registry  # a fixture


def test_bundled_registry_lists_pixtral_in_both_formats():
    reg = registry.load_registry(registry.BUNDLED_TOML)
    spec = reg.find("pixtral")
    assert spec is not None and reg.default == spec.name == "pixtral-12b"
    assert spec.upstream == "mistralai/Pixtral-12B-2409"
    assert spec.hf_upstream == "mistral-community/pixtral-12b"
    assert {"params.json", "tekken.json"} <= set(spec.files)
    assert spec.variant().quant == "int4" and spec.source_variant.quant is None
    assert spec.variant().path.parent == registry.home()


def test_home_defaults_to_xdg_cache(monkeypatch, tmp_path):
    monkeypatch.delenv("PIXLOCAL_HOME")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert registry.home() == tmp_path / "xdg" / "pixlocal"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert registry.home() == Path.home() / ".cache" / "pixlocal"


def test_resolve_name_alias_variant_env_default(tiny_registry, tiny_ckpt, monkeypatch):
    for ref in ("tiny", "t", "tiny:f32", None):
        r = registry.resolve(ref)
        assert r.path == tiny_ckpt and r.label == "tiny:f32", ref
    monkeypatch.setenv("PIXLOCAL_MODEL", "t")
    assert registry.resolve(None).spec.name == "tiny"
    assert registry.resolve(str(tiny_ckpt)).spec is None  # a path is taken as is


def test_not_downloaded_says_what_to_pull(tiny_registry):
    with pytest.raises(ModelNotFound, match=r"`pixlocal pull big`"):
        registry.resolve("big")
    with pytest.raises(ModelNotFound, match=r"`pixlocal pull big --quant none`"):
        registry.resolve("b:bf16")


def test_unknown_name_and_variant(tiny_registry):
    with pytest.raises(ModelNotFound, match="models.toml") as e:
        registry.resolve("nope")
    assert "tiny" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ModelNotFound, match="no variant 'q2'"):
        registry.resolve("tiny:q2")


def test_quant_field_is_checked_against_metadata(tiny_registry, tiny_ckpt, tmp_path):
    dest = registry.home() / "big-int4"
    shutil.copytree(tiny_ckpt, dest)  # unquantized weights where int4 ones are expected
    with pytest.raises(FormatError, match="int4"):
        registry.resolve("big")


@pytest.mark.parametrize("text,needle", [
    ("default = [", "not valid TOML"),
    ('default = "x"\n[models.y]\nvariants.a = { path = "/a" }\n', "default 'x'"),
    ('[models.y]\nvariants.a = { nope = 1 }\n', "variant 'a'"),
    ('[models.y]\naliases = "z"\nvariants.a = { path = "/a" }\n', "aliases"),
])
def test_bad_registry_is_one_line_naming_the_file(tmp_path, monkeypatch, text, needle):
    p = tmp_path / "models.toml"
    p.write_text(text)
    monkeypatch.setenv("PIXLOCAL_MODELS_TOML", str(p))
    with pytest.raises(ConfigError) as e:
        registry.load_registry()
    assert str(p) in str(e.value) and needle in str(e.value) and "\n" not in str(e.value)


def test_missing_registry(tmp_path, monkeypatch):
    monkeypatch.setenv("PIXLOCAL_MODELS_TOML", str(tmp_path / "none.toml"))
    with pytest.raises(ConfigError, match="none.toml"):
        registry.resolve("anything")
