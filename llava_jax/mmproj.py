"""mmproj GGUF (`general.architecture = clip`) → `VisionConfig` + params pytree, with all the validation.

The pytree is what `vision.ImageModel` applies, names mirroring the file:
  v.patch_embd.weight         → params["v"]["patch_embd"]["weight"]     [D, 3, p, p]
  v.class_embd                → params["v"]["class_embd"]               [D]
  v.position_embd.weight      → params["v"]["position_embd"]["weight"]  [T, D]
  v.pre_ln.* / v.post_ln.*    → params["v"]["pre_ln"] / ["post_ln"]
  v.blk.N.attn_q.weight       → params["v"]["blk"]["attn_q"]["weight"][N]  (blocks stacked, scanned)
  mm.K.weight                 → params["mm"]["K"]["weight"]
Legacy files (CLIP's fc1 stored as `ffn_down`, fc2 as `ffn_up`; detected by shape) are read into the
canonical slots (`ffn_up` = fc1). Only the blocks the graph runs are loaded. `model.image_newline` (or
`v.image_newline`) is returned beside the pytree: it is used when packing tokens, not inside the ViT.

Every weight goes through `params.place_tensor` (any dtype the foundation dequantizes), replicated on
the mesh (logical axis "vision"). Matmul weights take the compute dtype; norms, biases, embeddings and
the newline stay f32.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cache

import jax
import jax.numpy as jnp
from gguf import GGMLQuantizationType

from llava_jax.config import VisionConfig
from llava_jax.errors import LlavaError
from llava_jax.gguf_io import GGUFFile, open_gguf
from llava_jax.params import check_tensors, place_tensor
from llava_jax.sharding import ShardingRules, make_mesh, sharding_for


@dataclass
class MMProj:
    """A loaded mmproj file.

    f16_weights: module-relative names ("patch_embd", "blk.attn_q", "mm.0", ...) of matmul weights stored
    as F16 in the file (llama.cpp rounds the other operand of those dot products to f16).
    metadata / tensor_shapes: the file's metadata and name → shape, enough to rebuild `cfg` with
    `VisionConfig.from_metadata` (e.g. after restoring params from a checkpoint).
    compat: the graph the params were loaded for (it decides how many blocks were loaded); None = unknown.
    """

    cfg: VisionConfig
    params: dict
    newline: jax.Array | None
    f16_weights: frozenset[str]
    name: str
    metadata: dict
    tensor_shapes: dict[str, tuple[int, ...]]
    compat: str | None = None


def read_vision_config(gguf: GGUFFile) -> VisionConfig:
    """VisionConfig from an opened mmproj file, every required tensor checked (name, shape, quant type)."""
    cfg = VisionConfig.from_metadata(gguf.metadata, {n: v.shape for n, v in gguf.tensors.items()}, gguf.name)
    check_tensors(gguf, cfg.expected_tensors(newline_name(gguf)))
    return cfg


def newline_name(gguf: GGUFFile) -> str:
    return "v.image_newline" if "v.image_newline" in gguf.tensors else "model.image_newline"


def _canonical_ffn(kind: str, cfg: VisionConfig) -> str:
    if cfg.ffn_swapped and kind in ("ffn_up", "ffn_down"):
        return "ffn_down" if kind == "ffn_up" else "ffn_up"
    return kind


def load_mmproj(path: str | os.PathLike[str], mesh=None, dtype=jnp.float32, compat: str = "llava",
                rules: ShardingRules = ShardingRules()) -> MMProj:
    """Open, validate and place an mmproj file. Raises LlavaError (one line) on any problem."""
    gguf = open_gguf(path)
    cfg = read_vision_config(gguf)
    mesh = make_mesh() if mesh is None else mesh
    n_run = cfg.blocks_to_run(compat)

    def place(name: str, leaf_dtype=jnp.float32) -> jax.Array:
        view = gguf.tensors[name]
        return place_tensor(view, sharding_for(view.shape, ("vision",) * len(view.shape), mesh, rules), leaf_dtype)

    def weight_dtype(name: str):
        return dtype if name.endswith(".weight") and len(gguf.tensors[name].shape) >= 2 else jnp.float32

    v: dict = {"patch_embd": {"weight": place("v.patch_embd.weight", dtype)},
               "position_embd": {"weight": place("v.position_embd.weight")}}
    if cfg.has_patch_bias:
        v["patch_embd"]["bias"] = place("v.patch_embd.bias")
    if cfg.has_class_embd:
        v["class_embd"] = place("v.class_embd")
    norms = ["pre_ln"] if cfg.has_pre_ln else []
    if cfg.has_post_ln and compat == "llama.cpp":
        norms.append("post_ln")
    for norm in norms:
        v[norm] = {"weight": place(f"v.{norm}.weight"), "bias": place(f"v.{norm}.bias")}

    f16: set[str] = set()
    if gguf.tensors["v.patch_embd.weight"].qtype == GGMLQuantizationType.F16:
        f16.add("patch_embd")
    if n_run:
        layers: dict = {}
        for kind in ("attn_q", "attn_k", "attn_v", "attn_out", "ln1", "ln2", "ffn_up", "ffn_down"):
            slot = layers.setdefault(_canonical_ffn(kind, cfg), {})
            for leaf in ("weight", "bias"):
                names = [f"v.blk.{i}.{kind}.{leaf}" for i in range(n_run)]
                slot[leaf] = _stack([place(n, weight_dtype(n)) for n in names], mesh, rules)
            if any(gguf.tensors[f"v.blk.{i}.{kind}.weight"].qtype == GGMLQuantizationType.F16 for i in range(n_run)):
                f16.add(f"blk.{_canonical_ffn(kind, cfg)}")
        v["blk"] = layers

    mm: dict = {}
    proj = ("0", "2") if cfg.projector == "mlp" else ("0", "1", "3", "4")
    for idx in proj:
        mm[idx] = {leaf: place(f"mm.{idx}.{leaf}", weight_dtype(f"mm.{idx}.{leaf}")) for leaf in ("weight", "bias")}
        if idx in ("0", "2", "3") and gguf.tensors[f"mm.{idx}.weight"].qtype == GGMLQuantizationType.F16:
            f16.add(f"mm.{idx}")
    newline = place(newline_name(gguf)) if cfg.has_newline else None
    shapes = {n: tuple(t.shape) for n, t in gguf.tensors.items()}
    return MMProj(cfg, {"v": v, "mm": mm}, newline, frozenset(f16), gguf.name, dict(gguf.metadata), shapes, compat)


def _stack(leaves: list[jax.Array], mesh, rules: ShardingRules) -> jax.Array:
    """Per-layer arrays → one array with a leading layer axis, replicated like the leaves."""
    shape = (len(leaves), *leaves[0].shape)
    return _stacker(sharding_for(shape, ("vision",) * len(shape), mesh, rules))(*leaves)


@cache
def _stacker(out_sharding):
    return jax.jit(lambda *xs: jnp.stack(xs), out_shardings=out_sharding)


def check_text_width(mmproj_name: str, out_dim: int, text_dim: int) -> None:
    if out_dim != text_dim:
        raise LlavaError(f"{mmproj_name}: the projector outputs width {out_dim} but the language model's width is "
                         f"{text_dim}; this mmproj belongs to another model")
