"""Dequantize ggml block formats from raw bytes, in pure jit-able JAX.

Every format is a function `uint8 [..., type_size] -> float32 [..., block_size]` built from
slices, shifts, masks and reshapes of the last axis only, so it works unchanged on any leading
dims and on arrays sharded over any leading axis (rows or blocks): each device dequantizes its
own shard and the host never builds an f32 copy of the model. Bytes are read little-endian
whatever the host; f16 scales are a bitcast of the uint16 built from their two bytes.

Bit-exact with `gguf.quants.dequantize`. XLA:CPU does contract `d * q + m` into an FMA
(measured on jax 0.10.2), but that cannot change a result here: every product is exact in
float32 (an f16 scale has an 11-bit significand, and scale × sub-scale × quant never needs more
than 24 bits: e.g. Q6_K is 11 + 7 + 5 bits, IQ4_XS 11 + 5 + 7), so the final add or subtract is
the only rounding, in the FMA and in numpy alike; reassociating the products cannot matter
either. Results are never subnormal (the smallest nonzero is 2**-24), so a flush-to-zero mode
cannot change them; BF16 and F32 are pure integer bitcasts. Keep it that way when adding a
format whose products could need more than 24 bits.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from llava_jax.errors import LlavaError

Q = GGMLQuantizationType
QK_K = 256
# IQ4_NL / IQ4_XS non-linear 4-bit codebook (ggml's kvalues_iq4nl).
IQ4_KVALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)


# ---------------------------------------------------------------------------------------------
# byte helpers (all on the last axis)


def _u16(b: jax.Array, off: int) -> jax.Array:
    """Little-endian uint16 from bytes `off, off+1` of the last axis → shape `b.shape[:-1]`."""
    return b[..., off].astype(jnp.uint16) | (b[..., off + 1].astype(jnp.uint16) << 8)


def _f16(b: jax.Array, off: int) -> jax.Array:
    """f16 at byte `off` as float32, shape `b.shape[:-1] + (1,)` (ready to broadcast)."""
    return jax.lax.bitcast_convert_type(_u16(b, off), jnp.float16).astype(jnp.float32)[..., None]


def _nibbles(qs: jax.Array) -> jax.Array:
    """uint8 [..., n] → [..., 2, n]: low nibbles then high nibbles."""
    return jnp.stack([qs & 0x0F, qs >> 4], axis=-2)


def _crumbs(qs: jax.Array) -> jax.Array:
    """uint8 [..., n] → [..., 4, n]: 2-bit fields at shifts 0, 2, 4, 6."""
    return jnp.stack([(qs >> s) & 0x03 for s in (0, 2, 4, 6)], axis=-2)


def _bits(qh: jax.Array) -> jax.Array:
    """uint8 [..., n] → [..., 8, n]: bit j of every byte at index j."""
    return jnp.stack([(qh >> j) & 0x01 for j in range(8)], axis=-2)


def _flat(x: jax.Array, lead: tuple[int, ...], *shape: int) -> jax.Array:
    return x.reshape(*lead, *shape)


def _i32(x: jax.Array) -> jax.Array:
    return x.astype(jnp.int32)


def _kvalues(idx: jax.Array) -> jax.Array:
    """IQ4 codebook lookup of 4-bit indices (uint8) as float32, by a 4-level select tree (no gather)."""
    vals = [jnp.float32(v) for v in IQ4_KVALUES]
    for bit in range(4):
        sel = ((idx >> bit) & 1).astype(bool)
        vals = [jnp.where(sel, hi, lo) for lo, hi in zip(vals[0::2], vals[1::2], strict=True)]
    return vals[0]


# ---------------------------------------------------------------------------------------------
# float types (block_size 1)


def dequantize_f32(b: jax.Array) -> jax.Array:
    """F32: 4 little-endian bytes → float32 [..., 1] (integer bitcast, exact for every pattern)."""
    u = _u16(b, 0).astype(jnp.uint32) | (_u16(b, 2).astype(jnp.uint32) << 16)
    return jax.lax.bitcast_convert_type(u, jnp.float32)[..., None]


def dequantize_f16(b: jax.Array) -> jax.Array:
    """F16: 2 little-endian bytes → float32 [..., 1]."""
    return _f16(b, 0)


def dequantize_bf16(b: jax.Array) -> jax.Array:
    """BF16: 2 little-endian bytes, the high half of an f32 → float32 [..., 1]."""
    return jax.lax.bitcast_convert_type(_u16(b, 0).astype(jnp.uint32) << 16, jnp.float32)[..., None]


# ---------------------------------------------------------------------------------------------
# 32-element legacy quants


def dequantize_q4_0(b: jax.Array) -> jax.Array:
    """Q4_0 (18 B → 32): f16 d, 16 B nibbles (x[j] = low nibble j, x[j+16] = high); x = d * (q - 8)."""
    lead = b.shape[:-1]
    q = _flat(_nibbles(b[..., 2:18]), lead, 32)
    return _f16(b, 0) * (_i32(q) - 8).astype(jnp.float32)


def dequantize_q4_1(b: jax.Array) -> jax.Array:
    """Q4_1 (20 B → 32): f16 d, f16 m, 16 B nibbles as Q4_0; x = d * q + m."""
    lead = b.shape[:-1]
    q = _flat(_nibbles(b[..., 4:20]), lead, 32)
    return _f16(b, 0) * q.astype(jnp.float32) + _f16(b, 2)


def _q5_quants(qh: jax.Array, qs: jax.Array) -> jax.Array:
    """5-bit quants: qh = 4 B (bit i of the LE uint32 is bit 4 of x[i]), qs = nibbles as Q4_0."""
    lead = qs.shape[:-1]
    hi = _flat(jnp.swapaxes(_bits(qh), -1, -2), lead, 32)  # [byte][bit] → element i = 8*byte + bit
    return _flat(_nibbles(qs), lead, 32) | (hi << 4)


def dequantize_q5_0(b: jax.Array) -> jax.Array:
    """Q5_0 (22 B → 32): f16 d, 4 B high bits qh, 16 B nibbles; x = d * (q - 16)."""
    q = _q5_quants(b[..., 2:6], b[..., 6:22])
    return _f16(b, 0) * (_i32(q) - 16).astype(jnp.float32)


def dequantize_q5_1(b: jax.Array) -> jax.Array:
    """Q5_1 (24 B → 32): f16 d, f16 m, 4 B qh, 16 B nibbles; x = d * q + m."""
    q = _q5_quants(b[..., 4:8], b[..., 8:24])
    return _f16(b, 0) * q.astype(jnp.float32) + _f16(b, 2)


def dequantize_q8_0(b: jax.Array) -> jax.Array:
    """Q8_0 (34 B → 32): f16 d, 32 int8 quants; x = q * d."""
    q = jax.lax.bitcast_convert_type(b[..., 2:34], jnp.int8)
    return q.astype(jnp.float32) * _f16(b, 0)


def dequantize_iq4_nl(b: jax.Array) -> jax.Array:
    """IQ4_NL (18 B → 32): f16 d, 16 B nibbles as Q4_0 indexing the codebook; x = d * kvalues[q]."""
    lead = b.shape[:-1]
    q = _flat(_nibbles(b[..., 2:18]), lead, 32)
    return _f16(b, 0) * _kvalues(q)


# ---------------------------------------------------------------------------------------------
# 256-element k-quants


def dequantize_q2_k(b: jax.Array) -> jax.Array:
    """Q2_K (84 B → 256): 16 B scales (low 4 bits scale, high 4 bits min, one per 16 values),
    64 B 2-bit quants (2 halves × 4 shifts × 32), f16 d, f16 dmin; x = d*sc * q - dmin*m."""
    lead = b.shape[:-1]
    sc = b[..., 0:16]
    d, dmin = _f16(b, 80), _f16(b, 82)
    dl = (d * (sc & 0x0F).astype(jnp.float32))[..., None]
    ml = (dmin * (sc >> 4).astype(jnp.float32))[..., None]
    q = _flat(_crumbs(_flat(b[..., 16:80], lead, 2, 32)), lead, 16, 16)
    return _flat(dl * q.astype(jnp.float32) - ml, lead, QK_K)


def dequantize_q3_k(b: jax.Array) -> jax.Array:
    """Q3_K (110 B → 256): 32 B hmask (bit j of byte l for element 32j+l), 64 B 2-bit quants as Q2_K,
    12 B 6-bit signed scales (low nibbles in bytes 0-7, high 2 bits in 8-11), f16 d;
    x = d*(sc-32) * (q - (hbit ? 0 : 4))."""
    lead = b.shape[:-1]
    lo = _flat(_nibbles(b[..., 96:104]), lead, 16)
    hi = _flat(_crumbs(b[..., 104:108]), lead, 16)
    sc = _i32(lo | (hi << 4)) - 32
    dl = (_f16(b, 108) * sc.astype(jnp.float32))[..., None]
    ql = _flat(_crumbs(_flat(b[..., 32:96], lead, 2, 32)), lead, 16, 16)
    hm = _flat(_bits(b[..., 0:32]), lead, 16, 16)
    q = _i32(ql) - _i32((hm ^ 1) << 2)
    return _flat(dl * q.astype(jnp.float32), lead, QK_K)


def _scale_min_k4(s: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The 12 B of Q4_K/Q5_K: 8 6-bit scales and 8 6-bit mins → two uint8 [..., 8]."""
    d, m, md = s[..., 0:4], s[..., 4:8], s[..., 8:12]
    sc = jnp.concatenate([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = jnp.concatenate([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc, mn


def _kquant_affine(b: jax.Array, q: jax.Array) -> jax.Array:
    """x = d*sc * q - dmin*m for Q4_K/Q5_K; q is [..., 8, 32]."""
    lead = b.shape[:-1]
    sc, mn = _scale_min_k4(b[..., 4:16])
    d = (_f16(b, 0) * sc.astype(jnp.float32))[..., None]
    dm = (_f16(b, 2) * mn.astype(jnp.float32))[..., None]
    return _flat(d * q.astype(jnp.float32) - dm, lead, QK_K)


def dequantize_q4_k(b: jax.Array) -> jax.Array:
    """Q4_K (144 B → 256): f16 d, f16 dmin, 12 B packed 6-bit scales/mins (one per 32 values),
    128 B nibbles (4 × [32 low, 32 high]); x = d*sc * q - dmin*m."""
    lead = b.shape[:-1]
    q = _flat(_nibbles(_flat(b[..., 16:144], lead, 4, 32)), lead, 8, 32)
    return _kquant_affine(b, q)


def dequantize_q5_k(b: jax.Array) -> jax.Array:
    """Q5_K (176 B → 256): as Q4_K plus 32 B qh before the nibbles (bit j of byte l is bit 4 of
    element 32j+l); x = d*sc * q - dmin*m."""
    lead = b.shape[:-1]
    ql = _flat(_nibbles(_flat(b[..., 48:176], lead, 4, 32)), lead, 8, 32)
    qh = _bits(b[..., 16:48])
    return _kquant_affine(b, ql | (qh << 4))


def dequantize_q6_k(b: jax.Array) -> jax.Array:
    """Q6_K (210 B → 256): 128 B low nibbles (2 × 2 × 64), 64 B high 2 bits (2 × 4 shifts × 32),
    16 int8 scales (one per 16 values), f16 d; x = d*sc * (q - 32)."""
    lead = b.shape[:-1]
    ql = _flat(_nibbles(_flat(b[..., 0:128], lead, 2, 64)), lead, 8, 32)
    qh = _flat(_crumbs(_flat(b[..., 128:192], lead, 2, 32)), lead, 8, 32)
    q = _flat(_i32(ql | (qh << 4)) - 32, lead, 16, 16)
    sc = jax.lax.bitcast_convert_type(b[..., 192:208], jnp.int8).astype(jnp.float32)
    dl = (_f16(b, 208) * sc)[..., None]
    return _flat(dl * q.astype(jnp.float32), lead, QK_K)


def dequantize_iq4_xs(b: jax.Array) -> jax.Array:
    """IQ4_XS (136 B → 256): f16 d, LE uint16 high scale bits (2 per sub-block), 4 B low scale
    nibbles, 128 B nibbles (8 × [16 low, 16 high]) indexing the codebook; x = d*(sc-32) * kvalues[q]."""
    lead = b.shape[:-1]
    sh = _u16(b, 2)[..., None] >> jnp.arange(0, 16, 2, dtype=jnp.uint16)
    sl = _flat(jnp.swapaxes(_nibbles(b[..., 4:8]), -1, -2), lead, 8)  # [byte][low, high]
    sc = _i32(sl) | (_i32(sh & 0x03) << 4)
    dl = (_f16(b, 0) * (sc - 32).astype(jnp.float32))[..., None]
    q = _flat(_nibbles(_flat(b[..., 8:136], lead, 8, 16)), lead, 8, 32)
    return _flat(dl * _kvalues(q), lead, QK_K)


# ---------------------------------------------------------------------------------------------
# public API

_DEQUANT: dict[GGMLQuantizationType, Callable[[jax.Array], jax.Array]] = {
    Q.F32: dequantize_f32,
    Q.F16: dequantize_f16,
    Q.BF16: dequantize_bf16,
    Q.Q4_0: dequantize_q4_0,
    Q.Q4_1: dequantize_q4_1,
    Q.Q5_0: dequantize_q5_0,
    Q.Q5_1: dequantize_q5_1,
    Q.Q8_0: dequantize_q8_0,
    Q.Q2_K: dequantize_q2_k,
    Q.Q3_K: dequantize_q3_k,
    Q.Q4_K: dequantize_q4_k,
    Q.Q5_K: dequantize_q5_k,
    Q.Q6_K: dequantize_q6_k,
    Q.IQ4_NL: dequantize_iq4_nl,
    Q.IQ4_XS: dequantize_iq4_xs,
}

SUPPORTED: frozenset[GGMLQuantizationType] = frozenset(_DEQUANT)


def _unsupported(qtype) -> str:
    names = ", ".join(t.name for t in sorted(SUPPORTED))
    name = getattr(qtype, "name", str(qtype))
    return f"quant type {name} is not supported (supported: {names})"


def check_supported(name: str, qtype) -> None:
    """Raise LlavaError naming tensor `name` if `qtype` cannot be dequantized here."""
    if qtype not in SUPPORTED:
        raise LlavaError(f"tensor {name}: {_unsupported(qtype)}")


def dequantize_blocks(blocks: jax.Array, qtype: GGMLQuantizationType) -> jax.Array:
    """uint8 `[..., type_size]` → float32 `[..., block_size]`, elementwise over all leading dims.

    Pure jnp: jit it with `qtype` static. For F32/F16/BF16 the block is one value (4/2/2 bytes).
    """
    fn = _DEQUANT.get(qtype)
    if fn is None:
        raise LlavaError(_unsupported(qtype))
    type_size = GGML_QUANT_SIZES[qtype][1]
    blocks = jnp.asarray(blocks)
    if blocks.dtype != jnp.uint8 or blocks.ndim == 0 or blocks.shape[-1] != type_size:
        raise ValueError(f"{qtype.name} blocks must be uint8 [..., {type_size}], got {blocks.dtype} {blocks.shape}")
    return fn(blocks)


def dequantize(raw: jax.Array, qtype: GGMLQuantizationType, shape: tuple[int, ...] | None = None) -> jax.Array:
    """uint8 `[..., row_bytes]` → float32 `[..., n_per_row]`; reshaped to `shape` when given.

    `shape` is the logical (numpy-order) shape, e.g. `TensorView.shape`; it must hold as many
    values as `raw` decodes to.
    """
    if qtype not in _DEQUANT:
        raise LlavaError(_unsupported(qtype))
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    raw = jnp.asarray(raw)
    if raw.ndim == 0 or raw.shape[-1] % type_size:
        raise ValueError(f"{qtype.name} rows must be a whole number of {type_size}-byte blocks, got {raw.shape}")
    lead = raw.shape[:-1]
    n_blocks = raw.shape[-1] // type_size
    out = dequantize_blocks(raw.reshape(*lead, n_blocks, type_size), qtype).reshape(*lead, n_blocks * block_size)
    if shape is not None:
        if int(np.prod(shape, dtype=np.int64)) != out.size:
            raise ValueError(f"shape {tuple(shape)} does not match {out.size} dequantized {qtype.name} values")
        out = out.reshape(tuple(shape))
    return out
