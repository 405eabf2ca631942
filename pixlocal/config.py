"""Model hyperparameters: Mistral `params.json` and Hugging Face Llava `config.json` both
become one frozen `PixtralArgs`. Unknown keys are ignored; missing required keys raise
ConfigError naming the file and the keys."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import ConfigError

DEFAULT_CONTEXT = 32_768  # tokens the KV cache is planned for (~1 image + a long chat)


def home() -> Path:
    """Where pulled and quantized models live: $PIXLOCAL_HOME, else $XDG_CACHE_HOME/pixlocal
    (~/.cache/pixlocal). Here, with no project imports, so registry and integrity share it."""
    if os.environ.get("PIXLOCAL_HOME"):
        return Path(os.environ["PIXLOCAL_HOME"]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache).expanduser() / "pixlocal"

# defaults of transformers' PixtralVisionConfig / MistralConfig, used only for HF configs,
# whose files omit keys equal to the class default (as transformers itself reads them)
_HF_VISION_DEFAULTS = dict(  # also the keys VisionArgs shares with a vision_config
    hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
    num_channels=3, image_size=1024, patch_size=16, rope_theta=10000.0)
_HF_TEXT_DEFAULTS = dict(
    hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=8, rms_norm_eps=1e-6, rope_theta=10000.0, vocab_size=32000)


@dataclass(frozen=True)
class VisionArgs:
    hidden_size: int = 1024
    num_channels: int = 3
    image_size: int = 1024
    patch_size: int = 16
    rope_theta: float = 10000.0
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    image_token_id: int = 10
    adapter_bias: bool = True

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclass(frozen=True)
class PixtralArgs:
    dim: int
    n_layers: int
    head_dim: int
    hidden_dim: int
    n_heads: int
    n_kv_heads: int
    norm_eps: float
    vocab_size: int
    rope_theta: float = 10000.0
    max_seq_len: int = 128_000
    vision_encoder: VisionArgs | None = field(default_factory=VisionArgs)

    # ---- Mistral params.json -------------------------------------------------------------
    @classmethod
    def from_params(cls, d: dict[str, Any], source: str = "params.json") -> PixtralArgs:
        required = ["dim", "n_layers", "head_dim", "hidden_dim", "n_heads", "n_kv_heads",
                    "norm_eps", "vocab_size"]
        missing = [k for k in required if k not in d]
        if missing:
            raise ConfigError(f"{source}: missing required keys {', '.join(missing)}")
        kw = {f.name: d[f.name] for f in fields(cls) if f.name in d and f.name != "vision_encoder"}
        if "max_position_embeddings" in d and "max_seq_len" not in d:
            kw["max_seq_len"] = d["max_position_embeddings"]
        if kw.get("rope_theta") is None:
            kw["rope_theta"] = 10000.0  # mistral-inference's default when params omit it
        ve = d.get("vision_encoder")
        vision = None
        if ve is not None:
            if not isinstance(ve, dict):
                raise ConfigError(f"{source}: vision_encoder must be an object")
            vision = VisionArgs(**{f.name: ve[f.name] for f in fields(VisionArgs) if f.name in ve})
        try:
            return _checked(cls(**kw, vision_encoder=vision), source)
        except TypeError as e:
            raise ConfigError(f"{source}: {e}") from None

    def to_params(self) -> dict[str, Any]:
        d = asdict(self)
        if self.vision_encoder is None:
            d.pop("vision_encoder")
        return d

    # ---- Hugging Face LlavaConfig (text_config: mistral, vision_config: pixtral) ------
    @classmethod
    def from_hf_config(cls, d: dict[str, Any], source: str = "config.json") -> PixtralArgs:
        if "text_config" not in d or "vision_config" not in d:
            raise ConfigError(f"{source}: not a Llava/Pixtral config (needs text_config and "
                              "vision_config)")
        t = _hf_part(d["text_config"], _HF_TEXT_DEFAULTS)
        v = _hf_part(d["vision_config"], _HF_VISION_DEFAULTS)
        act = v.get("hidden_act", "silu")
        if act != "silu":
            # transformers' default is "gelu" but Pixtral's vision MLP is SiLU-gated
            raise ConfigError(f"{source}: vision_config.hidden_act is {act!r}; "
                              "Pixtral needs 'silu'")
        heads = t["num_attention_heads"]
        vision = VisionArgs(**{**{k: v[k] for k in _HF_VISION_DEFAULTS},
                               "rope_theta": float(v["rope_theta"])},
                            image_token_id=d.get("image_token_index", 10),
                            adapter_bias=d.get("multimodal_projector_bias", True))
        args = cls(
            dim=t["hidden_size"], n_layers=t["num_hidden_layers"],
            head_dim=t.get("head_dim") or t["hidden_size"] // heads,
            hidden_dim=t["intermediate_size"], n_heads=heads,
            n_kv_heads=t["num_key_value_heads"], norm_eps=float(t["rms_norm_eps"]),
            vocab_size=t["vocab_size"], rope_theta=float(t["rope_theta"]),
            max_seq_len=min(int(t.get("max_position_embeddings", 128_000)), 128_000),
            vision_encoder=vision)
        return _checked(args, source)

    def to_hf_config(self) -> dict[str, Any]:
        v = self.vision_encoder or VisionArgs()
        return {
            "architectures": ["LlavaForConditionalGeneration"],
            "model_type": "llava",
            "image_token_index": v.image_token_id,
            "projector_hidden_act": "gelu",
            "multimodal_projector_bias": v.adapter_bias,
            "vision_feature_layer": -1,
            "vision_feature_select_strategy": "full",
            "image_seq_length": 1,
            "tie_word_embeddings": False,
            "text_config": {
                "model_type": "mistral", "hidden_act": "silu", "hidden_size": self.dim,
                "head_dim": self.head_dim, "intermediate_size": self.hidden_dim,
                "num_hidden_layers": self.n_layers, "num_attention_heads": self.n_heads,
                "num_key_value_heads": self.n_kv_heads, "rms_norm_eps": self.norm_eps,
                "rope_theta": self.rope_theta, "vocab_size": self.vocab_size,
                "max_position_embeddings": self.max_seq_len, "sliding_window": None,
                "tie_word_embeddings": False,
            },
            "vision_config": {
                "model_type": "pixtral", "hidden_act": "silu", "hidden_size": v.hidden_size,
                "head_dim": v.head_dim, "intermediate_size": v.intermediate_size,
                "num_hidden_layers": v.num_hidden_layers,
                "num_attention_heads": v.num_attention_heads, "num_channels": v.num_channels,
                "image_size": v.image_size, "patch_size": v.patch_size,
                "rope_theta": v.rope_theta,
            },
        }

    # ---- presets -----------------------------------------------------------------------
    @classmethod
    def tiny(cls) -> PixtralArgs:
        """2 decoder layers, head_dim != dim/heads, GQA, 1 vision layer, the real vocab."""
        return cls(dim=64, n_layers=2, head_dim=24, hidden_dim=96, n_heads=4, n_kv_heads=2,
                   norm_eps=1e-5, vocab_size=131072, rope_theta=1e9, max_seq_len=8192,
                   vision_encoder=VisionArgs(hidden_size=32, intermediate_size=48,
                                             num_hidden_layers=1, num_attention_heads=2,
                                             image_size=1024, patch_size=16))

    @classmethod
    def pixtral_12b(cls, n_layers: int = 40, vision_layers: int = 24) -> PixtralArgs:
        """Pixtral-12B-2409's dims (PIXTRAL_SPEC.md §1), optionally with fewer layers."""
        return cls(dim=5120, n_layers=n_layers, head_dim=128, hidden_dim=14336, n_heads=32,
                   n_kv_heads=8, norm_eps=1e-5, vocab_size=131072, rope_theta=1e9,
                   max_seq_len=128_000,
                   vision_encoder=VisionArgs(num_hidden_layers=vision_layers))


def _hf_part(part: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """An HF sub-config over its class defaults. transformers >= 5 writes the RoPE base as
    rope_parameters.rope_theta instead of a top-level rope_theta: accept both."""
    got = {k: v for k, v in part.items() if v is not None}
    rp = got.get("rope_parameters")
    if "rope_theta" not in got and isinstance(rp, dict) and rp.get("rope_theta") is not None:
        got["rope_theta"] = rp["rope_theta"]
    return {**defaults, **got}


def _checked(a: PixtralArgs, source: str) -> PixtralArgs:
    bad = [f.name for f in fields(a) if f.name in ("dim", "n_layers", "head_dim", "hidden_dim",
                                                    "n_heads", "n_kv_heads", "vocab_size")
           and not (isinstance(getattr(a, f.name), int) and getattr(a, f.name) > 0)]
    if bad:
        raise ConfigError(f"{source}: keys {', '.join(bad)} must be positive integers")
    if a.n_heads % a.n_kv_heads:
        raise ConfigError(f"{source}: n_heads ({a.n_heads}) is not a multiple of n_kv_heads "
                          f"({a.n_kv_heads})")
    if a.head_dim % 2:
        raise ConfigError(f"{source}: head_dim ({a.head_dim}) must be even for RoPE")
    v = a.vision_encoder
    if v is not None and (v.hidden_size % v.num_attention_heads or v.head_dim % 4):
        raise ConfigError(f"{source}: vision head_dim must be a multiple of 4 for 2-D RoPE")
    return a


def read_args(model_dir: Path) -> PixtralArgs:
    """params.json (Mistral) wins over config.json (Hugging Face) when both exist."""
    for name, parse in (("params.json", PixtralArgs.from_params),
                        ("config.json", PixtralArgs.from_hf_config)):
        p = model_dir / name
        if p.is_file():
            try:
                d = json.loads(p.read_text())
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ConfigError(f"{p}: unreadable JSON ({e})") from None
            if not isinstance(d, dict):
                raise ConfigError(f"{p}: expected a JSON object")
            return parse(d, str(p))
    raise ConfigError(f"{model_dir}: no params.json or config.json (not a model directory)")
