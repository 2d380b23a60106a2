"""Small random mmproj files in the real LLaVA-1.5 / 1.6 layouts, and deterministic Pillow drawings.

Shared by test_batch.py, test_batch_eval.py and test_checkpoint.py: towers small enough that image rows
stay short on CPU (a 56-px base tile has 16 patches, a 112-px one 64), the same code paths as real files.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from llava_jax.random_mmproj import STANDARD_PINPOINTS, RandomMMProjSpec


def tiny_spec(base: int, anyres: bool, seed: int) -> RandomMMProjSpec:
    """anyres: LLaVA-1.6 (pinpoints scaled from LLaVA's to `base`, spatial_unpad, image newline); else 1.5."""
    pins = tuple((w * base // 336, h * base // 336) for w, h in STANDARD_PINPOINTS) if anyres else ()
    return RandomMMProjSpec(image_size=base, patch_size=14, dim=64, heads=4, ffn=128, blocks=3, proj_hidden=576,
                            out_dim=576, pinpoints=pins, matmul_type="f32", seed=seed,
                            name=f"tiny-llava{'16' if anyres else '15'}-{base}")


def drawing(w: int, h: int, seed: int) -> Image.Image:
    """A few filled shapes on a coloured background (deterministic per seed)."""
    rng = np.random.default_rng(seed)
    img = Image.new("RGB", (w, h), tuple(int(c) for c in rng.integers(0, 256, 3)))
    d = ImageDraw.Draw(img)
    for _ in range(4):
        x0, y0 = int(rng.integers(0, w - 4)), int(rng.integers(0, h - 4))
        x1, y1 = int(rng.integers(x0 + 2, w)), int(rng.integers(y0 + 2, h))
        fill = tuple(int(c) for c in rng.integers(0, 256, 3))
        (d.ellipse if rng.integers(2) else d.rectangle)([x0, y0, x1, y1], fill=fill)
    return img
