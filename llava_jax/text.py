"""LLaMA-family decoder as Flax modules: RMSNorm, RoPE, grouped-query attention, SwiGLU, tied or
separate output. Used purely through `Decoder(...).apply(params, ...)`.

Weights keep GGUF's `[out, in]` layout (no transposes at load). GGUF llama files have their Q/K rows
permuted by llama.cpp's converter, so RoPE here rotates *adjacent* pairs (x[2i], x[2i+1]) — llama.cpp's
"normal" RoPE — not HF's rotate_half. Norms, softmax and logits are computed in f32; matmuls in the
module's compute dtype.

The KV cache (`KVCache`) is written in place at column `write_index` (`dynamic_update_slice`; donate it
to jit) in one of two layouts: *stacked* `[L, B, S, Hkv, Dh]` arrays (for `nn.scan` over layers), or
*per-layer* head-major buffers (for unrolled layers: the layout decode is fast with on XLA:CPU, see
`KVCache`). Attention reads only the first `kv_window` columns, a static bucket >= the last written
column, so the cost follows the text so far, not the context size.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from llava_jax import cpu_kernels
from llava_jax.config import TextConfig
from llava_jax.qtensor import QTensor

Array = jax.Array


class KVCache(NamedTuple):
    """Keys and values of every layer, in one of two layouts (the decoder takes either).

    stacked:   k, v are arrays `[L, B, S, Hkv, Dh]`; scanned layers index them with a traced layer.
    per-layer: k, v are tuples of L head-major buffers, keys transposed: k `[*lead, Dh, S]`,
               v `[*lead, S, Dh]`, lead = (B, Hkv) without its size-1 dims (`per_layer_shapes`).
    Why per-layer for unrolled layers on XLA:CPU (SmolLM2, decode at column ~600, 768-column window):
    attending to a window sliced out of a stacked cache makes XLA copy that window, transposed
    heads-first, for every layer at every step (~25% of the step); a dot that reads a whole per-layer
    buffer copies nothing. Keys are stored transposed because q·K is then a plain [G, Dh] x [Dh, S]
    product with S contiguous: ~2x faster than contracting over Dh of a [S, Dh] buffer (decode is
    memory-bound here). Size-1 dims are dropped because a degenerate batch dim becomes a bitcast that
    XLA fuses into the dynamic_update_slice, duplicating it, which then copies the whole buffer at
    every step.
    """

    k: Array | tuple[Array, ...]
    v: Array | tuple[Array, ...]

    @classmethod
    def zeros(cls, cfg: TextConfig, batch: int, length: int, dtype, per_layer: bool = False) -> KVCache:
        if per_layer:
            return cls(*(tuple(jnp.zeros(shape, dtype) for _ in range(cfg.n_layers))
                         for shape in per_layer_shapes(cfg, batch, length)))
        shape = (cfg.n_layers, batch, length, cfg.n_kv_heads, cfg.head_dim)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))

    @property
    def per_layer(self) -> bool:
        return isinstance(self.k, (tuple, list))


def _lead_dims(batch: int, n_kv_heads: int) -> tuple[tuple[str, int], ...]:
    """(logical axis, size) of the leading (B, Hkv) dims of head-major buffers, size-1 dims dropped."""
    return tuple((a, n) for a, n in (("batch", batch), ("kv_heads", n_kv_heads)) if n > 1)


def head_lead(batch: int, n_kv_heads: int) -> tuple[int, ...]:
    """Leading dims of head-major attention operands: (B, Hkv) without its size-1 dims."""
    return tuple(n for _, n in _lead_dims(batch, n_kv_heads))


def per_layer_shapes(cfg: TextConfig, batch: int, length: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Shapes of one layer's per-layer K and V buffers: `[*lead, Dh, S]` and `[*lead, S, Dh]`."""
    lead = head_lead(batch, cfg.n_kv_heads)
    return (*lead, cfg.head_dim, length), (*lead, length, cfg.head_dim)


def per_layer_axes(batch: int, n_kv_heads: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Logical axes of `per_layer_shapes` (for the sharding table)."""
    lead = tuple(a for a, _ in _lead_dims(batch, n_kv_heads))
    return (*lead, "head_dim", "seq"), (*lead, "seq", "head_dim")


def to_head_major(x: Array, lead: tuple[int, ...], transpose: bool = False) -> Array:
    """[B, T, Hkv, Dh] → [*lead, T, Dh], or [*lead, Dh, T] with `transpose`."""
    b, t, n_kv, d = x.shape
    if transpose:
        return x.transpose(0, 2, 3, 1).reshape(*lead, d, t)
    return x.transpose(0, 2, 1, 3).reshape(*lead, t, d)


def _precision(dtype):
    # f32 must be true f32 (GPUs default to TF32 for f32 dots); lower dtypes use the default.
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def dequantize_when_needed(w: QTensor, x: Array, dtype, kernel: bool = False) -> Array:
    """`w.dequantize(dtype)`, computed only once `x` (the product's input) exists.

    XLA:CPU schedules a dequantization as early as its operand allows: all of a program's weights were
    dequantized up front and live at once (26 GB for a 7B prefill; an optimization barrier does not
    stop it). A conditional on `x` (on a NaN test XLA cannot fold) runs its branch only after `x` is
    computed, so each layer's full-precision weight lives from just before its product to just after.
    kernel: unpack with the native `cpu_kernels.dequantize` (memory speed) rather than XLA's ops.
    Elsewhere (GPU / TPU) XLA may fuse the dequantization into the product: no conditional there.
    """
    if jax.default_backend() != "cpu":
        return w.dequantize(dtype)
    native = kernel and w.blocks.ndim == 3 and cpu_kernels.dequantize_applies(w.qtype, w.matrix[1])

    def deq(b):
        if native:
            return cpu_kernels.dequantize(b, w.qtype, w.matrix[1]).astype(dtype)
        return QTensor(b, w.qtype, w.matrix).dequantize(dtype)

    probe = jnp.isnan(x.reshape(-1)[0].astype(jnp.float32))
    return jax.lax.cond(probe, deq, deq, w.blocks)


def project(x: Array, w: Array | QTensor, dtype, kernel: bool = False, out_dtype=None) -> Array:
    """x [..., in] @ w.T for w `[out, in]` (GGUF's layout), computed in `dtype` (result in out_dtype,
    default dtype). w is a plain array or a `QTensor` (GGUF blocks, dequantized here: inside the compiled
    program, a temporary of this one weight). kernel: a few f32 rows (a decode step) go through
    `cpu_kernels.gemv` / `qgemv` (XLA:CPU, one device) instead of XLA's dot, reading blocks directly, and
    more rows (a prompt) through `cpu_kernels.qmatmul` where the CPU has AMX."""
    x = x.astype(dtype)
    if isinstance(w, QTensor):
        if kernel and cpu_kernels.qgemv_applies(x.shape, x.dtype, w.qtype, w.matrix[1]):
            return cpu_kernels.qgemv(x, w.blocks, w.qtype).astype(out_dtype or dtype)
        if kernel and w.blocks.ndim == 3 and cpu_kernels.qmatmul_applies(x.shape, x.dtype, w.qtype, w.matrix[1]):
            return cpu_kernels.qmatmul(x, w.blocks, w.qtype).astype(out_dtype or dtype)
        w = dequantize_when_needed(w, x, dtype, kernel)
    if kernel and cpu_kernels.gemv_applies(x.shape, x.dtype, w.dtype):
        return cpu_kernels.gemv(x, w).astype(out_dtype or dtype)
    return jnp.einsum("...i,oi->...o", x, w, precision=_precision(dtype), preferred_element_type=out_dtype)


def weight_param(module: nn.Module, shape: tuple[int, ...], dtype, init) -> Array | QTensor:
    """The module's "weight": as stored when present (a plain array or a `QTensor`, whose leaves Flax's
    shape check would reject), else initialized to `shape` (`init`)."""
    if module.has_variable("params", "weight"):
        return module.get_variable("params", "weight")
    return module.param("weight", init, shape, dtype)


class Linear(nn.Module):
    """y = x @ W.T with W stored `[out, in]` as in GGUF (a plain array or a `QTensor`)."""

    features: int
    dtype: jnp.dtype = jnp.float32
    kernel: bool = False  # decode rows by `cpu_kernels.gemv` / `qgemv` (see `project`)
    out_dtype: jnp.dtype | None = None  # the result's dtype (default: dtype)

    @nn.compact
    def __call__(self, x: Array) -> Array:
        w = weight_param(self, (self.features, x.shape[-1]), self.dtype, nn.initializers.normal(0.02))
        return project(x, w, self.dtype, self.kernel, self.out_dtype)


class RMSNorm(nn.Module):
    eps: float

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """[..., D] → f32 [..., D]."""
        w = self.param("weight", nn.initializers.ones, (x.shape[-1],), jnp.float32)
        x = x.astype(jnp.float32)
        return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps) * w


class Embedding(nn.Module):
    """Token embedding `[V, D]`; `attend` is the tied output projection."""

    vocab_size: int
    dim: int
    dtype: jnp.dtype = jnp.float32

    def setup(self):
        self.weight = weight_param(self, (self.vocab_size, self.dim), self.dtype, nn.initializers.normal(1.0))

    def __call__(self, ids: Array) -> Array:
        if isinstance(self.weight, QTensor):  # only the looked-up rows are dequantized
            return self.weight.take_rows(ids, self.dtype)
        return jnp.take(self.weight, ids, axis=0)

    def attend(self, h: Array, kernel: bool = False) -> Array:
        """f32 [..., D] → f32 logits [..., V] (kernel: as in `project`)."""
        return project(h, self.weight, self.dtype, kernel, out_dtype=jnp.float32)


class RopeFreqs(nn.Module):
    """llama3.1-style per-frequency divisors, GGUF's `rope_freqs.weight` (params["rope_freqs"]["weight"])."""

    n: int

    @nn.compact
    def __call__(self) -> Array:
        return self.param("weight", nn.initializers.ones, (self.n,), jnp.float32)


def rope_angles(positions: Array, cfg: TextConfig, freq_factors: Array | None = None) -> tuple[Array, Array]:
    """int [B, T] → (cos, sin) f32 [B, T, rope_dim // 2] for llama.cpp's normal (adjacent-pair) RoPE."""
    inv_freq = cfg.rope_base ** (-jnp.arange(0, cfg.rope_dim, 2, dtype=jnp.float32) / cfg.rope_dim)
    if freq_factors is not None:
        inv_freq = inv_freq / freq_factors
    pos = positions.astype(jnp.float32) / cfg.rope_scaling.factor
    angles = pos[..., None] * inv_freq
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
    """Rotate adjacent pairs of the first rope_dim features. x [B, T, H, Dh]; cos/sin [B, T, rope_dim/2]."""
    rope_dim = 2 * cos.shape[-1]
    xr = x[..., :rope_dim].astype(jnp.float32)
    x0, x1 = xr[..., 0::2], xr[..., 1::2]
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    rotated = jnp.stack([x0 * c - x1 * s, x0 * s + x1 * c], axis=-1).reshape(xr.shape).astype(x.dtype)
    return rotated if rope_dim == x.shape[-1] else jnp.concatenate([rotated, x[..., rope_dim:]], axis=-1)


def attention_mask(write_index: Array, n_queries: int, kv_start: Array, kv_window: int) -> Array:
    """bool [B, T, W]: query t (cache column write_index + t) sees columns kv_start[b] <= s <= write_index + t.

    A padding query (column < kv_start) sees only itself: no row is fully masked, so no NaN reaches the
    cache through padding (0 * NaN would poison real rows).
    """
    cols = jnp.arange(kv_window)[None, None, :]
    q_cols = write_index + jnp.arange(n_queries)[None, :, None]
    return (cols <= q_cols) & ((cols >= kv_start[:, None, None]) | (cols == q_cols))


MIN_QUERY_BLOCK, MAX_QUERY_BLOCKS = 128, 8  # causal query blocks of long prompts (see `attention`)


def attention(q: Array, kt: Array, v: Array, mask: Array, dtype) -> Array:
    """Grouped-query attention over head-major values and transposed keys, causal blocks skipped.

    q [B, T, H, Dh]; kt [*lead, Dh, W]; v [*lead, W, Dh], lead = head_lead(B, Hkv); mask bool [B, T, W]
    → [B, T, H*Dh]. Query t may only see columns <= write_index + t, and the decoder's contract is
    write_index + T <= W, so the queries in [t0, t1) need only the first W - T + t1 columns: a long
    prompt is cut into query blocks (4-8) that each attend to their causal prefix of the keys, which
    skips ~40% of a 512-token prefill's attention work (all of it masked).
    """
    t, w = q.shape[1], v.shape[-2]
    if t < 2 * MIN_QUERY_BLOCK or w < t:
        return _attention(q, kt, v, mask, dtype)
    block = max(MIN_QUERY_BLOCK, -(-t // MAX_QUERY_BLOCKS))
    outs = []
    for t0 in range(0, t, block):
        t1 = min(t, t0 + block)
        cols = w - t + t1
        outs.append(_attention(q[:, t0:t1], kt[..., :cols], v[..., :cols, :], mask[:, t0:t1, :cols], dtype))
    return jnp.concatenate(outs, axis=1)


def _attention(q: Array, kt: Array, v: Array, mask: Array, dtype) -> Array:
    """`attention` without the causal blocks.

    Query head h reads KV head h // (H / Hkv). The queries are made head-major too ([*lead, T*G, Dh]),
    so both einsums are plain batched dots and their outputs come in dot order: the [.., T, W] score
    tensors are never transposed (transposing them cost ~15% of a 512-token prefill).
    """
    b, t, h, d = q.shape
    w = v.shape[-2]
    lead = v.shape[:-2]
    n_kv = math.prod(lead) // b
    g = h // n_kv
    prec = _precision(dtype)
    qh = q.reshape(b, t, n_kv, g, d).transpose(0, 2, 1, 3, 4).reshape(*lead, t * g, d)
    scores = jnp.einsum("...qd,...dk->...qk", qh.astype(dtype), kt.astype(dtype), precision=prec,
                        preferred_element_type=jnp.float32) / jnp.sqrt(jnp.float32(d))
    scores = jnp.where(mask[:, None, :, None, :], scores.reshape(b, n_kv, t, g, w), -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1).reshape(*lead, t * g, w)
    out = jnp.einsum("...qk,...kd->...qd", probs.astype(dtype), v.astype(dtype), precision=prec)
    return out.reshape(b, n_kv, t, g, d).transpose(0, 2, 1, 3, 4).reshape(b, t, h * d)


def write_and_read_cache(cache: KVCache, layer, write_index: Array, k: Array, v: Array, kv_window: int):
    """Write this layer's k/v [B, T, Hkv, Dh] at column write_index; read back columns [0, kv_window).

    Returns (cache, keys, values): keys transposed `[*lead, Dh, kv_window]`, values
    `[*lead, kv_window, Dh]` (see `attention`). `layer` is a Python int for a per-layer cache; an int
    or a traced int32 for a stacked one.
    """
    lead = head_lead(k.shape[0], k.shape[2])
    zero = jnp.zeros((), jnp.int32)
    write_index = jnp.asarray(write_index, jnp.int32)
    if cache.per_layer:
        zeros = (zero,) * len(lead)
        new_k = jax.lax.dynamic_update_slice(cache.k[layer], to_head_major(k, lead, transpose=True).astype(
            cache.k[layer].dtype), (*zeros, zero, write_index))
        new_v = jax.lax.dynamic_update_slice(cache.v[layer], to_head_major(v, lead).astype(cache.v[layer].dtype),
                                             (*zeros, write_index, zero))
        cache = KVCache(cache.k[:layer] + (new_k,) + cache.k[layer + 1:], cache.v[:layer] + (new_v,) + cache.v[layer + 1:])
        if kv_window < new_v.shape[-2]:  # prefill into a longer buffer: a (copied) prefix
            new_k, new_v = new_k[..., :kv_window], new_v[..., :kv_window, :]
        return cache, new_k, new_v
    layer = jnp.asarray(layer, jnp.int32)
    at = (layer, zero, write_index, zero, zero)
    cache = KVCache(jax.lax.dynamic_update_slice(cache.k, k[None].astype(cache.k.dtype), at),
                    jax.lax.dynamic_update_slice(cache.v, v[None].astype(cache.v.dtype), at))
    size = (1, k.shape[0], kv_window, k.shape[2], k.shape[3])
    start = (layer, zero, zero, zero, zero)
    keys = to_head_major(jax.lax.dynamic_slice(cache.k, start, size)[0], lead, transpose=True)
    values = to_head_major(jax.lax.dynamic_slice(cache.v, start, size)[0], lead)
    return cache, keys, values


class Block(nn.Module):
    """Pre-norm transformer block; parameters named as GGUF's `blk.N.*` tensors.

    Scan-shaped: carry (x f32 [B, T, D], cache, layer index) and broadcast inputs, so the same module is
    used unrolled (`Block(name="blk_3")`) or under `nn.scan` (`name="blk"`, stacked params).
    """

    cfg: TextConfig
    dtype: jnp.dtype
    kv_window: int
    index: int | None = None  # static layer index when unrolled; None under nn.scan (from the carry)
    fused: frozenset[str] = frozenset()  # fused weights present (`weights.FUSE_GROUPS`: attn_qkv, ffn_gate_up)
    decode_kernel: bool = False  # the native decode kernels: `cpu_kernels.decode_attention` for one-token steps
    # on a per-layer cache, `cpu_kernels.gemv` for products of <= GEMV_MAX_ROWS rows

    @nn.compact
    def __call__(self, carry, cos, sin, mask, write_index, kv_start):
        cfg, dtype = self.cfg, self.dtype
        kern = self.decode_kernel
        x, cache, layer = carry
        b, t, _ = x.shape
        h = RMSNorm(cfg.rms_eps, name="attn_norm")(x)
        n_q, n_kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
        if "attn_qkv" in self.fused:
            qkv = Linear(n_q + 2 * n_kv, dtype, kern, name="attn_qkv")(h)
            q, k, v = qkv[..., :n_q], qkv[..., n_q:n_q + n_kv], qkv[..., n_q + n_kv:]
        else:
            q = Linear(n_q, dtype, kern, name="attn_q")(h)
            k = Linear(n_kv, dtype, kern, name="attn_k")(h)
            v = Linear(n_kv, dtype, kern, name="attn_v")(h)
        q = q.reshape(b, t, cfg.n_heads, cfg.head_dim)
        k, v = k.reshape(b, t, cfg.n_kv_heads, cfg.head_dim), v.reshape(b, t, cfg.n_kv_heads, cfg.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        cache, keys, values = write_and_read_cache(cache, layer if self.index is None else self.index, write_index,
                                                   k, v, self.kv_window)
        if (self.decode_kernel and t == 1 and cache.per_layer
                and cache.k[self.index].dtype in cpu_kernels.ATTENTION_KV_DTYPES):
            # The whole per-layer buffers: the kernel reads only columns kv_start..write_index.
            attn = cpu_kernels.decode_attention(q, cache.k[self.index], cache.v[self.index], kv_start, write_index)
        else:
            attn = attention(q, keys, values, mask, dtype)
        x = x + Linear(cfg.dim, dtype, kern, name="attn_output")(attn).astype(jnp.float32)

        h = RMSNorm(cfg.rms_eps, name="ffn_norm")(x)
        if "ffn_gate_up" in self.fused:
            gate_up = Linear(2 * cfg.ffn_dim, dtype, kern, name="ffn_gate_up")(h).astype(jnp.float32)
            gate, up = gate_up[..., :cfg.ffn_dim], gate_up[..., cfg.ffn_dim:]
        else:
            gate = Linear(cfg.ffn_dim, dtype, kern, name="ffn_gate")(h).astype(jnp.float32)
            up = Linear(cfg.ffn_dim, dtype, kern, name="ffn_up")(h).astype(jnp.float32)
        x = x + Linear(cfg.dim, dtype, kern, name="ffn_down")((jax.nn.silu(gate) * up).astype(dtype)).astype(jnp.float32)
        return (x, cache, layer + 1), None


class Decoder(nn.Module):
    """tokens (+ image embeddings) → hidden states / logits, reading and writing the KV cache.

    `scan_layers=False` unrolls layers over separate weight arrays (faster on XLA:CPU, where a dot fed
    by a dynamic slice of stacked weights copies the slice); `True` scans stacked weights (constant
    compile time in depth; the better choice on GPU/TPU).
    """

    cfg: TextConfig
    dtype: jnp.dtype = jnp.float32
    scan_layers: bool = False
    fused_projections: frozenset[str] = frozenset()  # fused weights present (`weights.FUSE_GROUPS`), see Block
    decode_kernel: bool = False  # the native decode kernels (`cpu_kernels`; XLA:CPU, f32, 1 device), see Block

    @nn.compact
    def __call__(self, tokens: Array, positions: Array, cache: KVCache, write_index: Array, kv_start: Array,
                 kv_window: int, image_embeds: Array | None = None, logit_index: Array | None = None,
                 ) -> tuple[Array, KVCache]:
        """
        tokens:       int32 [B, T]; entries < 0 are image placeholders filled, in order, from image_embeds.
        positions:    int32 [B, T] RoPE positions.
        write_index:  int32 [] cache column of tokens[:, 0] (all rows aligned).
        kv_start:     int32 [B] first valid cache column of each row (left padding before it).
        kv_window:    static int, columns attended (>= write_index + T; <= the cache length).
        cache:        a stacked or a per-layer KVCache (per-layer needs unrolled layers).
        image_embeds: [B, N, D] rows for the placeholders of each row, in order (N static).
        logit_index:  int32 [B] position in T whose logits to return, or None for all positions.
        Returns (f32 logits [B, V] or [B, T, V], updated cache).
        """
        cfg = self.cfg
        embed = Embedding(cfg.vocab_size, cfg.dim, self.dtype, name="token_embd")
        is_image = tokens < 0
        x = embed(jnp.where(is_image, 0, tokens)).astype(jnp.float32)
        if image_embeds is not None:
            x = merge_image_embeddings(x, is_image, image_embeds.astype(jnp.float32))
        freq_factors = RopeFreqs(cfg.rope_dim // 2, name="rope_freqs")() if cfg.has_rope_freqs else None
        cos, sin = rope_angles(positions, cfg, freq_factors)
        mask = attention_mask(write_index, tokens.shape[1], kv_start, kv_window)

        carry = (x, cache, jnp.zeros((), jnp.int32))
        if self.scan_layers:
            if cache.per_layer:
                raise ValueError("scanned layers need a stacked KV cache (KVCache.zeros(..., per_layer=False))")
            scanned = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True},
                              in_axes=(nn.broadcast,) * 5, length=cfg.n_layers)
            carry, _ = scanned(cfg, self.dtype, kv_window, None, self.fused_projections, name="blk")(
                carry, cos, sin, mask, write_index, kv_start)
        else:
            for i in range(cfg.n_layers):
                block = Block(cfg, self.dtype, kv_window, i, self.fused_projections, self.decode_kernel,
                              name=f"blk_{i}")
                carry, _ = block(carry, cos, sin, mask, write_index, kv_start)
        x, cache, _ = carry

        if logit_index is not None:
            x = jnp.take_along_axis(x, logit_index[:, None, None], axis=1)[:, 0]
        h = RMSNorm(cfg.rms_eps, name="output_norm")(x)
        if cfg.tied_output:
            return embed.attend(h, self.decode_kernel), cache
        out = Linear(cfg.vocab_size, self.dtype, self.decode_kernel, out_dtype=jnp.float32, name="output")
        return out(h), cache


def merge_image_embeddings(x: Array, is_image: Array, image_embeds: Array) -> Array:
    """Put image rows at placeholder positions, in order, with static shapes.

    x f32 [B, T, D]; is_image bool [B, T]; image_embeds [B, N, D] → [B, T, D]. The k-th placeholder of
    row b takes image_embeds[b, k] (a cumulative count, then one gather; no data-dependent shapes).
    """
    order = jnp.clip(jnp.cumsum(is_image, axis=1) - 1, 0, image_embeds.shape[1] - 1)
    gathered = jnp.take_along_axis(image_embeds, order[..., None], axis=1)
    return jnp.where(is_image[..., None], gathered, x)
