"""The device mesh and the one table of partition rules.

Every array that lives on devices (weights, KV cache, activations entering jit) is described by
*logical* axes (`vocab`, `embed`, `heads`, `kv_heads`, `ffw`, `batch`, …); `ShardingRules` maps
logical axes to the mesh axes `data` and `model`. Changing the parallelism is changing that table.

A dimension is only sharded when the mesh axis divides it; otherwise it is replicated (e.g. SmolLM2's
3 KV heads on a 4-way `model` axis). Results never depend on the sharding, only speed does.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from llava_jax.errors import LlavaError

MESH_AXES = ("data", "model")


@dataclass(frozen=True)
class ShardingRules:
    """Logical axis → mesh axis (None = replicated)."""

    batch: str | None = "data"
    vocab: str | None = "model"
    heads: str | None = "model"
    kv_heads: str | None = "model"
    ffw: str | None = "model"
    embed: str | None = None
    seq: str | None = None
    head_dim: str | None = None
    vision: str | None = None  # CLIP tower + projector weights: small, replicated

    def mesh_axis(self, logical: str | None) -> str | None:
        return None if logical is None else getattr(self, logical)


KV_CACHE_AXES = ("batch", "seq", "kv_heads", "head_dim")  # [B, S, Hkv, Dh]


def make_mesh(data: int = 1, model: int = 1, devices=None) -> Mesh:
    """A (`data`, `model`) mesh over the first data*model devices (default: one device)."""
    devices = list(jax.devices() if devices is None else devices)
    if data < 1 or model < 1 or data * model > len(devices):
        raise LlavaError(f"mesh data={data} x model={model} needs {data * model} devices, {len(devices)} available")
    return Mesh(np.array(devices[: data * model]).reshape(data, model), MESH_AXES)


def parse_mesh(spec: str | None) -> Mesh:
    """`"DATAxMODEL"` (e.g. "2x4") → mesh; None → one device."""
    if not spec:
        return make_mesh()
    try:
        data, model = (int(x) for x in spec.lower().split("x"))
    except ValueError:
        raise LlavaError(f"bad mesh shape {spec!r}: expected DATAxMODEL, e.g. 2x4") from None
    return make_mesh(data, model)


def spec_for(shape: tuple[int, ...], axes: tuple[str | None, ...], mesh: Mesh, rules: ShardingRules) -> PartitionSpec:
    """PartitionSpec for an array of `shape` with logical `axes`, replicating dims the mesh axis does not divide."""
    if len(axes) != len(shape):
        raise ValueError(f"logical axes {axes} do not match shape {shape}")
    out = []
    for dim, logical in zip(shape, axes, strict=True):
        name = rules.mesh_axis(logical)
        size = mesh.shape[name] if name else 1
        out.append(name if size > 1 and dim % size == 0 else None)
    return PartitionSpec(*out)


def sharding_for(shape, axes, mesh: Mesh, rules: ShardingRules = ShardingRules()) -> NamedSharding:
    return NamedSharding(mesh, spec_for(tuple(shape), tuple(axes), mesh, rules))


def text_param_axes(gguf_name: str) -> tuple[str | None, ...]:
    """Logical axes of a text-decoder tensor from its GGUF name ("blk.3.attn_q.weight" → ("heads", "embed")),
    as `weights.TEXT_WEIGHTS` declares them."""
    from llava_jax import weights

    return weights.axes_of(weights.kind_of(gguf_name))
