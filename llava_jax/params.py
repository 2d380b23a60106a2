"""GGUF tensors → params pytree, dequantized on the devices that hold each shard.

For each tensor: its raw blocks (a memory-mapped view) go to the devices with the sharding of the
*blocks* array, each device receiving only its own slice (`jax.make_array_from_callback`), and a
jitted `quants.dequantize_blocks` turns them into the target dtype in place. The host never builds
a full-precision copy of the model.

The pytree mirrors GGUF names: "blk.3.attn_q.weight" → params["blk_3"]["attn_q"]["weight"]; with
`scan_layers` the blocks are stacked on a leading layer axis under params["blk"].
"""

from __future__ import annotations

from functools import cache

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from llava_jax import quants
from llava_jax.config import TextConfig
from llava_jax.errors import LlavaError
from llava_jax.gguf_io import GGUFFile, TensorView
from llava_jax.sharding import ShardingRules, sharding_for, text_param_axes

F32_ONLY_KINDS = ("norm", "rope_freqs")  # small vectors kept in f32 whatever the compute dtype


def check_tensors(gguf: GGUFFile, expected: dict[str, tuple[int, ...]]) -> None:
    """Every expected tensor present, with the expected shape and a supported quant type; else LlavaError."""
    for name, shape in expected.items():
        view = gguf.tensors.get(name)
        if view is None:
            raise LlavaError(f"{gguf.name}: missing tensor {name}")
        if tuple(view.shape) != tuple(shape):
            raise LlavaError(f"{gguf.name}: tensor {name} has shape {list(view.shape)}, expected {list(shape)}")
        quants.check_supported(name, view.qtype)


@cache
def _dequantizer(qtype, shape: tuple[int, ...], dtype, out_sharding: NamedSharding):
    def run(blocks):
        return quants.dequantize_blocks(blocks, qtype).reshape(shape).astype(dtype)

    return jax.jit(run, out_shardings=out_sharding)


def place_tensor(view: TensorView, sharding: NamedSharding, dtype=jnp.float32) -> jax.Array:
    """Dequantize one GGUF tensor straight into `sharding` (logical shape `view.shape`) as `dtype`.

    The blocks array `[*shape[:-1], n_blocks, type_size]` is sharded like the tensor, with the last
    logical axis's mesh axis on `n_blocks` (when it divides) so each device dequantizes its own slice.
    """
    blocks = view.blocks()
    spec = tuple(sharding.spec) + (None,) * (len(view.shape) - len(sharding.spec))
    last = spec[-1]
    if last is not None and blocks.shape[-2] % sharding.mesh.shape[last]:
        last = None  # blocks do not split evenly: each device reads the full rows
    block_sharding = NamedSharding(sharding.mesh, PartitionSpec(*spec[:-1], last, None))
    raw = jax.make_array_from_callback(blocks.shape, block_sharding, lambda idx: np.ascontiguousarray(blocks[idx]))
    return _dequantizer(view.qtype, tuple(view.shape), jnp.dtype(dtype), sharding)(raw)


def _leaf_path(gguf_name: str) -> tuple[str, ...]:
    """"blk.3.attn_q.weight" → ("blk_3", "attn_q", "weight"); "token_embd.weight" → ("token_embd", "weight")."""
    parts = gguf_name.split(".")
    if parts[0] == "blk":
        return (f"blk_{parts[1]}", *parts[2:])
    return tuple(parts)


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def load_text_params(gguf: GGUFFile, cfg: TextConfig, mesh, dtype, rules: ShardingRules = ShardingRules(),
                     scan_layers: bool = False, progress=None) -> dict:
    """Validate, then dequantize every decoder tensor into its sharding. Returns the params pytree."""
    expected = cfg.expected_tensors()
    check_tensors(gguf, expected)
    params: dict = {}
    for name in expected:
        view = gguf.tensors[name]
        leaf_dtype = jnp.float32 if any(k in name for k in F32_ONLY_KINDS) else dtype
        axes = text_param_axes(name)
        _set(params, _leaf_path(name), place_tensor(view, sharding_for(view.shape, axes, mesh, rules), leaf_dtype))
        if progress is not None:
            progress(name)
    if scan_layers:
        params = stack_layers(params, cfg.n_layers, mesh, rules)
    return params


def stack_layers(params: dict, n_layers: int, mesh, rules: ShardingRules) -> dict:
    """Per-layer subtrees `blk_0..blk_{L-1}` → one subtree `blk` with a leading layer axis."""
    layers = [params.pop(f"blk_{i}") for i in range(n_layers)]

    def stack(path, *leaves):
        name = f"blk.0.{'.'.join(k.key for k in path)}"
        axes = (None, *text_param_axes(name))
        return _stack(sharding_for((n_layers, *leaves[0].shape), axes, mesh, rules))(*leaves)

    params["blk"] = jax.tree_util.tree_map_with_path(stack, *layers)
    return params


# Fused projections: one weight (and one dot) for q/k/v and one for gate/up, rows concatenated in this order.
FUSED_PROJECTIONS: dict[str, tuple[str, ...]] = {"attn_qkv": ("attn_q", "attn_k", "attn_v"),
                                                 "ffn_gate_up": ("ffn_gate", "ffn_up")}


def _layer_subtrees(params: dict) -> list[str]:
    return [k for k in params if k == "blk" or k.startswith("blk_")]


def fuse_projections(params: dict, mesh, rules: ShardingRules = ShardingRules()) -> dict:
    """Concatenate each layer's q/k/v and gate/up weights (out axis) into `attn_qkv` / `ffn_gate_up`.

    Decode reads every weight once per token; on XLA:CPU each dot also has a fixed cost, so 4 dots
    instead of 7 per layer is ~10% faster decoding for SmolLM2 (BENCHMARKS.md). Only for meshes whose
    `model` axis has one device: sharded over `model`, a fused row block would cut across q/k/v.
    Works on unrolled (`blk_N`) and stacked (`blk`, leading layer axis) params; returns a new tree.
    """
    if mesh.shape["model"] != 1:
        raise ValueError("fused projections need a mesh whose model axis has one device")
    out = dict(params)
    for key in _layer_subtrees(params):
        layer = dict(params[key])
        for fused, parts in FUSED_PROJECTIONS.items():
            leaves = [layer.pop(p)["weight"] for p in parts]
            shape = (*leaves[0].shape[:-2], sum(x.shape[-2] for x in leaves), leaves[0].shape[-1])
            axes = (None,) * (len(shape) - 2) + text_param_axes(f"{fused}.weight")
            layer[fused] = {"weight": _concat_rows(sharding_for(shape, axes, mesh, rules))(*leaves)}
        out[key] = layer
    return out


def split_projections(params: dict, cfg: TextConfig, mesh, rules: ShardingRules = ShardingRules()) -> dict:
    """Inverse of `fuse_projections`: GGUF-named per-projection weights again (e.g. for a checkpoint)."""
    sizes = {"attn_qkv": (cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim),
             "ffn_gate_up": (cfg.ffn_dim, cfg.ffn_dim)}
    out = dict(params)
    for key in _layer_subtrees(params):
        layer = dict(params[key])
        for fused, parts in FUSED_PROJECTIONS.items():
            if fused not in layer:
                continue
            w = layer.pop(fused)["weight"]
            start = 0
            for part, size in zip(parts, sizes[fused], strict=True):
                shape = (*w.shape[:-2], size, w.shape[-1])
                axes = (None,) * (len(shape) - 2) + text_param_axes(f"{part}.weight")
                layer[part] = {"weight": _take_rows(start, size, sharding_for(shape, axes, mesh, rules))(w)}
                start += size
        out[key] = layer
    return out


# One jitted function per output sharding / row range (jit caches the compiled shapes): a fresh lambda
# per layer would retrace and recompile each time (~2 s of load time for 30 layers).
@cache
def _stack(out_sharding: NamedSharding):
    return jax.jit(lambda *xs: jnp.stack(xs), out_shardings=out_sharding)


@cache
def _concat_rows(out_sharding: NamedSharding):
    return jax.jit(lambda *xs: jnp.concatenate(xs, axis=-2), out_shardings=out_sharding)


@cache
def _take_rows(start: int, size: int, out_sharding: NamedSharding):
    return jax.jit(lambda x: x[..., start:start + size, :], out_shardings=out_sharding)
