"""Images → normalised CLIP tiles + the layout that says how their features become tokens.

Two pipelines, picked by `compat`:

- "llava" (default): LLaVA's own semantics, as haotian-liu/LLaVA and HF transformers' `Llava*` image
  processors (PIL backend) do them, pixel for pixel.
  1.5: expand to a square filled with the mean colour, resize the shortest side to the tile size
  (bicubic), centre-crop, normalise. One tile, `n_patches` tokens.
  1.6 (anyres, the file has grid pinpoints): pick the best resolution, resize keeping the aspect and pad
  with black, cut tiles row-major; the base image is the whole picture stretched to one tile and comes
  first. Features are then merged per `patch_merge` (`spatial_unpad`: the tile grid is cropped back to the
  picture's aspect and `image_newline` closes every row).
- "llama.cpp": what llama.cpp's mtmd preprocessor does (measured against its outputs in
  shared/reference/mm). 1.5: resize *then* pad to the square with (122, 116, 104). 1.6: no slicing when
  both sides fit one tile; otherwise the tiles row-major, then the overview stretched to one tile, each a
  separate `n_patches`-token image (no unpad, no newline).

All resizing is Pillow's bicubic on 8-bit RGB. llama.cpp reimplements Pillow's fixed-point resampler but
always runs the horizontal pass first, where Pillow starts with the axis that shrinks most; compat mode
runs the two passes as two one-axis Pillow resizes, which gives llama.cpp's bytes exactly.
Pixels come out as float32 `[n_tiles, 3, S, S]`.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from llava_jax.config import VisionConfig
from llava_jax.errors import LlavaError

COMPAT_MODES = ("llava", "llama.cpp")
LLAMACPP_PAD_COLOR = (122, 116, 104)  # hard-coded in llama.cpp for LLaVA projectors


def load_image(path) -> Image.Image:
    """Open an image file as RGB (alpha dropped, as LLaVA and llama.cpp do); LlavaError (one line) if it can't."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise LlavaError(f"image not found: {path}")
    if os.path.isdir(path):
        raise LlavaError(f"expected an image file, got a directory: {path}")
    try:
        with Image.open(path) as img:
            img.load()
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise LlavaError(f"cannot read image {path}: {reason}") from None


def as_rgb(image) -> Image.Image:
    """A PIL image, a path, or an HxWx3 uint8 array → RGB PIL image."""
    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else image.convert("RGB")
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
            raise LlavaError(f"image arrays must be uint8 [H, W, 3], got {image.dtype} {list(image.shape)}")
        return Image.fromarray(image, "RGB")
    return load_image(image)


# ---------------------------------------------------------------------------------------------
# layout


@dataclass(frozen=True)
class ImageLayout:
    """How one image is cut into tiles and how the tiles' features become tokens.

    size:   original (w, h) in pixels.
    n_tiles: tiles fed to the ViT for this image (base/overview included).
    tile_tokens: features per tile (`n_patches`, 576 for CLIP-L/14-336).
    merge:  "single" (one tile), "separate" (llama.cpp 1.6: every tile its own image, in tile order),
            "flat" / "spatial" / "spatial_unpad" (LLaVA-1.6 anyres, base tile first).
    grid:   (rows, cols) of anyres tiles, (0, 0) when there are none.
    crop:   spatial_unpad: feature rows/cols removed (top, bottom, left, right) from the tile grid map.
    """

    size: tuple[int, int]
    n_tiles: int
    tile_tokens: int
    merge: str = "single"
    grid: tuple[int, int] = (0, 0)
    crop: tuple[int, int, int, int] = (0, 0, 0, 0)

    @property
    def n_tokens(self) -> int:
        if self.merge in ("single", "separate", "flat", "spatial"):
            return self.n_tiles * self.tile_tokens
        rows, cols = self.unpadded_shape
        return self.tile_tokens + rows * (cols + 1)  # base + unpadded grid with a newline after each row

    @property
    def unpadded_shape(self) -> tuple[int, int]:
        """(rows, cols) of the spatial feature map after the unpad crop."""
        side = math.isqrt(self.tile_tokens)
        top, bottom, left, right = self.crop
        return self.grid[0] * side - top - bottom, self.grid[1] * side - left - right


@dataclass(frozen=True)
class PreparedImage:
    pixels: np.ndarray  # float32 [n_tiles, 3, S, S]
    layout: ImageLayout


def image_layout(size: tuple[int, int], cfg: VisionConfig, compat: str = "llava") -> ImageLayout:
    """The layout of an image of `size` = (w, h), computed from the size alone (no pixels needed)."""
    check_compat(compat)
    w, h = size
    if w <= 0 or h <= 0:
        raise LlavaError(f"image has an empty size {w}x{h}")
    tile, tokens = cfg.image_size, cfg.n_patches
    if not cfg.is_anyres:
        return ImageLayout((w, h), 1, tokens)
    if compat == "llama.cpp":
        if w <= tile and h <= tile:
            return ImageLayout((w, h), 1, tokens)
        bw, bh = select_best_resolution((w, h), cfg.grid_pinpoints, float32=True)
        rows, cols = bh // tile, bw // tile
        return ImageLayout((w, h), rows * cols + 1, tokens, "separate", (rows, cols))
    bw, bh = select_best_resolution((w, h), cfg.grid_pinpoints)
    rows, cols = bh // tile, bw // tile
    crop = (0, 0, 0, 0)
    if cfg.patch_merge == "spatial_unpad":
        crop = unpad_crop((w, h), (rows * cfg.patches_per_side, cols * cfg.patches_per_side))
    return ImageLayout((w, h), rows * cols + 1, tokens, cfg.patch_merge, (rows, cols), crop)


def preprocess(image, cfg: VisionConfig, compat: str = "llava") -> PreparedImage:
    """PIL image (or path / uint8 array) → `PreparedImage` (normalised tiles in ViT order + layout)."""
    img = as_rgb(image)
    layout = image_layout(img.size, cfg, compat)
    tile = cfg.image_size
    if compat == "llama.cpp":
        if not cfg.is_anyres:
            tiles = [resize_with_pad_llamacpp(img, (tile, tile), LLAMACPP_PAD_COLOR)]
        elif layout.n_tiles == 1:
            tiles = [resize_llamacpp(img, (tile, tile))]
        else:
            rows, cols = layout.grid
            refined = resize_with_pad_llamacpp(img, (cols * tile, rows * tile), (0, 0, 0))
            tiles = divide_to_tiles(refined, tile) + [resize_llamacpp(img, (tile, tile))]
        return PreparedImage(np.stack([normalize_llamacpp(t, cfg) for t in tiles]), layout)

    if not cfg.is_anyres:
        color = tuple(int(m * 255) for m in cfg.image_mean)
        tiles = [resize_shortest_and_crop(expand_to_square(img, color), tile)]
    else:
        rows, cols = layout.grid
        padded = resize_and_pad(img, (cols * tile, rows * tile))
        tiles = [_resize(img, (tile, tile))] + [resize_shortest_and_crop(t, tile) for t in divide_to_tiles(padded, tile)]
    return PreparedImage(np.stack([normalize(t, cfg) for t in tiles]), layout)


def check_compat(compat: str) -> None:
    if compat not in COMPAT_MODES:
        raise LlavaError(f"unknown compat mode {compat!r} (choose from {', '.join(COMPAT_MODES)})")


# ---------------------------------------------------------------------------------------------
# LLaVA / HF operations


def _resize(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Pillow bicubic resize to (w, h); a same-size resize is a copy in Pillow too."""
    return img.resize(size, Image.Resampling.BICUBIC)


def expand_to_square(img: Image.Image, color: tuple[int, int, int]) -> Image.Image:
    """LLaVA-1.5's `expand2square`: centre the picture on a square canvas of `color`."""
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    canvas = Image.new("RGB", (side, side), color)
    canvas.paste(img, ((side - w) // 2, (side - h) // 2))
    return canvas


def resize_shortest_and_crop(img: Image.Image, size: int) -> Image.Image:
    """CLIP's processor: shortest side → `size` (the long side truncated), then a centred `size` crop."""
    w, h = img.size
    if w <= h:
        new = (size, int(size * h / w))
    else:
        new = (int(size * w / h), size)
    img = _resize(img, new)
    left, top = (img.size[0] - size) // 2, (img.size[1] - size) // 2
    if (left, top) == (0, 0) and img.size == (size, size):
        return img
    return img.crop((left, top, left + size, top + size))


def normalize(img: Image.Image, cfg: VisionConfig) -> np.ndarray:
    """uint8 RGB → float32 [3, H, W] as HF does it: x * (1/255) in float64, to float32, (x - mean) / std."""
    x = (np.asarray(img, dtype=np.uint8).astype(np.float64) * (1 / 255)).astype(np.float32)
    mean, std = np.asarray(cfg.image_mean, np.float32), np.asarray(cfg.image_std, np.float32)
    return np.ascontiguousarray(((x - mean) / std).transpose(2, 0, 1))


def select_best_resolution(size: tuple[int, int], candidates, float32: bool = False) -> tuple[int, int]:
    """The candidate (w, h) that keeps the most of the picture's pixels, then wastes the least area.

    `size` and candidates are (w, h). `float32` reproduces llama.cpp's single-precision arithmetic
    (LLaVA and HF compute in double); the choice only differs on exact ties.
    """
    w, h = size
    best, best_eff, best_waste = None, 0, math.inf
    for cw, ch in candidates:
        if float32:
            scale = min(np.float32(cw) / np.float32(w), np.float32(ch) / np.float32(h))
            dw, dh = int(np.float32(w) * scale), int(np.float32(h) * scale)
        else:
            scale = min(cw / w, ch / h)
            dw, dh = int(w * scale), int(h * scale)
        effective = min(dw * dh, w * h)
        waste = cw * ch - effective
        if effective > best_eff or (effective == best_eff and waste < best_waste):
            best, best_eff, best_waste = (cw, ch), effective, waste
    return best


def resize_and_pad(img: Image.Image, target: tuple[int, int]) -> Image.Image:
    """LLaVA-1.6's `resize_and_pad_image`: fit inside target (w, h) keeping the aspect, centre on black."""
    w, h = img.size
    tw, th = target
    scale_w, scale_h = tw / w, th / h
    if scale_w < scale_h:
        nw, nh = tw, min(math.ceil(h * scale_w), th)
    else:
        nw, nh = min(math.ceil(w * scale_h), tw), th
    canvas = Image.new("RGB", (tw, th), (0, 0, 0))
    canvas.paste(_resize(img, (nw, nh)), ((tw - nw) // 2, (th - nh) // 2))
    return canvas


def divide_to_tiles(img: Image.Image, tile: int) -> list[Image.Image]:
    """Row-major `tile`×`tile` crops (the image sides are multiples of `tile`)."""
    w, h = img.size
    return [img.crop((x, y, x + tile, y + tile)) for y in range(0, h, tile) for x in range(0, w, tile)]


def unpad_crop(size: tuple[int, int], grid_hw: tuple[int, int]) -> tuple[int, int, int, int]:
    """Feature rows/cols (top, bottom, left, right) to drop from a (H, W) tile-grid feature map so it has the
    picture's aspect again (LLaVA's `unpad_image`, with HF's rounding to 7 decimals)."""
    w, h = size
    cur_h, cur_w = grid_hw
    if w / h > cur_w / cur_h:
        new_h = int(round(h * (cur_w / w), 7))
        pad = (cur_h - new_h) // 2
        return pad, pad, 0, 0
    new_w = int(round(w * (cur_h / h), 7))
    pad = (cur_w - new_w) // 2
    return 0, 0, pad, pad


# ---------------------------------------------------------------------------------------------
# llama.cpp operations


def resize_llamacpp(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    """llama.cpp's bicubic resize: Pillow's filter, horizontal pass first, 8-bit between the passes."""
    w, h = size
    if w != img.size[0]:
        img = _resize(img, (w, img.size[1]))
    if h != img.size[1]:
        img = _resize(img, (w, h))
    return img


def resize_with_pad_llamacpp(img: Image.Image, target: tuple[int, int], color) -> Image.Image:
    """llama.cpp's resize with `PAD_CEIL`: scale by the smaller ratio (float32), ceil both sides, resize,
    paste at the integer-centred offset on a `color` canvas. (For 1.5 this is resize-then-pad, where
    LLaVA pads to a square first.)"""
    w, h = img.size
    tw, th = target
    if (w, h) == (tw, th):
        return img.copy()
    scale = min(np.float32(tw) / np.float32(w), np.float32(th) / np.float32(h))
    nw = min(math.ceil(np.float32(w) * scale), tw)
    nh = min(math.ceil(np.float32(h) * scale), th)
    canvas = Image.new("RGB", (tw, th), tuple(color))
    canvas.paste(resize_llamacpp(img, (nw, nh)), ((tw - nw) // 2, (th - nh) // 2))
    return canvas


def normalize_llamacpp(img: Image.Image, cfg: VisionConfig) -> np.ndarray:
    """uint8 RGB → float32 [3, H, W] as llama.cpp does it: x / 255 in float32, then (x - mean) / std."""
    x = np.asarray(img, dtype=np.uint8).astype(np.float32) / np.float32(255)
    mean, std = np.asarray(cfg.image_mean, np.float32), np.asarray(cfg.image_std, np.float32)
    return np.ascontiguousarray(((x - mean) / std).transpose(2, 0, 1))
