"""GGUF tensors → params pytree, built on the devices that hold each shard, in its final layout.

`plan_layout` turns the weight table (`weights.TEXT_WEIGHTS`) into the leaves of one layout: per-layer
or stacked (scanned layers), q/k/v and gate/up fused or apart. For each leaf, the raw blocks of its
GGUF tensors (memory-mapped views) go to the devices with the sharding of the *blocks* array, each
device receiving only its own slice (`jax.make_array_from_callback`), and one jitted function turns
them into the leaf: dequantized into the target dtype, or kept as blocks (`qtensor.QTensor`,
`weights="quantized"`), rows concatenated and layers stacked. The host never builds a full-precision
copy of the model, and no step holds a second copy of it.

The pytree mirrors GGUF names: "blk.3.attn_q.weight" → params["blk_3"]["attn_q"]["weight"]; with
`scan_layers` the blocks are stacked on a leading layer axis under params["blk"].
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from llava_jax import quants
from llava_jax.config import TextConfig
from llava_jax.errors import LlavaError
from llava_jax.gguf_io import GGUFFile, TensorView
from llava_jax.qtensor import STORABLE, WEIGHT_MODES, QTensor, is_qtensor
from llava_jax.sharding import ShardingRules, sharding_for, spec_for, text_param_axes
from llava_jax.weights import FUSE_GROUPS, TEXT_WEIGHTS, expected_tensors, gguf_name
from llava_jax.weights import axes_of as weights_axes

Q = quants.Q


def check_tensors(gguf: GGUFFile, expected: dict[str, tuple[int, ...]]) -> None:
    """Every expected tensor present, with the expected shape and a supported quant type; else LlavaError."""
    for name, shape in expected.items():
        view = gguf.tensors.get(name)
        if view is None:
            raise LlavaError(f"{gguf.name}: missing tensor {name}")
        if tuple(view.shape) != tuple(shape):
            raise LlavaError(f"{gguf.name}: tensor {name} has shape {list(view.shape)}, expected {list(shape)}")
        quants.check_supported(name, view.qtype)


def place_tensor(view: TensorView, sharding: NamedSharding, dtype=jnp.float32) -> jax.Array:
    """Dequantize one GGUF tensor straight into `sharding` (logical shape `view.shape`) as `dtype`.

    The blocks array `[*shape[:-1], n_blocks, type_size]` is sharded like the tensor, with the last
    logical axis's mesh axis on `n_blocks` (when it divides) so each device dequantizes its own slice.
    """
    spec = tuple(sharding.spec) + (None,) * (len(view.shape) - len(sharding.spec))
    raw = _place_blocks(view, spec, sharding.mesh)
    return _assembler((view.qtype,), True, jnp.dtype(dtype), 1, False, sharding)(raw)


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


@dataclass(frozen=True)
class Leaf:
    """One params leaf and the GGUF tensors it is built from: `sources[layer][part]` (one layer unless
    stacked for scanned layers, one part unless fused), rows of the parts concatenated, layers stacked."""

    path: tuple[str, ...]
    kind: str  # a `weights.TEXT_WEIGHTS` kind or a fuse group
    storage: str  # the kind's storage rule ("matrix", "f32", "compute")
    sources: tuple[tuple[str, ...], ...]
    stacked: bool = False


def plan_layout(gguf: GGUFFile, cfg: TextConfig, fuse: bool, scan_layers: bool) -> list[Leaf]:
    """Every params leaf of the decoder, in load order. A fuse group is fused (when `fuse`) only where its
    parts share one storage type (rows of one block format) in every layer (across layers too when
    stacked), so all layers have one layout."""
    expected = expected_tensors(cfg)
    qtype = {name: gguf.tensors[name].qtype for name in expected}

    def fusable(group: str) -> bool:
        per_layer = [{qtype[gguf_name(p, i)] for p in FUSE_GROUPS[group]} for i in range(cfg.n_layers)]
        return all(len(t) == 1 for t in per_layer) and (not scan_layers or len(set().union(*per_layer)) == 1)

    fused = {g for g in FUSE_GROUPS if fuse and gguf_name(FUSE_GROUPS[g][0], 0) in expected and fusable(g)}
    leaves: list[Leaf] = []
    for w in TEXT_WEIGHTS:
        name = gguf_name(w.kind)
        if not w.per_layer and name in expected:
            leaves.append(Leaf((w.kind, "weight"), w.kind, w.storage, ((name,),)))
    layer_sets = [tuple(range(cfg.n_layers))] if scan_layers else [(i,) for i in range(cfg.n_layers)]
    for layers in layer_sets:
        prefix = "blk" if scan_layers else f"blk_{layers[0]}"
        for w in TEXT_WEIGHTS:
            if not w.per_layer or gguf_name(w.kind, 0) not in expected:
                continue
            if w.fuse in fused:
                parts = FUSE_GROUPS[w.fuse]
                if w.kind == parts[0]:
                    names = tuple(tuple(gguf_name(p, i) for p in parts) for i in layers)
                    leaves.append(Leaf((prefix, w.fuse, "weight"), w.fuse, w.storage, names, scan_layers))
                continue
            leaves.append(Leaf((prefix, w.kind, "weight"), w.kind, w.storage,
                               tuple((gguf_name(w.kind, i),) for i in layers), scan_layers))
    return leaves


def _block_spec(spec: tuple, n_blocks: int, mesh) -> PartitionSpec:
    """PartitionSpec of a blocks array `[*lead, N, n_blocks, type_size]` for a tensor sharded `spec` over
    `[*lead, N, K]`: K's mesh axis goes to n_blocks when it divides it (else each device holds whole rows)."""
    last = spec[-1]
    if last is not None and n_blocks % mesh.shape[last]:
        last = None
    return PartitionSpec(*spec[:-1], last, None)


def _place_blocks(view: TensorView, spec: tuple, mesh) -> jax.Array:
    """A tensor's raw blocks on the devices, each receiving only its slice (uint8 [*shape[:-1], nb, ts])."""
    blocks = view.blocks()
    sharding = NamedSharding(mesh, _block_spec(spec, blocks.shape[-2], mesh))
    return jax.make_array_from_callback(blocks.shape, sharding, lambda idx: np.ascontiguousarray(blocks[idx]))


@cache
def _assembler(qtypes: tuple, dequant: bool, dtype, n_parts: int, stacked: bool, out_sharding: NamedSharding):
    """Jitted: raw blocks of a leaf's sources (layer-major) → the leaf: each dequantized (or kept as blocks),
    parts' rows concatenated, layers stacked; placed in out_sharding. One compile per distinct leaf shape."""

    def run(*raws):
        xs = [quants.dequantize_blocks(r, q).reshape(*r.shape[:-2], -1).astype(dtype) if dequant else r
              for r, q in zip(raws, qtypes, strict=True)]
        axis = -2 if dequant else -3
        rows = [xs[i:i + n_parts] for i in range(0, len(xs), n_parts)]
        layers = [r[0] if len(r) == 1 else jnp.concatenate(r, axis=axis) for r in rows]
        return jnp.stack(layers) if stacked else layers[0]

    return jax.jit(run, out_shardings=out_sharding)


def place_leaf(gguf: GGUFFile, leaf: Leaf, mesh, rules: ShardingRules, dtype, weights: str, notice=None):
    """Build one leaf straight into its sharding: a plain array, or a `QTensor` for quantized storage."""
    views = [gguf.tensors[n] for row in leaf.sources for n in row]
    qtypes = tuple(v.qtype for v in views)
    n_parts = len(leaf.sources[0])
    n = sum(gguf.tensors[name].shape[0] for name in leaf.sources[0])
    shape = (n, *views[0].shape[1:])
    lead = (len(leaf.sources),) if leaf.stacked else ()
    axes = weights_axes(leaf.kind)
    spec = tuple(spec_for((*lead, *shape), (None,) * len(lead) + axes, mesh, rules))
    keep = (weights == "quantized" and leaf.storage == "matrix" and len(set(qtypes)) == 1
            and qtypes[0] in STORABLE)
    if weights == "quantized" and leaf.storage == "matrix" and not keep and notice is not None:
        why = ("layers of mixed types " + "/".join(sorted({q.name for q in qtypes})) if len(set(qtypes)) > 1
               else f"{qtypes[0].name} has no quantized product")
        if qtypes != (Q.F32,) * len(qtypes):
            notice(f"{'.'.join(leaf.path)}: dequantized at load ({why})")
    raws = [_place_blocks(v, tuple(spec_for(v.shape, axes, mesh, rules)), mesh) for v in views]
    if keep:
        n_blocks = views[0].blocks().shape[-2]
        out = NamedSharding(mesh, _block_spec(spec, n_blocks, mesh))
        blocks = _assembler(qtypes, False, jnp.dtype(jnp.uint8), n_parts, leaf.stacked, out)(*raws)
        return QTensor(blocks, qtypes[0], (int(shape[0]), int(shape[1])))
    leaf_dtype = jnp.float32 if leaf.storage == "f32" else jnp.dtype(dtype)
    return _assembler(qtypes, True, leaf_dtype, n_parts, leaf.stacked, NamedSharding(mesh, PartitionSpec(*spec)))(*raws)


def load_text_params(gguf: GGUFFile, cfg: TextConfig, mesh, dtype, rules: ShardingRules = ShardingRules(),
                     scan_layers: bool = False, progress=None, weights: str = "dequantized", fuse: bool = False,
                     notice=None) -> dict:
    """Validate, then build every decoder leaf in its final layout (fused, stacked, quantized), one leaf
    at a time: no step holds a second copy of the model.

    weights: "quantized" keeps matrices in their block format (`QTensor`) where a product reads it,
        "dequantized" turns every tensor into `dtype` (norms always f32).
    fuse: q/k/v and gate/up as one weight each (`weights.FUSE_GROUPS`; needs a 1-device `model` axis).
    notice: called with a one-line message for each leaf that could not stay quantized.
    """
    if weights not in WEIGHT_MODES:
        raise LlavaError(f"unknown weights mode {weights!r} (choose from {', '.join(WEIGHT_MODES)})")
    if fuse and mesh.shape["model"] != 1:
        raise ValueError("fused projections need a mesh whose model axis has one device")
    check_tensors(gguf, cfg.expected_tensors())
    params: dict = {}
    for leaf in plan_layout(gguf, cfg, fuse, scan_layers):
        value = place_leaf(gguf, leaf, mesh, rules, dtype, weights, notice)
        jax.block_until_ready(value)
        for row in leaf.sources:
            for name in row:
                gguf.release(gguf.tensors[name])
        _set(params, leaf.path, value)
        if progress is not None:
            for row in leaf.sources:
                for name in row:
                    progress(name)
    return params


def stack_layers(params: dict, n_layers: int, mesh, rules: ShardingRules) -> dict:
    """Per-layer subtrees `blk_0..blk_{L-1}` → one subtree `blk` with a leading layer axis."""
    layers = [params.pop(f"blk_{i}") for i in range(n_layers)]

    def stack(path, *leaves):
        if isinstance(leaves[0], QTensor):
            spec = spec_for((n_layers, *leaves[0].shape), (None, *weights_axes(path[-2].key)), mesh, rules)
            out = NamedSharding(mesh, _block_spec(tuple(spec), leaves[0].blocks.shape[-2], mesh))
            return QTensor(_stack(out)(*[x.blocks for x in leaves]), leaves[0].qtype, leaves[0].matrix)
        axes = (None, *weights_axes(path[-2].key))
        return _stack(sharding_for((n_layers, *leaves[0].shape), axes, mesh, rules))(*leaves)

    params["blk"] = jax.tree_util.tree_map_with_path(stack, *layers, is_leaf=is_qtensor)
    return params


FUSED_PROJECTIONS = FUSE_GROUPS


def _layer_subtrees(params: dict) -> list[str]:
    return [k for k in params if k == "blk" or k.startswith("blk_")]


def fuse_projections(params: dict, mesh, rules: ShardingRules = ShardingRules()) -> dict:
    """Concatenate each layer's q/k/v and gate/up weights (out axis) into `attn_qkv` / `ffn_gate_up`.

    Decode reads every weight once per token; on XLA:CPU each dot also has a fixed cost, so 4 dots
    instead of 7 per layer is ~10% faster decoding for SmolLM2 (BENCHMARKS.md). Only for meshes whose
    `model` axis has one device: sharded over `model`, a fused row block would cut across q/k/v.
    Works on unrolled (`blk_N`) and stacked (`blk`, leading layer axis) params, plain arrays or QTensor
    blocks (rows of one block format concatenate); a group is fused in every layer or in none (a layer
    whose parts are blocks of different formats keeps the group apart everywhere). Returns a new tree.
    `load_text_params(fuse=True)` builds the same layout at load; this fuses params made otherwise
    (an Orbax cache holds GGUF's names).
    """
    if mesh.shape["model"] != 1:
        raise ValueError("fused projections need a mesh whose model axis has one device")
    keys = _layer_subtrees(params)
    out = dict(params)

    def kind(leaf):
        return ("q", leaf.qtype) if isinstance(leaf, QTensor) else ("a", str(leaf.dtype))

    for fused, parts in FUSED_PROJECTIONS.items():
        layers = [params[k] for k in keys]
        if not layers or any(fused in lyr or any(p not in lyr for p in parts) for lyr in layers):
            continue
        if any(len({kind(lyr[p]["weight"]) for p in parts}) > 1 for lyr in layers):
            continue
        for key in keys:
            layer = dict(out[key])
            leaves = [layer.pop(p)["weight"] for p in parts]
            axes = text_param_axes(f"{fused}.weight")
            if isinstance(leaves[0], QTensor):
                n = sum(x.matrix[0] for x in leaves)
                spec = spec_for((*leaves[0].shape[:-2], n, leaves[0].matrix[1]),
                                (None,) * (leaves[0].ndim - 2) + axes, mesh, rules)
                sharding = NamedSharding(mesh, _block_spec(tuple(spec), leaves[0].blocks.shape[-2], mesh))
                blocks = _concat_rows(sharding, axis=-3)(*[x.blocks for x in leaves])
                layer[fused] = {"weight": QTensor(blocks, leaves[0].qtype, (n, leaves[0].matrix[1]))}
            else:
                shape = (*leaves[0].shape[:-2], sum(x.shape[-2] for x in leaves), leaves[0].shape[-1])
                lead = (None,) * (len(shape) - 2)
                layer[fused] = {"weight": _concat_rows(sharding_for(shape, lead + axes, mesh, rules))(*leaves)}
            out[key] = layer
    return out


def fused_groups(params: dict) -> frozenset[str]:
    """The fused weights (`weights.FUSE_GROUPS` names) a params tree holds (every layer alike)."""
    keys = _layer_subtrees(params)
    return frozenset(g for g in FUSED_PROJECTIONS if keys and g in params[keys[0]])


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
                if isinstance(w, QTensor):
                    layer[part] = {"weight": w.row_slice(start, size)}
                    start += size
                    continue
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
def _concat_rows(out_sharding: NamedSharding, axis: int = -2):
    return jax.jit(lambda *xs: jnp.concatenate(xs, axis=axis), out_shardings=out_sharding)


@cache
def _take_rows(start: int, size: int, out_sharding: NamedSharding):
    return jax.jit(lambda x: x[..., start:start + size, :], out_shardings=out_sharding)
