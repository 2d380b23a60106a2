"""LLaMA-family decoder as Flax modules: RMSNorm, RoPE, grouped-query attention, SwiGLU, tied or
separate output. Used purely through `Decoder(...).apply(params, ...)`.

Weights keep GGUF's `[out, in]` layout (no transposes at load). GGUF llama files have their Q/K rows
permuted by llama.cpp's converter, so RoPE here rotates *adjacent* pairs (x[2i], x[2i+1]) — llama.cpp's
"normal" RoPE — not HF's rotate_half. Norms, softmax and logits are computed in f32; matmuls in the
module's compute dtype.

The KV cache is `KVCache(k, v)`, each `[L, B, S, Hkv, Dh]`, written in place at column `write_index`
(`dynamic_update_slice`; donate it to jit). Attention reads only the first `kv_window` columns, a
static bucket >= the last written column, so the cost follows the text so far, not the context size.
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from llava_jax.config import TextConfig

Array = jax.Array


class KVCache(NamedTuple):
    k: Array  # [L, B, S, Hkv, Dh]
    v: Array  # [L, B, S, Hkv, Dh]

    @classmethod
    def zeros(cls, cfg: TextConfig, batch: int, length: int, dtype) -> KVCache:
        shape = (cfg.n_layers, batch, length, cfg.n_kv_heads, cfg.head_dim)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))


def _precision(dtype):
    # f32 must be true f32 (GPUs default to TF32 for f32 dots); lower dtypes use the default.
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


class Linear(nn.Module):
    """y = x @ W.T with W stored `[out, in]` as in GGUF."""

    features: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        w = self.param("weight", nn.initializers.normal(0.02), (self.features, x.shape[-1]), self.dtype)
        return jnp.einsum("...i,oi->...o", x.astype(self.dtype), w, precision=_precision(self.dtype))


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
        self.weight = self.param("weight", nn.initializers.normal(1.0), (self.vocab_size, self.dim), self.dtype)

    def __call__(self, ids: Array) -> Array:
        return jnp.take(self.weight, ids, axis=0)

    def attend(self, h: Array) -> Array:
        """f32 [..., D] → f32 logits [..., V]."""
        return jnp.einsum("...d,vd->...v", h.astype(self.dtype), self.weight, precision=_precision(self.dtype),
                          preferred_element_type=jnp.float32)


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


def attention(q: Array, k_cache: Array, v_cache: Array, mask: Array, dtype) -> Array:
    """Grouped-query attention. q [B, T, H, Dh]; k/v [B, W, Hkv, Dh]; mask bool [B, T, W] → [B, T, H*Dh]."""
    b, t, h, d = q.shape
    n_kv = k_cache.shape[2]
    q = q.reshape(b, t, n_kv, h // n_kv, d)
    prec = _precision(dtype)
    scores = jnp.einsum("btkgd,bskd->bkgts", q.astype(dtype), k_cache.astype(dtype), precision=prec,
                        preferred_element_type=jnp.float32) / jnp.sqrt(jnp.float32(d))
    probs = jax.nn.softmax(jnp.where(mask[:, None, None], scores, -jnp.inf), axis=-1)
    out = jnp.einsum("bkgts,bskd->btkgd", probs.astype(dtype), v_cache.astype(dtype), precision=prec)
    return out.reshape(b, t, h * d)


def write_and_read_cache(cache: KVCache, layer: Array, write_index: Array, k: Array, v: Array, kv_window: int):
    """Write this layer's k/v [B, T, Hkv, Dh] at column write_index; read back columns [0, kv_window)."""
    zero = jnp.zeros((), jnp.int32)
    layer = jnp.asarray(layer, jnp.int32)
    at = (layer, zero, jnp.asarray(write_index, jnp.int32), zero, zero)
    cache = KVCache(jax.lax.dynamic_update_slice(cache.k, k[None].astype(cache.k.dtype), at),
                    jax.lax.dynamic_update_slice(cache.v, v[None].astype(cache.v.dtype), at))
    size = (1, k.shape[0], kv_window, k.shape[2], k.shape[3])
    start = (layer, zero, zero, zero, zero)
    return cache, jax.lax.dynamic_slice(cache.k, start, size)[0], jax.lax.dynamic_slice(cache.v, start, size)[0]


class Block(nn.Module):
    """Pre-norm transformer block; parameters named as GGUF's `blk.N.*` tensors.

    Scan-shaped: carry (x f32 [B, T, D], cache, layer index) and broadcast inputs, so the same module is
    used unrolled (`Block(name="blk_3")`) or under `nn.scan` (`name="blk"`, stacked params).
    """

    cfg: TextConfig
    dtype: jnp.dtype
    kv_window: int

    @nn.compact
    def __call__(self, carry, cos, sin, mask, write_index):
        cfg, dtype = self.cfg, self.dtype
        x, cache, layer = carry
        b, t, _ = x.shape
        h = RMSNorm(cfg.rms_eps, name="attn_norm")(x)
        q = Linear(cfg.n_heads * cfg.head_dim, dtype, name="attn_q")(h).reshape(b, t, cfg.n_heads, cfg.head_dim)
        k = Linear(cfg.n_kv_heads * cfg.head_dim, dtype, name="attn_k")(h).reshape(b, t, cfg.n_kv_heads, -1)
        v = Linear(cfg.n_kv_heads * cfg.head_dim, dtype, name="attn_v")(h).reshape(b, t, cfg.n_kv_heads, -1)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        cache, keys, values = write_and_read_cache(cache, layer, write_index, k, v, self.kv_window)
        x = x + Linear(cfg.dim, dtype, name="attn_output")(attention(q, keys, values, mask, dtype)).astype(jnp.float32)

        h = RMSNorm(cfg.rms_eps, name="ffn_norm")(x)
        gate = Linear(cfg.ffn_dim, dtype, name="ffn_gate")(h).astype(jnp.float32)
        up = Linear(cfg.ffn_dim, dtype, name="ffn_up")(h).astype(jnp.float32)
        x = x + Linear(cfg.dim, dtype, name="ffn_down")((jax.nn.silu(gate) * up).astype(dtype)).astype(jnp.float32)
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

    @nn.compact
    def __call__(self, tokens: Array, positions: Array, cache: KVCache, write_index: Array, kv_start: Array,
                 kv_window: int, image_embeds: Array | None = None, logit_index: Array | None = None,
                 ) -> tuple[Array, KVCache]:
        """
        tokens:       int32 [B, T]; entries < 0 are image placeholders filled, in order, from image_embeds.
        positions:    int32 [B, T] RoPE positions.
        write_index:  int32 [] cache column of tokens[:, 0] (all rows aligned).
        kv_start:     int32 [B] first valid cache column of each row (left padding before it).
        kv_window:    static int, columns attended (>= write_index + T).
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
        freq_factors = None
        if cfg.has_rope_freqs:
            freq_factors = self.param("rope_freqs", nn.initializers.ones, (cfg.rope_dim // 2,), jnp.float32)
        cos, sin = rope_angles(positions, cfg, freq_factors)
        mask = attention_mask(write_index, tokens.shape[1], kv_start, kv_window)

        carry = (x, cache, jnp.zeros((), jnp.int32))
        if self.scan_layers:
            scanned = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True},
                              in_axes=(nn.broadcast,) * 4, length=cfg.n_layers)
            carry, _ = scanned(cfg, self.dtype, kv_window, name="blk")(carry, cos, sin, mask, write_index)
        else:
            for i in range(cfg.n_layers):
                carry, _ = Block(cfg, self.dtype, kv_window, name=f"blk_{i}")(carry, cos, sin, mask, write_index)
        x, cache, _ = carry

        if logit_index is not None:
            x = jnp.take_along_axis(x, logit_index[:, None, None], axis=1)[:, 0]
        h = RMSNorm(cfg.rms_eps, name="output_norm")(x)
        if cfg.tied_output:
            return embed.attend(h), cache
        out = Linear(cfg.vocab_size, self.dtype, name="output")
        return jnp.asarray(out(h), jnp.float32), cache


def merge_image_embeddings(x: Array, is_image: Array, image_embeds: Array) -> Array:
    """Put image rows at placeholder positions, in order, with static shapes.

    x f32 [B, T, D]; is_image bool [B, T]; image_embeds [B, N, D] → [B, T, D]. The k-th placeholder of
    row b takes image_embeds[b, k] (a cumulative count, then one gather; no data-dependent shapes).
    """
    order = jnp.clip(jnp.cumsum(is_image, axis=1) - 1, 0, image_embeds.shape[1] - 1)
    gathered = jnp.take_along_axis(image_embeds, order[..., None], axis=1)
    return jnp.where(is_image[..., None], gathered, x)
