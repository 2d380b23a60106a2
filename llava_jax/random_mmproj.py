"""Deterministic, randomly initialised mmproj GGUF files of any size.

Used for the project's embedded default (a LLaVA-1.6-style encoder whose projector outputs SmolLM2's
width, 576: its answers do not describe the image) and for a CLIP ViT-L/14-336-sized f16 file to
benchmark image encoding. Files use the real mmproj layout (keys and tensor names llama.cpp reads).

    python -m llava_jax.random_mmproj OUT.gguf [--preset default|clip-l-336] [--seed N]

Weights are drawn from `numpy.random.default_rng(seed)` with O(1) activations in mind: matmul weights
N(0, 1/fan_in), biases 0.02·N, norm weights 1 + 0.1·N, class embedding N(0, 1), positions 0.3·N; the last
projector layer is scaled so image embeddings have about the spread of SmolLM2's token embeddings.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from llava_jax.defaults import cache_dir
from llava_jax.errors import LlavaError

STANDARD_PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))  # (w, h)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class RandomMMProjSpec:
    """Sizes and options of a random mmproj file. `blocks` = stored blocks (LLaVA runs all of them)."""

    image_size: int = 336
    patch_size: int = 14
    dim: int = 64
    heads: int = 4
    ffn: int = 128
    blocks: int = 3
    proj_hidden: int = 576
    out_dim: int = 576
    pinpoints: tuple[tuple[int, int], ...] = ()  # (w, h); non-empty = LLaVA-1.6 (adds model.image_newline)
    use_gelu: bool = False  # False = quick-GELU, as CLIP-L
    legacy_ffn_names: bool = False  # fc1 stored as ffn_down, as the legacy converter does
    matmul_type: str = "f16"  # "f16" | "f32": matmul weights and the patch kernel (norms/biases stay f32)
    projector: str = "mlp"  # tensors: "mlp" (mm.0, mm.2) or "mlp_norm" (Yi-VL: mm.0, mm.1, mm.3, mm.4)
    projector_type: str | None = "mlp"  # the `clip.projector_type` key; None: absent, as in old files
    feature_layers: tuple[int, ...] = ()  # `clip.vision.feature_layer`; the projector reads them concatenated
    seed: int = 0
    name: str = "random-mmproj"
    omit: tuple[str, ...] = ()  # metadata keys or tensor names to leave out (to test validation)


PRESETS: dict[str, RandomMMProjSpec] = {
    # The embedded default: LLaVA-1.6 anyres tiling, small tower, projector out = SmolLM2's 576.
    "default": RandomMMProjSpec(dim=128, heads=4, ffn=512, blocks=4, proj_hidden=576, out_dim=576,
                                pinpoints=STANDARD_PINPOINTS, name="llava_jax-random-mmproj-llava16-576"),
    # CLIP ViT-L/14-336 as LLaVA-1.5-7B stores it (23 of 24 blocks), f16, projector 1024 → 4096 → 4096.
    "clip-l-336": RandomMMProjSpec(dim=1024, heads=16, ffn=4096, blocks=23, proj_hidden=4096, out_dim=4096,
                                   legacy_ffn_names=True, name="llava_jax-random-clip-vit-l-14-336"),
}


def random_mmproj_tensors(spec: RandomMMProjSpec) -> dict[str, np.ndarray]:
    """GGUF tensor name → numpy array (numpy order, float32 or float16) for `spec`."""
    rng = np.random.default_rng(spec.seed)
    mat = np.float16 if spec.matmul_type == "f16" else np.float32

    def normal(shape, scale) -> np.ndarray:
        return (rng.standard_normal(shape, dtype=np.float32) * np.float32(scale))

    def linear(prefix: str, n_out: int, n_in: int, scale: float = 1.0) -> dict[str, np.ndarray]:
        return {f"{prefix}.weight": normal((n_out, n_in), scale / n_in**0.5).astype(mat),
                f"{prefix}.bias": normal((n_out,), 0.02)}

    def norm(prefix: str, n: int) -> dict[str, np.ndarray]:
        return {f"{prefix}.weight": 1 + normal((n,), 0.1), f"{prefix}.bias": normal((n,), 0.02)}

    d, f, p = spec.dim, spec.ffn, spec.patch_size
    n_pos = (spec.image_size // p) ** 2 + 1
    t: dict[str, np.ndarray] = {
        "v.patch_embd.weight": normal((d, 3, p, p), 1 / (3 * p * p) ** 0.5).astype(mat),
        "v.class_embd": normal((d,), 1.0),
        "v.position_embd.weight": normal((n_pos, d), 0.3),
    }
    t |= norm("v.pre_ln", d)
    fc1, fc2 = ("ffn_down", "ffn_up") if spec.legacy_ffn_names else ("ffn_up", "ffn_down")
    for i in range(spec.blocks):
        b = f"v.blk.{i}"
        for name in ("attn_q", "attn_k", "attn_v", "attn_out"):
            t |= linear(f"{b}.{name}", d, d)
        t |= norm(f"{b}.ln1", d) | norm(f"{b}.ln2", d)
        t |= linear(f"{b}.{fc1}", f, d) | linear(f"{b}.{fc2}", d, f)
    t |= linear("mm.0", spec.proj_hidden, d * max(1, len(spec.feature_layers)))
    if spec.projector == "mlp_norm":
        t |= norm("mm.1", spec.proj_hidden) | linear("mm.3", spec.out_dim, spec.proj_hidden)
        t |= {"mm.4.weight": 0.12 * (1 + normal((spec.out_dim,), 0.1)), "mm.4.bias": normal((spec.out_dim,), 0.02)}
    else:
        t |= linear("mm.2", spec.out_dim, spec.proj_hidden, scale=0.1)
    if spec.pinpoints:
        t["model.image_newline"] = normal((spec.out_dim,), 0.12)
    return t


def random_mmproj_metadata(spec: RandomMMProjSpec) -> dict[str, tuple[Any, gguf.GGUFValueType]]:
    """GGUF key → (value, type) for `spec` (`general.architecture` is added by the writer)."""
    T = gguf.GGUFValueType
    file_type = gguf.LlamaFileType.MOSTLY_F16 if spec.matmul_type == "f16" else gguf.LlamaFileType.ALL_F32
    md: dict[str, tuple[Any, gguf.GGUFValueType]] = {
        "general.file_type": (int(file_type), T.UINT32),
        "general.name": (spec.name, T.STRING),
        "general.description": ("image encoder for LLaVA (random weights: answers do not describe the image)",
                                T.STRING),
        "clip.has_text_encoder": (False, T.BOOL),
        "clip.has_vision_encoder": (True, T.BOOL),
        "clip.has_llava_projector": (True, T.BOOL),
        "clip.vision.image_size": (spec.image_size, T.UINT32),
        "clip.vision.patch_size": (spec.patch_size, T.UINT32),
        "clip.vision.embedding_length": (spec.dim, T.UINT32),
        "clip.vision.feed_forward_length": (spec.ffn, T.UINT32),
        "clip.vision.projection_dim": (spec.out_dim, T.UINT32),
        "clip.vision.attention.head_count": (spec.heads, T.UINT32),
        "clip.vision.attention.layer_norm_epsilon": (1e-5, T.FLOAT32),
        "clip.vision.block_count": (spec.blocks, T.UINT32),
        "clip.vision.image_mean": (list(CLIP_MEAN), T.ARRAY),
        "clip.vision.image_std": (list(CLIP_STD), T.ARRAY),
        "clip.use_gelu": (spec.use_gelu, T.BOOL),
    }
    if spec.projector_type is not None:
        md["clip.projector_type"] = (spec.projector_type, T.STRING)
    if spec.feature_layers:
        md["clip.vision.feature_layer"] = (list(spec.feature_layers), T.ARRAY)
    if spec.pinpoints:
        md["clip.vision.image_grid_pinpoints"] = ([int(x) for pair in spec.pinpoints for x in pair], T.ARRAY)
        md["clip.vision.mm_patch_merge_type"] = ("spatial_unpad", T.STRING)
        md["clip.vision.image_aspect_ratio"] = ("anyres", T.STRING)
    return md


def write_random_mmproj(path: str | os.PathLike[str], spec: RandomMMProjSpec = PRESETS["default"]) -> Path:
    """Write the mmproj file described by `spec` to `path` (atomically); returns the path."""
    if spec.matmul_type not in ("f16", "f32"):
        raise LlavaError(f"matmul_type must be f16 or f32, not {spec.matmul_type!r}")
    if spec.dim % spec.heads or spec.image_size % spec.patch_size:
        raise LlavaError(f"bad sizes: dim {spec.dim} / heads {spec.heads}, image {spec.image_size} / patch "
                         f"{spec.patch_size} must divide")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    w = gguf.GGUFWriter(str(partial), arch="clip")
    for key, (value, vtype) in random_mmproj_metadata(spec).items():
        if key not in spec.omit:
            w.add_key_value(key, value, vtype)
    for name, arr in random_mmproj_tensors(spec).items():
        if name not in spec.omit:
            w.add_tensor(name, np.ascontiguousarray(arr))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    partial.replace(path)
    return path


def default_mmproj_path() -> Path:
    """The embedded default mmproj (preset "default"), generated into the cache on first use."""
    spec = PRESETS["default"]
    target = cache_dir() / f"{spec.name}-seed{spec.seed}.gguf"
    if not target.exists():
        write_random_mmproj(target, spec)
    return target


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Write a deterministic random mmproj GGUF.")
    ap.add_argument("out", help="output .gguf path")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="default")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--f32", action="store_true", help="f32 matmul weights (default f16)")
    args = ap.parse_args(argv)
    spec = replace(PRESETS[args.preset], seed=args.seed, matmul_type="f32" if args.f32 else "f16")
    print(write_random_mmproj(args.out, spec))


if __name__ == "__main__":
    main()
