"""Weights kept in GGUF's own block formats on the device, dequantized where they are used.

A `QTensor` is a small pytree: the raw block bytes of a `[N, K]` matrix (uint8 `[*lead, N, K / block,
type_size]`, sharded over rows like a plain weight; `lead` is the layer axis of scanned layers) plus
the static quant type and logical shape. `text.project` takes one wherever it takes a plain array:

- a decode step on XLA:CPU reads the blocks directly in the native product kernel
  (`cpu_kernels.qgemv`: unpack, scale and multiply in L1, never an f32 copy of the weight);
- every other product (prefill, teacher forcing, other backends) dequantizes the weight inside the
  compiled program (`dequantize`), used at once by its dot: XLA keeps one weight's full-precision
  copy at a time, never the model's.

Either way the values are exactly `quants.dequantize`'s, so quantized storage computes the same
function as dequantized storage (only the order of f32 sums differs).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from llava_jax import quants

Q = GGMLQuantizationType
# Formats kept as blocks under `weights="quantized"`: what published LLaVA GGUFs ship. Others (e.g.
# IQ4_NL / IQ4_XS) are dequantized at load with a notice.
STORABLE: frozenset[GGMLQuantizationType] = frozenset(
    {Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K})
WEIGHT_MODES = ("quantized", "dequantized")


@partial(jax.tree_util.register_dataclass, data_fields=["blocks"], meta_fields=["qtype", "matrix"])
@dataclass(frozen=True)
class QTensor:
    """A `[N, K]` matrix (or a stack of them) in ggml blocks. blocks: uint8 `[*lead, N, K // bs, ts]`."""

    blocks: jax.Array
    qtype: GGMLQuantizationType
    matrix: tuple[int, int]  # logical (N, K) of one matrix

    @property
    def shape(self) -> tuple[int, ...]:
        """Logical shape, as the plain array would have: `[*lead, N, K]`."""
        return (*self.blocks.shape[:-3], *self.matrix)

    @property
    def block_size(self) -> int:
        return GGML_QUANT_SIZES[self.qtype][0]

    @property
    def nbytes(self) -> int:
        return int(self.blocks.size)

    @property
    def ndim(self) -> int:
        return self.blocks.ndim - 1

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        """→ `[*lead, N, K]` in `dtype` (inside jit: a temporary of one weight)."""
        lead = self.blocks.shape[:-3]
        return quants.dequantize_blocks(self.blocks, self.qtype).reshape(*lead, *self.matrix).astype(dtype)

    def take_rows(self, ids: jax.Array, dtype=jnp.float32) -> jax.Array:
        """Rows `ids` (int [...]) dequantized → `[..., K]` (an embedding lookup reads only those rows)."""
        rows = jnp.take(self.blocks, ids, axis=-3)
        return quants.dequantize_blocks(rows, self.qtype).reshape(*ids.shape, self.matrix[1]).astype(dtype)

    def row_slice(self, start: int, size: int) -> QTensor:
        """Rows [start, start + size) (e.g. one projection of a fused weight)."""
        return QTensor(self.blocks[..., start:start + size, :, :], self.qtype, (size, self.matrix[1]))


def is_qtensor(x) -> bool:
    return isinstance(x, QTensor)


def param_bytes(tree) -> int:
    """Bytes the arrays of a params pytree occupy (QTensor blocks at their packed size)."""
    return sum(int(leaf.size) * leaf.dtype.itemsize for leaf in jax.tree_util.tree_leaves(tree))
