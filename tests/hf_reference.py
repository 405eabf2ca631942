"""transformers' Llava + Pixtral as the parity oracle (tests only; imports transformers lazily).

What transformers expects, as read in transformers 5.x (models/llava/modeling_llava.py,
models/pixtral/modeling_pixtral.py, image_processing_pixtral.py):
- `pixel_values` is one (B, C, Hmax, Wmax) batch: images of different sizes are zero-padded
  at the bottom and right to the largest height and width, exactly as PixtralImageProcessor's
  `_pad_for_batching` does, and `image_sizes` (B, 2) holds each image's (H, W) before padding.
  The vision tower crops each conv output back to (H/P, W/P) patches, flattens them row-major
  into one sequence and attends with a block-diagonal mask, one block per image.
- Only positions whose id is `image_token_index` ([IMG], 10) are replaced, in order, by the
  projected patch rows (`masked_scatter`); [IMG_BREAK] and [IMG_END] are embedded as
  ordinary text tokens.
The pixel arrays fed here are mistral-common's own (`Pixtral.encode(...).images`), so both
sides see the same patch grid; transformers' image processor plays no part.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

# Shapes: B images · C channels · H, W pixels · P patch size · N patches · L tokens · V vocab


def load_reference(model_dir: str | Path):
    """The HF-format checkpoint in `model_dir` as a float32 LlavaForConditionalGeneration.

    Eager attention: an implementation independent of pixlocal's SDPA calls. Every tensor
    of the checkpoint must be used and every parameter found (a silent re-initialisation
    would make the comparison meaningless).
    """
    from transformers import LlavaForConditionalGeneration

    model, info = LlavaForConditionalGeneration.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="eager", output_loading_info=True)
    problems = {k: v for k, v in info.items() if v}
    if problems:
        raise AssertionError(f"{model_dir}: transformers did not load the checkpoint "
                             f"cleanly: {problems}")
    return model.eval()


def batch_images(images: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """(C, H, W) float arrays -> pixel_values (B, C, Hmax, Wmax), image_sizes (B, 2)."""
    hmax = max(a.shape[1] for a in images)
    wmax = max(a.shape[2] for a in images)
    pixel_values = torch.zeros(len(images), images[0].shape[0], hmax, wmax)
    for i, a in enumerate(images):
        pixel_values[i, :, : a.shape[1], : a.shape[2]] = torch.from_numpy(
            np.asarray(a, dtype=np.float32))
    image_sizes = torch.tensor([a.shape[1:] for a in images], dtype=torch.long)
    return pixel_values, image_sizes


@torch.inference_mode()
def vision_features(model, images: list[np.ndarray]) -> torch.Tensor:
    """Vision tower output, all images' patches in order: (ΣN, vision dim)."""
    pixel_values, image_sizes = batch_images(images)
    out = model.model.vision_tower(pixel_values, image_sizes=image_sizes)
    return out.last_hidden_state[0]


@torch.inference_mode()
def image_features(model, images: list[np.ndarray]) -> torch.Tensor:
    """Projected rows that replace the [IMG] embeddings: (ΣN, text dim)."""
    pixel_values, image_sizes = batch_images(images)
    out = model.model.get_image_features(
        pixel_values=pixel_values, image_sizes=image_sizes, vision_feature_layer=-1,
        vision_feature_select_strategy="full", return_dict=True)
    return torch.cat(list(out.pooler_output), dim=0)


@torch.inference_mode()
def logits(model, tokens: list[int], images: list[np.ndarray]) -> torch.Tensor:
    """One full causal forward over `tokens` with `images` spliced in: (L, V) float32."""
    kw = {}
    if images:
        kw["pixel_values"], kw["image_sizes"] = batch_images(images)
    out = model(input_ids=torch.tensor([tokens]), use_cache=False, **kw)
    return out.logits[0].float()
