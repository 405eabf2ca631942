"""Parity with transformers' LlavaForConditionalGeneration (Pixtral vision tower, Mistral text
model) on tiny random float32 checkpoints, loaded by pixlocal from the HF format and from the
Mistral format written with the same seed (issue 2, "Parity").

Compared: the vision encoder output, the projected image rows, and the full-sequence logits,
for text-only, one-image, three-image and interleaved multi-turn prompts. Both sides get the
same token ids and the same pixel arrays, the ones mistral-common produced
(tests/hf_reference.py says how they are handed to transformers).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

import pixlocal
from pixlocal.checkpoint import mistral_to_hf_name, permute_to_hf, rope_heads
from pixlocal.config import PixtralArgs, VisionArgs, read_args
from pixlocal.synthetic import write_checkpoint

pytest.importorskip("transformers")
from tests import hf_reference as ref  # noqa: E402  (after the skip: it needs transformers)

pytestmark = pytest.mark.parity

# The bound. Observed max |Δ| over all cases here: 5.3e-6 on logits of std ~1, 1.5e-6
# on vision features, 1.4e-6 on image rows (float32, the same math in a different order:
# interleaved-pair vs rotate-half RoPE, SDPA vs eager attention, per-image loop vs mask).
PARITY_ATOL = 1e-4
# The compared quantities must vary, or agreement would prove nothing; random weights give
# std ~1 (vision, logits) and ~0.5-0.9 (adapter rows).
STD_FLOOR = 0.1

CONFIGS = {
    # head_dim 24 != 64/4, GQA 4:2, vision 2 heads of 16, one vision layer
    "tiny": PixtralArgs.tiny(),
    # multi-query (4:1), head_dim 32 != 48/4, 3 layers, text theta 1e6, vision 4 heads of 16,
    # vision theta 1e3, no adapter bias, eps 1e-6
    "mqa": PixtralArgs(
        dim=48, n_layers=3, head_dim=32, hidden_dim=80, n_heads=4, n_kv_heads=1,
        norm_eps=1e-6, vocab_size=131072, rope_theta=1e6, max_seq_len=4096,
        vision_encoder=VisionArgs(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                  num_attention_heads=4, rope_theta=1000.0,
                                  adapter_bias=False)),
    # plain multi-head (2:2), head_dim == dim/heads, vision 3 heads of 16, 2 vision layers
    "mha": PixtralArgs(
        dim=32, n_layers=2, head_dim=16, hidden_dim=64, n_heads=2, n_kv_heads=2,
        norm_eps=1e-5, vocab_size=131072, rope_theta=1e9, max_seq_len=4096,
        vision_encoder=VisionArgs(hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=3)),
}

# (width, height) in pixels: odd, none a multiple of the 16-pixel patch, different shapes
IMAGE_SIZES = [(37, 53), (100, 17), (5, 90)]


_IMAGES = [Image.fromarray(np.random.default_rng(100 + i).integers(0, 256, (h, w, 3),
                                                                    dtype=np.uint8))
           for i, (w, h) in enumerate(IMAGE_SIZES)]  # random RGB noise


def _image(i: int) -> dict:
    return {"type": "image", "image": _IMAGES[i]}

PROMPTS = {
    "text-only": [{"role": "user", "content": "Name three colours of the rainbow."}],
    "one-image": [{"role": "user", "content": [_image(0),
                                               {"type": "text", "text": "What is this?"}]}],
    "three-images": [{"role": "user", "content": [
        _image(0), _image(1), _image(2), {"type": "text", "text": "Compare these pictures."}]}],
    "interleaved-multiturn": [
        {"role": "system", "content": "You answer briefly."},
        {"role": "user", "content": [{"type": "text", "text": "First this:"}, _image(2),
                                     {"type": "text", "text": "what colour is it?"}]},
        {"role": "assistant", "content": "Mostly grey."},
        {"role": "user", "content": [_image(1), {"type": "text", "text": "And this one?"}]},
    ],
}
IMAGE_PROMPTS = [k for k in PROMPTS if k != "text-only"]


class Case:
    """One config: both checkpoints, transformers' model and pixlocal's two loads, with
    transformers' outputs computed once per prompt."""

    def __init__(self, root: Path, args: PixtralArgs, seed: int):
        self.args = args
        self.hf_dir = write_checkpoint(root / "hf", args, fmt="hf", dtype=torch.float32,
                                       seed=seed)
        self.mistral_dir = write_checkpoint(root / "mistral", args, fmt="mistral",
                                            dtype=torch.float32, seed=seed)
        self.reference = ref.load_reference(self.hf_dir)
        self.ours = {"hf": pixlocal.load(self.hf_dir, dtype="float32"),
                     "mistral": pixlocal.load(self.mistral_dir, dtype="float32")}
        self._enc: dict = {}
        self._ref: dict = {}

    def encode(self, prompt: str):
        if prompt not in self._enc:
            self._enc[prompt] = self.ours["mistral"].encode(PROMPTS[prompt])
        return self._enc[prompt]

    def reference_out(self, what: str, prompt: str) -> torch.Tensor:
        key = (what, prompt)
        if key not in self._ref:
            enc = self.encode(prompt)
            if what == "logits":
                self._ref[key] = ref.logits(self.reference, enc.tokens, enc.images)
            else:
                self._ref[key] = getattr(ref, what)(self.reference, enc.images)
        return self._ref[key]


@pytest.fixture(scope="module", params=list(CONFIGS))
def case(request, tmp_path_factory) -> Case:
    seed = 11 + list(CONFIGS).index(request.param)
    return Case(tmp_path_factory.mktemp(f"parity-{request.param}"), CONFIGS[request.param],
                seed)


def _assert_close(ours: torch.Tensor, theirs: torch.Tensor, what: str) -> None:
    assert ours.shape == theirs.shape, (what, ours.shape, theirs.shape)
    assert ours.dtype == torch.float32
    assert theirs.std() > STD_FLOOR, f"{what}: reference output is near constant"
    err = (ours - theirs).abs().max().item()
    assert err <= PARITY_ATOL, f"{what}: max |pixlocal - transformers| = {err:.3g}"


# ---- the two checkpoints are one model ---------------------------------------------------

def _hf_rows_from_mistral(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Written out by index, independently of pixlocal.checkpoint: HF row h*d + j*d/2 + p
    holds Mistral row h*d + 2p + j (rotate-half halves vs interleaved pairs)."""
    d = w.shape[0] // n_heads
    idx = [h * d + 2 * p + j for h in range(n_heads) for j in range(2) for p in range(d // 2)]
    return w[idx]


def test_both_formats_hold_identical_weights(case):
    a = case.ours["hf"].model.state_dict()
    b = case.ours["mistral"].model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # and the files themselves: each HF tensor is the Mistral one, q/k rows permuted
    index = json.loads((case.hf_dir / "model.safetensors.index.json").read_text())
    v = case.args.vision_encoder
    with safe_open(case.mistral_dir / "consolidated.safetensors", "pt") as f:
        mistral = {k: f.get_tensor(k) for k in f.keys()}
    hf = {}
    for name, shard in index["weight_map"].items():
        with safe_open(case.hf_dir / shard, "pt") as f:
            hf[name] = f.get_tensor(name)
    assert len(hf) == len(mistral)
    for name, w in mistral.items():
        heads = None
        if name.endswith(("wq.weight", "wk.weight")):
            heads = (v.num_attention_heads if name.startswith("vision_encoder.")
                     else case.args.n_heads if "wq" in name else case.args.n_kv_heads)
        expect = _hf_rows_from_mistral(w, heads) if heads else w
        assert torch.equal(hf[mistral_to_hf_name(name)], expect), name


# ---- parity -------------------------------------------------------------------------------

def test_prompts_exercise_odd_image_grids(case):
    """mistral-common turns the odd sizes into distinct patch grids, one per image."""
    enc = case.encode("three-images")
    shapes = [a.shape for a in enc.images]
    assert len(set(shapes)) == 3
    assert all(h % 16 == 0 and w % 16 == 0 for _, h, w in shapes)
    patches = sum(h * w // 256 for _, h, w in shapes)
    assert enc.tokens.count(case.args.vision_encoder.image_token_id) == patches


@pytest.mark.parametrize("fmt", ["hf", "mistral"])
@pytest.mark.parametrize("prompt", IMAGE_PROMPTS)
def test_vision_features(case, prompt, fmt):
    enc = case.encode(prompt)
    ours = case.ours[fmt].vision_features(enc.images)
    _assert_close(ours, case.reference_out("vision_features", prompt), "vision features")


@pytest.mark.parametrize("fmt", ["hf", "mistral"])
@pytest.mark.parametrize("prompt", IMAGE_PROMPTS)
def test_image_features(case, prompt, fmt):
    enc = case.encode(prompt)
    ours = case.ours[fmt].image_features(enc.images)
    _assert_close(ours, case.reference_out("image_features", prompt), "image features")


@pytest.mark.parametrize("fmt", ["hf", "mistral"])
@pytest.mark.parametrize("prompt", list(PROMPTS))
def test_logits(case, prompt, fmt):
    enc = case.encode(prompt)
    theirs = case.reference_out("logits", prompt)
    ours = case.ours[fmt].logits(enc.tokens, enc.images)
    _assert_close(ours, theirs, "logits")
    # rows differ from position to position (the sequence is really attended over)
    assert theirs.std(dim=0).mean() > STD_FLOOR


def test_parity_detects_unpermuted_qk(case):
    """The comparison is sharp: HF-layout q/k rows used as if they were Mistral's (the
    classic conversion bug) put vision features and logits far outside the tolerance."""
    m = case.ours["hf"]
    enc = case.encode("one-image")
    wrong = {}
    for name, p in m.model.named_parameters():
        if name.endswith(("attention.wq.weight", "attention.wk.weight")):
            wrong[name] = p.detach().clone()
    try:
        with torch.no_grad():
            for name, p in m.model.named_parameters():
                if name in wrong:
                    p.copy_(permute_to_hf(wrong[name], rope_heads(name, case.args)))
        vis = m.vision_features(enc.images)
        log = m.logits(enc.tokens, enc.images)
    finally:
        with torch.no_grad():
            for name, p in m.model.named_parameters():
                if name in wrong:
                    p.copy_(wrong[name])
    assert (vis - case.reference_out("vision_features", "one-image")).abs().max() > 100 * \
        PARITY_ATOL
    assert (log - case.reference_out("logits", "one-image")).abs().max() > 100 * PARITY_ATOL


# ---- config round trip --------------------------------------------------------------------

@pytest.mark.parametrize("name", list(CONFIGS) + ["pixtral-12b"])
def test_hf_config_round_trips_through_transformers(name, tmp_path):
    """to_hf_config() -> LlavaConfig -> (dict, and config.json as transformers saves it)
    -> from_hf_config gives back the same PixtralArgs, and transformers reads the fields
    that matter as meant."""
    from transformers import LlavaConfig
    args = CONFIGS.get(name) or PixtralArgs.pixtral_12b()
    cfg = LlavaConfig.from_dict(args.to_hf_config())
    t, v = cfg.text_config, cfg.vision_config
    assert (t.hidden_size, t.head_dim, t.num_attention_heads, t.num_key_value_heads) == \
        (args.dim, args.head_dim, args.n_heads, args.n_kv_heads)
    assert t.rope_parameters["rope_theta"] == args.rope_theta
    assert v.rope_parameters["rope_theta"] == args.vision_encoder.rope_theta
    assert v.hidden_act == "silu" and cfg.image_token_index == 10
    assert cfg.multimodal_projector_bias == args.vision_encoder.adapter_bias
    assert not cfg.tie_word_embeddings and not t.tie_word_embeddings
    assert PixtralArgs.from_hf_config(cfg.to_dict()) == args
    cfg.save_pretrained(tmp_path)
    assert read_args(tmp_path) == args
