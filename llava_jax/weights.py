"""The one description of the language model's weights: GGUF name → shape, logical axes, storage, fuse group.

The loader (`params`), the partition rules (`sharding`), the Orbax cache (`checkpoint`) and the config's
tensor check (`TextConfig.expected_tensors`) all read `TEXT_WEIGHTS`; nothing else lists weights.

- shape:   numpy-order shape from the config (GGUF's `[out, in]` for projections).
- axes:    logical axes, mapped to mesh axes by `sharding.ShardingRules`.
- storage: "matrix" (a projection or embedding: may stay in its block format, `qtensor.QTensor`),
           "f32" (norms, rope factors: always f32), "compute" (the compute dtype).
- fuse:    the fused weight it joins (rows concatenated in `FUSE_GROUPS` order) when the layout fuses.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from llava_jax.config import TextConfig


@dataclass(frozen=True)
class WeightKind:
    kind: str  # GGUF name part: "attn_q" in "blk.3.attn_q.weight"
    shape: Callable[[TextConfig], tuple[int, ...]]
    axes: tuple[str | None, ...]
    storage: str = "matrix"
    per_layer: bool = True
    fuse: str | None = None
    present: Callable[[TextConfig], bool] = lambda cfg: True


def _q(c: TextConfig) -> int:
    return c.n_heads * c.head_dim


def _kv(c: TextConfig) -> int:
    return c.n_kv_heads * c.head_dim


TEXT_WEIGHTS: tuple[WeightKind, ...] = (
    WeightKind("token_embd", lambda c: (c.vocab_size, c.dim), ("vocab", "embed"), per_layer=False),
    WeightKind("output", lambda c: (c.vocab_size, c.dim), ("vocab", "embed"), per_layer=False,
               present=lambda c: not c.tied_output),
    WeightKind("output_norm", lambda c: (c.dim,), ("embed",), "f32", per_layer=False),
    WeightKind("rope_freqs", lambda c: (c.rope_dim // 2,), (None,), "f32", per_layer=False,
               present=lambda c: c.has_rope_freqs),
    WeightKind("attn_norm", lambda c: (c.dim,), ("embed",), "f32"),
    WeightKind("attn_q", lambda c: (_q(c), c.dim), ("heads", "embed"), fuse="attn_qkv"),
    WeightKind("attn_k", lambda c: (_kv(c), c.dim), ("kv_heads", "embed"), fuse="attn_qkv"),
    WeightKind("attn_v", lambda c: (_kv(c), c.dim), ("kv_heads", "embed"), fuse="attn_qkv"),
    WeightKind("attn_output", lambda c: (c.dim, _q(c)), ("embed", "heads")),
    WeightKind("ffn_norm", lambda c: (c.dim,), ("embed",), "f32"),
    WeightKind("ffn_gate", lambda c: (c.ffn_dim, c.dim), ("ffw", "embed"), fuse="ffn_gate_up"),
    WeightKind("ffn_up", lambda c: (c.ffn_dim, c.dim), ("ffw", "embed"), fuse="ffn_gate_up"),
    WeightKind("ffn_down", lambda c: (c.dim, c.ffn_dim), ("embed", "ffw")),
)
BY_KIND: dict[str, WeightKind] = {w.kind: w for w in TEXT_WEIGHTS}

# Fused weights: one weight (one dot) for q/k/v and one for gate/up, rows in this order. Only for meshes
# whose `model` axis has one device (sharded over `model`, a fused row block would cut across q/k/v).
FUSE_GROUPS: dict[str, tuple[str, ...]] = {"attn_qkv": ("attn_q", "attn_k", "attn_v"),
                                           "ffn_gate_up": ("ffn_gate", "ffn_up")}
FUSED_AXES: dict[str, tuple[str | None, ...]] = {"attn_qkv": ("heads", "embed"), "ffn_gate_up": ("ffw", "embed")}


def kind_of(gguf_name: str) -> str:
    """"blk.3.attn_q.weight" → "attn_q"; "rope_freqs.weight" → "rope_freqs"."""
    parts = gguf_name.split(".")
    return parts[-2] if parts[-1] in ("weight", "bias") else parts[-1]


def axes_of(kind: str) -> tuple[str | None, ...]:
    """Logical axes of a weight kind, fused kinds included."""
    return FUSED_AXES[kind] if kind in FUSED_AXES else BY_KIND[kind].axes


def gguf_name(kind: str, layer: int | None = None) -> str:
    return f"{kind}.weight" if layer is None else f"blk.{layer}.{kind}.weight"


def expected_tensors(cfg: TextConfig) -> dict[str, tuple[int, ...]]:
    """GGUF tensor name → numpy-order shape, for every tensor the decoder reads (model order)."""
    out: dict[str, tuple[int, ...]] = {}
    for w in TEXT_WEIGHTS:
        if not w.per_layer and w.present(cfg):
            out[gguf_name(w.kind)] = w.shape(cfg)
    for i in range(cfg.n_layers):
        for w in TEXT_WEIGHTS:
            if w.per_layer and w.present(cfg):
                out[gguf_name(w.kind, i)] = w.shape(cfg)
    return out
