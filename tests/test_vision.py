"""The CLIP ViT + projector: llama.cpp compat mode against llama.cpp's own embeddings (shared/reference/mm),
LLaVA mode against HF transformers (tiny random LLaVA / LLaVA-NeXT) and against a plain numpy forward pass,
batching, packing and the scan."""

from __future__ import annotations

import json
from dataclasses import replace

import jax
import numpy as np
import pytest
from hf_fixtures import hf_llava15_dir, hf_llava16_dir  # noqa: F401  (session fixtures)
from PIL import Image

from llava_jax.images import ImageLayout, image_layout, load_image
from llava_jax.random_mmproj import PRESETS, RandomMMProjSpec, random_mmproj_tensors, write_random_mmproj
from llava_jax.vision import ImageEncoder, ImageModel, pack_image_features

REF_IMAGES = ("photo_640x488", "shapes_200x150", "shapes_300x900", "shapes_400x300")
# 56-pixel tiles (16 patches) keep the XLA:CPU runs short; the reference files cover the 336-pixel case.
TINY = RandomMMProjSpec(image_size=56, dim=32, heads=2, ffn=64, blocks=3, proj_hidden=48, out_dim=40,
                        matmul_type="f32")


def random_image(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


# ---------------------------------------------------------------------------------------------
# compat mode vs llama.cpp


@pytest.fixture(scope="module")
def llamacpp_results(shared_reference):
    """{(kind, image): (ours, reference, n_tiles)} for both tiny files × 4 images, each file's images in one call."""
    mm = shared_reference / "mm"
    out = {}
    for kind in ("llava15", "llava16"):
        enc = ImageEncoder.from_gguf(mm / f"mmproj-{kind}-tiny-f32.gguf", compat="llama.cpp", text_dim=576)
        images = [load_image(mm / "images" / f"{name}.png") for name in REF_IMAGES]
        for name, img, emb in zip(REF_IMAGES, images, enc.embed(images), strict=True):
            ref = np.load(mm / "llama.cpp" / f"mmproj-{kind}-tiny-f32__{name}.npz")["embedding"]
            meta = json.loads((mm / "llama.cpp" / f"mmproj-{kind}-tiny-f32__{name}.json").read_text())
            assert enc.n_tokens(img.size) == meta["n_image_tokens"]
            out[kind, name] = np.asarray(emb), ref
    return out


@pytest.mark.parametrize("kind", ["llava15", "llava16"])
@pytest.mark.parametrize("name", REF_IMAGES)
def test_compat_matches_llamacpp(llamacpp_results, kind, name):
    ours, ref = llamacpp_results[kind, name]
    assert ours.shape == ref.shape and ours.dtype == np.float32
    # measured: max abs diff 1.0e-3 .. 1.7e-3, mean 2e-5 (ggml's fp16 rounding emulated; the rest are
    # fp16 GELU-table flips), min cosine > 0.9999997
    assert np.abs(ours - ref).max() <= 5e-3
    assert cosines(ours, ref).min() >= 0.99999


def test_compat_exact_f32_rendering_within_tolerance(shared_reference):
    """Without emulating ggml's fp16 roundings, the same graph in exact f32 lands at ~2.5e-3."""
    mm = shared_reference / "mm"
    enc = ImageEncoder.from_gguf(mm / "mmproj-llava16-tiny-f32.gguf", compat="llama.cpp", rounding=False)
    name = "shapes_300x900"
    ours = np.asarray(enc.embed([mm / "images" / f"{name}.png"])[0])
    ref = np.load(mm / "llama.cpp" / f"mmproj-llava16-tiny-f32__{name}.npz")["embedding"]
    assert 1e-3 < np.abs(ours - ref).max() <= 5e-3
    assert cosines(ours, ref).min() >= 0.99999


def test_llava_mode_differs_from_llamacpp(shared_reference):
    """Sanity: LLaVA's own semantics are not llama.cpp's (different preprocessing, CLS order, depth)."""
    mm = shared_reference / "mm"
    enc = ImageEncoder.from_gguf(mm / "mmproj-llava15-tiny-f32.gguf")
    ours = np.asarray(enc.embed([mm / "images" / "shapes_400x300.png"])[0])
    ref = np.load(mm / "llama.cpp" / "mmproj-llava15-tiny-f32__shapes_400x300.npz")["embedding"]
    assert ours.shape == ref.shape and np.abs(ours - ref).max() > 0.1


# ---------------------------------------------------------------------------------------------
# LLaVA mode vs a plain numpy CLIP + projector


def numpy_forward(t: dict[str, np.ndarray], spec: RandomMMProjSpec, pixels: np.ndarray) -> np.ndarray:
    """LLaVA semantics written out in numpy (float64): CLS first, hidden states of the feature layers
    (default: the deepest stored block), CLS dropped, projector with exact GELU."""
    from math import erf

    def gelu(v):
        return 0.5 * v * (1 + np.vectorize(erf)(v / 2**0.5))

    t = {k: v.astype(np.float64) for k, v in t.items()}

    def ln(x, p):
        mu = x.mean(-1, keepdims=True)
        return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + 1e-5) * t[p + ".weight"] + t[p + ".bias"]

    def lin(x, p):
        return x @ t[p + ".weight"].T + t[p + ".bias"]

    n, p, d, heads = pixels.shape[0], spec.patch_size, spec.dim, spec.heads
    g = spec.image_size // p
    patches = pixels.reshape(n, 3, g, p, g, p).transpose(0, 2, 4, 1, 3, 5).reshape(n, g * g, -1)
    x = patches @ t["v.patch_embd.weight"].reshape(d, -1).T
    x = np.concatenate([np.broadcast_to(t["v.class_embd"], (n, 1, d)), x], 1) + t["v.position_embd.weight"]
    states = [ln(x, "v.pre_ln")]
    fc1, fc2 = ("ffn_down", "ffn_up") if spec.legacy_ffn_names else ("ffn_up", "ffn_down")
    for i in range(spec.blocks):
        b, x = f"v.blk.{i}", states[-1]
        h = ln(x, b + ".ln1")
        q, k, v = (lin(h, f"{b}.{m}").reshape(n, -1, heads, d // heads) for m in ("attn_q", "attn_k", "attn_v"))
        s = np.einsum("nqhd,nkhd->nhqk", q, k) / np.sqrt(d // heads)
        a = np.exp(s - s.max(-1, keepdims=True))
        a = np.einsum("nhqk,nkhd->nqhd", a / a.sum(-1, keepdims=True), v).reshape(n, -1, d)
        x = x + lin(a, b + ".attn_out")
        h = lin(ln(x, b + ".ln2"), f"{b}.{fc1}")
        h = gelu(h) if spec.use_gelu else h / (1 + np.exp(-1.702 * h))
        states.append(x + lin(h, f"{b}.{fc2}"))
    feats = np.concatenate([states[i] for i in (spec.feature_layers or (spec.blocks,))], -1)[:, 1:]
    h = lin(feats, "mm.0")
    if spec.projector == "mlp_norm":
        return ln(lin(gelu(ln(h, "mm.1")), "mm.3"), "mm.4")
    return lin(gelu(h), "mm.2")


@pytest.mark.parametrize("variant", [
    {},
    {"legacy_ffn_names": True, "use_gelu": True},
    {"feature_layers": (1, 2)},
    {"feature_layers": (0, 3)},
    {"projector": "mlp_norm", "projector_type": None},
])
def test_llava_mode_matches_numpy_reference(tmp_path, variant):
    spec = replace(TINY, **variant)
    enc = ImageEncoder.from_gguf(write_random_mmproj(tmp_path / "mm.gguf", spec))
    pixels = np.random.default_rng(0).standard_normal((2, 3, 56, 56)).astype(np.float32)
    ours = np.asarray(enc.encode_tiles(pixels))
    ref = numpy_forward(random_mmproj_tensors(spec), spec, pixels)
    assert ours.shape == ref.shape == (2, 16, 40)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=2e-4 * max(1.0, np.abs(ref).max()))


@pytest.mark.slow
def test_f16_weights_and_bf16_compute(tmp_path):
    spec = replace(TINY, matmul_type="f16")
    path = write_random_mmproj(tmp_path / "mm.gguf", spec)
    pixels = np.random.default_rng(1).standard_normal((1, 3, 56, 56)).astype(np.float32)
    ref = numpy_forward(random_mmproj_tensors(spec), spec, pixels)
    f32 = np.asarray(ImageEncoder.from_gguf(path).encode_tiles(pixels))
    np.testing.assert_allclose(f32, ref, atol=2e-4 * np.abs(ref).max())
    bf16 = np.asarray(ImageEncoder.from_gguf(path, dtype="bfloat16").encode_tiles(pixels))
    assert bf16.dtype == np.float32 and cosines(bf16.reshape(-1, 40), ref.reshape(-1, 40)).min() > 0.99


# ---------------------------------------------------------------------------------------------
# batching, packing, scan


def test_one_batched_call_equals_separate_calls(tmp_path):
    # (anyres images batched together are covered by the llama.cpp and HF parity tests)
    enc = ImageEncoder.from_gguf(write_random_mmproj(tmp_path / "mm.gguf", TINY))
    images = [random_image(100, 60, 0), random_image(60, 150, 2)]
    together = enc.embed(images)
    assert [e.shape for e in together] == [(16, 40), (16, 40)]
    for img, emb in zip(images, together, strict=True):
        np.testing.assert_allclose(np.asarray(enc.embed([img])[0]), np.asarray(emb), atol=1e-5)
    assert enc.embed([]) == []


def test_pack_matches_hf_pack_image_features():
    import torch
    from transformers.models.llava_next.modeling_llava_next import LlavaNextModel

    pinpoints_wh = PRESETS["default"].pinpoints
    spec_cfg = type("C", (), {})()
    spec_cfg.vision_config = type("V", (), {"image_size": 28, "patch_size": 14})()
    spec_cfg.image_grid_pinpoints = [[h // 12, w // 12] for w, h in pinpoints_wh]  # 28-pixel tiles, (h, w)
    fake = type("M", (), {"config": spec_cfg})()
    from llava_jax.config import VisionConfig

    cfg = VisionConfig(image_size=28, patch_size=14, dim=8, ffn_dim=8, n_layers=1, n_heads=1, norm_eps=1e-5,
                       image_mean=(0.5,) * 3, image_std=(0.5,) * 3, projector="mlp", proj_in=8, proj_hidden=8,
                       out_dim=6, grid_pinpoints=tuple((w // 12, h // 12) for w, h in pinpoints_wh),
                       patch_merge="spatial_unpad", has_newline=True)
    rng = np.random.default_rng(0)
    newline = rng.standard_normal(6).astype(np.float32)
    for size in [(53, 40), (40, 53), (20, 20), (84, 28), (10, 70)]:
        layout = image_layout(size, cfg)
        feats = rng.standard_normal((layout.n_tiles, 4, 6)).astype(np.float32)
        (hf,), _ = LlavaNextModel.pack_image_features(fake, [torch.from_numpy(feats)], torch.tensor([[size[1], size[0]]]),
                                                     "default", torch.from_numpy(newline))
        ours = np.asarray(pack_image_features(feats, layout, newline))
        assert ours.shape[0] == layout.n_tokens
        np.testing.assert_array_equal(ours, hf.numpy())


def test_pack_flat_and_spatial():
    feats = np.arange(5 * 4 * 2, dtype=np.float32).reshape(5, 4, 2)
    flat = ImageLayout((60, 60), 5, 4, "flat", (2, 2))
    np.testing.assert_array_equal(pack_image_features(feats, flat, None), feats.reshape(-1, 2))
    spatial = pack_image_features(feats, ImageLayout((60, 60), 5, 4, "spatial", (2, 2)), None)
    # tile grid 2×2 of 2×2 features → one 4×4 map, row-major: first row = tile0 row0, tile1 row0
    np.testing.assert_array_equal(spatial[4:8], np.concatenate([feats[1, :2], feats[2, :2]]))


def test_scan_equals_unrolled(tmp_path):
    enc = ImageEncoder.from_gguf(write_random_mmproj(tmp_path / "mm.gguf", TINY))
    pixels = np.random.default_rng(2).standard_normal((1, 3, 56, 56)).astype(np.float32)
    unrolled = ImageModel(enc.cfg, enc.dtype, "llava", None, unroll=True)
    out = jax.jit(lambda p, x: unrolled.apply({"params": p}, x))(enc.params, pixels)
    np.testing.assert_allclose(np.asarray(out), np.asarray(enc.encode_tiles(pixels)), atol=1e-5)


# ---------------------------------------------------------------------------------------------
# LLaVA mode vs HF transformers (tiny random checkpoints, f32)


def _hf_image_features(model, kind: str, inputs) -> np.ndarray:
    import torch

    with torch.no_grad():
        kwargs = {"image_sizes": inputs["image_sizes"]} if kind == "llava16" else {}
        out = model.model.get_image_features(pixel_values=inputs["pixel_values"], vision_feature_layer=-2,
                                             vision_feature_select_strategy="default", **kwargs)
    feats = getattr(out, "pooler_output", out)
    if isinstance(feats, list | tuple):
        feats = torch.cat([f.reshape(-1, f.shape[-1]) for f in feats])
    return feats.reshape(-1, feats.shape[-1]).numpy()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["llava15", "llava16"])
def test_llava_mode_matches_hf(kind, hf_llava15_dir, hf_llava16_dir, tmp_path, shared_reference):  # noqa: F811
    from transformers import LlavaForConditionalGeneration, LlavaNextForConditionalGeneration
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    from llava_jax.convert import write_mmproj

    hf_dir = hf_llava15_dir if kind == "llava15" else hf_llava16_dir
    gguf_path = write_mmproj(hf_dir, tmp_path / "mmproj.gguf", outtype="f32")
    enc = ImageEncoder.from_gguf(gguf_path, text_dim=64)
    cls = LlavaForConditionalGeneration if kind == "llava15" else LlavaNextForConditionalGeneration
    model = cls.from_pretrained(hf_dir).eval()
    proc = (LlavaImageProcessorPil if kind == "llava15" else LlavaNextImageProcessorPil).from_pretrained(hf_dir)
    # landscape, portrait, small (<336), large
    images = [load_image(shared_reference / "mm" / "images" / f"{n}.png") for n in REF_IMAGES]
    images += [random_image(1500, 1100, 3), random_image(90, 130, 4)]
    ours_all = enc.embed(images)
    for img, ours in zip(images, ours_all, strict=True):
        inputs = proc(img, return_tensors="pt")
        pixels = inputs["pixel_values"].numpy().reshape(-1, 3, 336, 336)
        np.testing.assert_array_equal(enc.preprocess(img).pixels, pixels)
        ref = _hf_image_features(model, kind, inputs)
        assert ours.shape == ref.shape, img.size
        assert enc.n_tokens(img.size) == ref.shape[0]
        np.testing.assert_allclose(np.asarray(ours), ref, rtol=0, atol=1e-4)
