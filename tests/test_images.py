"""Image preprocessing: pixel parity with HF's (PIL) image processors, anyres layouts and token counts
against HF's LLaVA-NeXT arithmetic, llama.cpp's layouts, and clear errors for bad image files."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from llava_jax.config import VisionConfig
from llava_jax.errors import LlavaError
from llava_jax.images import (
    image_layout,
    load_image,
    preprocess,
    resize_llamacpp,
    select_best_resolution,
    unpad_crop,
)

PINPOINTS_WH = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
REF_IMAGES = ("photo_640x488", "shapes_200x150", "shapes_300x900", "shapes_400x300")
# landscape, portrait, small (<336), large, extreme aspects, exact pinpoints, odd sizes
SIZES = [(640, 488), (488, 640), (200, 150), (150, 200), (100, 100), (336, 336), (1500, 1100), (1100, 1500),
         (4000, 3000), (2000, 500), (500, 2000), (1008, 336), (672, 672), (337, 335), (1, 1), (3, 1000),
         (1000, 3), (800, 601), (333, 999)]


def vision_cfg(pinpoints=PINPOINTS_WH, merge="spatial_unpad") -> VisionConfig:
    return VisionConfig(image_size=336, patch_size=14, dim=64, ffn_dim=128, n_layers=2, n_heads=4, norm_eps=1e-5,
                        image_mean=tuple(float(np.float32(m)) for m in CLIP_MEAN),
                        image_std=tuple(float(np.float32(s)) for s in CLIP_STD), projector="mlp", proj_in=64,
                        proj_hidden=64, out_dim=64, grid_pinpoints=pinpoints, patch_merge=merge,
                        has_newline=bool(pinpoints))


def random_image(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    # smooth-ish content so resampling matters, plus noise
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([(x * 255 // max(w - 1, 1)), (y * 255 // max(h - 1, 1)), ((x + y) * 3) % 256], -1)
    noise = rng.integers(-20, 20, (h, w, 3))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8), "RGB")


def ref_image(shared_reference, name: str) -> Image.Image:
    return load_image(shared_reference / "mm" / "images" / f"{name}.png")


# ---------------------------------------------------------------------------------------------
# HF parity (transformers' PIL-backend processors, as configured in tests/hf_fixtures.py)


def hf_llava_processor():
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    return LlavaImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
                                  do_center_crop=True, do_pad=True, image_mean=list(CLIP_MEAN),
                                  image_std=list(CLIP_STD), resample=3)


def hf_llava_next_processor():
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    return LlavaNextImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
                                      do_center_crop=True, do_pad=True,
                                      image_grid_pinpoints=[[h, w] for w, h in PINPOINTS_WH],
                                      image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD), resample=3)


@pytest.mark.parametrize("size", [(640, 488), (300, 900), (200, 150), (336, 336), (1500, 1100), (101, 337)])
def test_llava15_pixels_equal_hf(size):
    img = random_image(*size)
    hf = hf_llava_processor()(img, return_tensors="np")["pixel_values"]
    ours = preprocess(img, vision_cfg(pinpoints=()))
    assert ours.pixels.dtype == np.float32 and ours.pixels.shape == (1, 3, 336, 336)
    np.testing.assert_array_equal(ours.pixels, hf)
    assert ours.layout.n_tokens == 576


@pytest.mark.parametrize("size", [(640, 488), (488, 640), (200, 150), (300, 900), (1500, 1100), (2000, 500)])
def test_llava16_pixels_equal_hf(size):
    img = random_image(*size, seed=1)
    out = hf_llava_next_processor()(img, return_tensors="np")
    hf = out["pixel_values"][0]
    ours = preprocess(img, vision_cfg())
    assert ours.pixels.shape == hf.shape
    np.testing.assert_array_equal(ours.pixels, hf)
    assert tuple(out["image_sizes"][0]) == (size[1], size[0])


def test_reference_images_pixels_equal_hf(shared_reference):
    p15, p16 = hf_llava_processor(), hf_llava_next_processor()
    for name in REF_IMAGES:
        img = ref_image(shared_reference, name)
        np.testing.assert_array_equal(preprocess(img, vision_cfg(pinpoints=())).pixels,
                                      p15(img, return_tensors="np")["pixel_values"])
        np.testing.assert_array_equal(preprocess(img, vision_cfg()).pixels,
                                      p16(img, return_tensors="np")["pixel_values"][0])


def hf_token_count(w: int, h: int) -> int:
    """LLaVA-NeXT image tokens for an image of w×h, by transformers' own processor arithmetic."""
    from transformers.models.llava_next.processing_llava_next import LlavaNextProcessor

    proc = object.__new__(LlavaNextProcessor)  # the arithmetic needs no tokenizer
    proc.image_processor = hf_llava_next_processor()
    proc.patch_size, proc.num_additional_image_tokens, proc.vision_feature_select_strategy = 14, 1, "default"
    return proc._get_number_of_features(h, w, 336, 336) - 1  # "default" drops the CLS feature


@pytest.mark.parametrize("size", SIZES)
def test_llava16_token_counts_equal_hf(size):
    layout = image_layout(size, vision_cfg())
    assert layout.n_tokens == hf_token_count(*size)
    rows, cols = layout.unpadded_shape
    assert layout.n_tokens == 576 + rows * (cols + 1)


@pytest.mark.parametrize("size", SIZES)
def test_select_best_resolution_matches_hf(size):
    from transformers.image_processing_utils import select_best_resolution as hf_select

    hf_h, hf_w = hf_select((size[1], size[0]), [[h, w] for w, h in PINPOINTS_WH])
    assert select_best_resolution(size, PINPOINTS_WH) == (hf_w, hf_h)


@pytest.mark.parametrize("size", [(640, 488), (488, 640), (200, 150), (300, 900), (1000, 3), (3, 1000)])
def test_unpad_matches_hf_unpad_image(size):
    import torch
    from transformers.models.llava_next.modeling_llava_next import unpad_image

    w, h = size
    bw, bh = select_best_resolution(size, PINPOINTS_WH)
    grid = torch.zeros(1, bh // 14, bw // 14)
    expected = unpad_image(grid, (h, w)).shape[1:]
    top, bottom, left, right = unpad_crop(size, (bh // 14, bw // 14))
    assert (bh // 14 - top - bottom, bw // 14 - left - right) == tuple(expected)


def test_other_merge_types():
    flat = image_layout((640, 488), vision_cfg(merge="flat"))
    spatial = image_layout((640, 488), vision_cfg(merge="spatial"))
    assert flat.n_tiles == spatial.n_tiles == 5
    assert flat.n_tokens == spatial.n_tokens == 5 * 576


# ---------------------------------------------------------------------------------------------
# llama.cpp compat layouts


@pytest.mark.parametrize("name", REF_IMAGES)
def test_llamacpp_token_counts_match_reference(shared_reference, name):
    for kind, cfg in (("llava15", vision_cfg(pinpoints=())), ("llava16", vision_cfg())):
        meta = json.loads((shared_reference / "mm" / "llama.cpp" / f"mmproj-{kind}-tiny-f32__{name}.json").read_text())
        chunks = [c["n_tokens"] for c in meta["chunks"] if c["type"] == "image"]
        img = ref_image(shared_reference, name)
        layout = image_layout(img.size, cfg, "llama.cpp")
        assert layout.n_tokens == meta["n_image_tokens"] == sum(chunks)
        assert layout.n_tiles == len(chunks)
        assert preprocess(img, cfg, "llama.cpp").pixels.shape == (len(chunks), 3, 336, 336)


def test_llamacpp_16_small_image_is_one_stretched_tile():
    img = random_image(200, 150)
    prep = preprocess(img, vision_cfg(), "llama.cpp")
    assert prep.layout.n_tiles == 1 and prep.layout.merge == "single"
    expected = preprocess(resize_llamacpp(img, (336, 336)), vision_cfg(pinpoints=()), "llama.cpp")
    np.testing.assert_array_equal(prep.pixels, expected.pixels)  # a 336² input is used as is


def test_llamacpp_resize_runs_horizontal_pass_first():
    # Pillow starts with the axis that shrinks most; llama.cpp always starts horizontally.
    img = random_image(300, 900)
    two_pass = np.asarray(resize_llamacpp(img, (336, 336)))
    one_axis = np.asarray(img.resize((336, 900), Image.Resampling.BICUBIC).resize((336, 336), Image.Resampling.BICUBIC))
    np.testing.assert_array_equal(two_pass, one_axis)


def test_unknown_compat_mode():
    with pytest.raises(LlavaError, match="compat"):
        image_layout((10, 10), vision_cfg(), "ollama")


# ---------------------------------------------------------------------------------------------
# loading


def test_load_image_converts_to_rgb(tmp_path):
    rgba = Image.new("RGBA", (10, 7), (10, 20, 30, 40))
    rgba.save(tmp_path / "a.png")
    Image.new("L", (5, 5), 77).save(tmp_path / "g.png")
    img = load_image(tmp_path / "a.png")
    assert img.mode == "RGB" and img.size == (10, 7) and img.getpixel((0, 0)) == (10, 20, 30)
    assert load_image(str(tmp_path / "g.png")).getpixel((1, 1)) == (77, 77, 77)


@pytest.mark.parametrize("kind", ["missing", "directory", "garbage", "truncated", "empty"])
def test_bad_image_files_raise_one_line(tmp_path, kind):
    path = tmp_path / "img.png"
    if kind == "directory":
        path.mkdir()
    elif kind == "garbage":
        path.write_bytes(b"this is not an image at all" * 10)
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        random_image(64, 64).save(path)
        path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(LlavaError) as err:
        load_image(path)
    msg = str(err.value)
    assert "\n" not in msg and str(path) in msg
