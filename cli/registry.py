"""models.toml -> ModelSpec; `--model` values (path, name, alias, name:variant) -> a directory.

Model names live only in models.toml. Downloaded models live under PIXLOCAL_HOME
(default: $XDG_CACHE_HOME/pixlocal, i.e. ~/.cache/pixlocal). The registry ships as package
data (pixlocal/models.toml, from the repo root's models.toml); PIXLOCAL_MODELS_TOML may point
at another registry file (tests do this). Quantization facts come from shard metadata; a
variant's `quant` field is only checked against it.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import tomllib

from pixlocal.config import home  # PIXLOCAL_HOME (integrity reads it too)
from pixlocal.errors import ConfigError, FormatError, ModelNotFound
from pixlocal.shards import SafetensorsFile


def _bundled_toml() -> Path:
    """The registry shipped with pixlocal: package data in an installed wheel (setup.py copies
    the repo's models.toml there), the repo root's models.toml in a source checkout."""
    shipped = resources.files("pixlocal") / "models.toml"
    if shipped.is_file():
        return Path(str(shipped))
    return Path(__file__).resolve().parent.parent / "models.toml"


BUNDLED_TOML = _bundled_toml()


def registry_file() -> Path:
    return Path(os.environ.get("PIXLOCAL_MODELS_TOML") or BUNDLED_TOML).expanduser()


@dataclass(frozen=True)
class Variant:
    name: str  # e.g. "int4"
    path: Path
    quant: str | None  # expected quant scheme prefix ("int4"), None for the original weights


@dataclass(frozen=True)
class ModelSpec:
    name: str
    description: str = ""
    aliases: tuple[str, ...] = ()
    upstream: str | None = None  # Hugging Face repo in Mistral format
    files: tuple[str, ...] = ()  # the files `pull` downloads from upstream
    hf_upstream: str | None = None  # the same model in Hugging Face (Llava) format
    hf_files: tuple[str, ...] = ()
    variants: dict[str, Variant] = field(default_factory=dict)
    default_variant: str | None = None
    synthetic: str | None = None  # a pixlocal.synthetic preset made on first use (the demo)
    note: str = ""  # said whenever the model is used (the demo's words are noise)

    def variant(self, name: str | None = None) -> Variant:
        key = name or self.default_variant or next(iter(self.variants), None)
        if key not in self.variants:
            raise ModelNotFound(f"{self.name}: no variant {key!r} (choose from "
                                f"{', '.join(self.variants) or 'none'})")
        return self.variants[key]

    @property
    def source_variant(self) -> Variant:
        """The unquantized variant: where `pull` downloads to."""
        for v in self.variants.values():
            if v.quant is None:
                return v
        raise ConfigError(f"{self.name}: models.toml lists no unquantized variant to pull into")


@dataclass(frozen=True)
class Registry:
    path: Path
    default: str | None
    models: dict[str, ModelSpec]

    def find(self, name: str) -> ModelSpec | None:
        for spec in self.models.values():
            if name == spec.name or name in spec.aliases:
                return spec
        return None

    def lookup(self, ref: str) -> tuple[ModelSpec, Variant]:
        """`name`, `alias`, `name:variant` -> (spec, variant); unknown -> ModelNotFound."""
        name, _, var = ref.partition(":")
        spec = self.find(name)
        if spec is None:
            known = ", ".join(sorted(self.models)) or "none"
            raise ModelNotFound(f"unknown model {ref!r}: not a directory, nor a name or alias "
                                f"in {self.path} (known: {known})")
        return spec, spec.variant(var or None)


def _expand(value: str, base: Path) -> Path:
    def sub(m: re.Match[str]) -> str:
        key = m.group(1)
        if key == "PIXLOCAL_HOME":
            return str(home())
        return os.environ.get(key, m.group(0))
    p = Path(re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", sub, value)).expanduser()
    return p if p.is_absolute() else base / p


def _strings(v: Any, where: str) -> tuple[str, ...]:
    if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
        raise ConfigError(f"{where}: expected a list of strings")
    return tuple(v)


def _spec(name: str, d: Any, path: Path) -> ModelSpec:
    where = f"{path}: [models.{name}]"
    if not isinstance(d, dict):
        raise ConfigError(f"{where} must be a table")
    variants: dict[str, Variant] = {}
    for vname, v in (d.get("variants") or {}).items():
        if not isinstance(v, dict) or not isinstance(v.get("path"), str):
            raise ConfigError(f"{where}: variant {vname!r} needs a path string")
        q = v.get("quant")
        variants[vname] = Variant(vname, _expand(v["path"], path.parent),
                                  q if isinstance(q, str) else None)
    dv = d.get("default_variant")
    if dv is not None and dv not in variants:
        raise ConfigError(f"{where}: default_variant {dv!r} is not among its variants")
    return ModelSpec(
        name=name, description=str(d.get("description", "")),
        aliases=_strings(d.get("aliases", []), f"{where} aliases"),
        upstream=d.get("upstream"), files=_strings(d.get("files", []), f"{where} files"),
        hf_upstream=d.get("hf_upstream"),
        hf_files=_strings(d.get("hf_files", []), f"{where} hf_files"),
        variants=variants, default_variant=dv,
        synthetic=d.get("synthetic") if isinstance(d.get("synthetic"), str) else None,
        note=str(d.get("note", "")))


def load_registry(path: str | Path | None = None) -> Registry:
    p = Path(path).expanduser() if path is not None else registry_file()
    try:
        raw = tomllib.loads(p.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{p}: model registry not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{p}: unreadable ({e})") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: not valid TOML ({e})") from None
    models = {n: _spec(n, d, p) for n, d in (raw.get("models") or {}).items()}
    default = raw.get("default")
    if default is not None and default not in models:
        raise ConfigError(f"{p}: default {default!r} is not a model listed in it")
    return Registry(p, default, models)


def quant_of(model_dir: Path) -> str | None:
    """The quant scheme in the first weight file's metadata ("int4-g32"), None if unquantized."""
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        return None
    return SafetensorsFile(files[0]).metadata.get("quant") or None


def dir_size(path: Path) -> int:
    """Bytes of the files under path (0 when it does not exist)."""
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def is_downloaded(path: Path) -> bool:
    return path.is_dir() and any(path.glob("*.safetensors")) and (
        (path / "params.json").is_file() or (path / "config.json").is_file())


@dataclass(frozen=True)
class Resolved:
    path: Path
    label: str  # what to call it in messages: the name[:variant] or the directory
    spec: ModelSpec | None = None
    variant: Variant | None = None


def _looks_like_path(ref: str) -> bool:
    return ref.startswith((".", "~", "/")) or os.sep in ref or "/" in ref or Path(ref).exists()


def resolve(ref: str | None, registry: Registry | None = None) -> Resolved:
    """--model value -> a model directory: else $PIXLOCAL_MODEL, else the registry default.
    A registered model that is not downloaded raises ModelNotFound saying what to pull."""
    ref = ref or os.environ.get("PIXLOCAL_MODEL") or None
    if ref is not None and _looks_like_path(ref):
        return Resolved(Path(ref).expanduser(), ref)  # the loader reports a missing dir
    reg = registry or load_registry()
    if ref is None:
        if reg.default is None:
            raise ModelNotFound(f"no model given: pass --model, set PIXLOCAL_MODEL, or set "
                                f"default in {reg.path}")
        ref = reg.default
    spec, variant = reg.lookup(ref)
    label = f"{spec.name}:{variant.name}"
    if not is_downloaded(variant.path) and spec.synthetic:
        make_synthetic(spec.synthetic, variant.path)
    if not is_downloaded(variant.path):
        how = f"pixlocal pull {spec.name}"
        if variant.name != spec.default_variant:
            how += f" --quant {variant.quant or 'none'}"
        raise ModelNotFound(f"{label} is not downloaded (expected in {variant.path}): run "
                            f"`{how}`")
    if variant.quant is not None:
        got = quant_of(variant.path)
        if got is None or not got.startswith(variant.quant):
            raise FormatError(f"{variant.path}: models.toml says {label} is {variant.quant} but "
                              f"its weights are {got or 'not quantized'}")
    return Resolved(variant.path, label, spec, variant)


def make_synthetic(preset: str, path: Path) -> None:
    """Write a random-weight model of a pixlocal.synthetic preset ("tiny") at `path`; whole
    or not at all (synthetic.write_checkpoint writes beside it, then renames)."""
    import torch

    from pixlocal.config import PixtralArgs
    from pixlocal.synthetic import write_checkpoint
    if preset != "tiny":
        raise ConfigError(f"{registry_file()}: unknown synthetic preset {preset!r} (known: tiny)")
    try:
        if path.is_dir() and not any(path.iterdir()):
            path.rmdir()
        path.parent.mkdir(parents=True, exist_ok=True)
        write_checkpoint(path, PixtralArgs.tiny(), fmt="mistral", dtype=torch.bfloat16, seed=0)
    except OSError as e:
        raise ConfigError(f"{path}: cannot create the {preset} model ({e.strerror or e})"
                          ) from None
