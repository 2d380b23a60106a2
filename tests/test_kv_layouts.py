"""The decoder's two KV-cache layouts and its causal attention blocks compute the same function.

A tiny random decoder (f32): stacked `[L, B, S, Hkv, Dh]` vs per-layer head-major buffers (with the
size-1 batch / KV-head dims dropped), prefill then token-by-token decode, left-padded batch rows; and the
blocked causal attention of a long prompt vs the unblocked one. Different buffers and query blocks only
change the summation order of a dot, so the tolerance is float32 rounding (1e-5 on logits of size ~1).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llava_jax import text
from llava_jax.config import TextConfig
from llava_jax.text import Decoder, KVCache, attention_mask


def tiny_cfg(n_kv_heads: int) -> TextConfig:
    return TextConfig(vocab_size=61, context_length=1024, dim=32, ffn_dim=48, n_layers=2, n_heads=4,
                      n_kv_heads=n_kv_heads, head_dim=8, rope_dim=8, rope_base=10000.0, rms_eps=1e-5)


def run(cfg, params, tokens, kv_start, per_layer, length, n_decode=3, decode_kernel=False, kv_dtype=jnp.float32):
    """Prefill `tokens` [B, T] (left-padded from kv_start), then n_decode greedy steps; all logits [B, 1+n, V]."""
    model = Decoder(cfg, jnp.float32, decode_kernel=decode_kernel)
    b, t = tokens.shape
    cache = KVCache.zeros(cfg, b, length, kv_dtype, per_layer=per_layer)
    positions = np.maximum(np.arange(t)[None] - kv_start[:, None], 0).astype(np.int32)
    logits, cache = model.apply(params, tokens, positions, cache, 0, kv_start, length if per_layer else t,
                                logit_index=np.full(b, t - 1, np.int32))
    out = [logits]
    for i in range(n_decode):
        tok = jnp.argmax(out[-1], axis=-1).astype(jnp.int32)[:, None]
        logits, cache = model.apply(params, tok, (t + i - kv_start)[:, None].astype(np.int32), cache, t + i,
                                    kv_start, length, logit_index=np.zeros(b, np.int32))
        out.append(logits)
    return np.stack([np.asarray(x) for x in out], axis=1)


@pytest.mark.parametrize("batch,n_kv_heads", [(1, 2), (2, 2), (1, 1), (3, 4)])
def test_per_layer_cache_equals_stacked(batch, n_kv_heads):
    cfg = tiny_cfg(n_kv_heads)
    rng = np.random.default_rng(batch * 10 + n_kv_heads)
    t, length = 12, 32
    tokens = rng.integers(0, cfg.vocab_size, (batch, t)).astype(np.int32)
    kv_start = np.array([(3 * i) % t for i in range(batch)], np.int32)  # ragged rows, left padding
    params = Decoder(cfg, jnp.float32).init(jax.random.PRNGKey(0), tokens, np.zeros_like(tokens),
                                            KVCache.zeros(cfg, batch, length, jnp.float32), 0, kv_start, t)
    cache = KVCache.zeros(cfg, batch, length, jnp.float32, per_layer=True)
    assert cache.per_layer and len(cache.k) == cfg.n_layers
    assert (cache.k[0].shape, cache.v[0].shape) == text.per_layer_shapes(cfg, batch, length)
    assert cache.k[0].shape[-2:] == (cfg.head_dim, length)  # keys transposed
    assert 1 not in cache.k[0].shape[:-2]  # no degenerate batch / head dims
    stacked = run(cfg, params, tokens, kv_start, per_layer=False, length=length)
    per_layer = run(cfg, params, tokens, kv_start, per_layer=True, length=length)
    np.testing.assert_allclose(per_layer, stacked, atol=1e-5, rtol=0)


def test_causal_blocks_equal_full_attention():
    rng = np.random.default_rng(0)
    b, t, h, n_kv, d = 2, 600, 4, 2, 8
    w = t + 40  # a cache longer than the prompt, written from column 40
    q = jnp.asarray(rng.standard_normal((b, t, h, d)), jnp.float32)
    kt = jnp.asarray(rng.standard_normal((b, n_kv, d, w)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((b, n_kv, w, d)), jnp.float32)
    mask = attention_mask(jnp.int32(40), t, jnp.array([40, 90], jnp.int32), w)
    blocked = text.attention(q, kt, v, mask, jnp.float32)
    full = text._attention(q, kt, v, mask, jnp.float32)
    np.testing.assert_allclose(np.asarray(blocked), np.asarray(full), atol=1e-5, rtol=0)


@pytest.mark.parametrize("batch,n_kv_heads", [(1, 2), (2, 2), (3, 1)])
def test_decode_kernel_equals_xla_attention(batch, n_kv_heads):
    """Decode steps through the native kernels (`cpu_kernels.decode_attention` on the per-layer cache,
    `cpu_kernels.gemv` for the weights) vs XLA's attention and dots over the stacked cache, ragged
    left-padded rows: float32 rounding (the kernels sum in another order)."""
    from llava_jax import cpu_kernels

    if not cpu_kernels.kernels_available():
        pytest.skip(f"decode kernels {cpu_kernels.kernel_status()}")
    cfg = tiny_cfg(n_kv_heads)
    rng = np.random.default_rng(batch + 7 * n_kv_heads)
    t, length = 12, 32
    tokens = rng.integers(0, cfg.vocab_size, (batch, t)).astype(np.int32)
    kv_start = np.array([(5 * i) % t for i in range(batch)], np.int32)
    params = Decoder(cfg, jnp.float32).init(jax.random.PRNGKey(1), tokens, np.zeros_like(tokens),
                                            KVCache.zeros(cfg, batch, length, jnp.float32), 0, kv_start, t)
    stacked = run(cfg, params, tokens, kv_start, per_layer=False, length=length, n_decode=6)
    kernel = run(cfg, params, tokens, kv_start, per_layer=True, length=length, n_decode=6, decode_kernel=True)
    # Logits reach ~40 here: f32 rounding is ~1e-6 of that, plus 1e-5 absolute for the small ones.
    np.testing.assert_allclose(kernel, stacked, atol=1e-5, rtol=1e-6)


def test_f16_cache_decodes_through_the_f16_kernel():
    """An f16 cache (`-ctk/-ctv f16`) on the native path: decode steps call the f16 attention kernel
    (in the compiled step) and give XLA's logits over the same f16 stacked cache (f32 rounding: both
    read the same f16 values, converted exactly)."""
    from llava_jax import cpu_kernels

    if not cpu_kernels.kernels_available():
        pytest.skip(f"decode kernels {cpu_kernels.kernel_status()}")
    cfg = tiny_cfg(2)
    rng = np.random.default_rng(11)
    t, length, batch = 12, 32, 2
    tokens = rng.integers(0, cfg.vocab_size, (batch, t)).astype(np.int32)
    kv_start = np.array([0, 5], np.int32)
    params = Decoder(cfg, jnp.float32).init(jax.random.PRNGKey(1), tokens, np.zeros_like(tokens),
                                            KVCache.zeros(cfg, batch, length, jnp.float32), 0, kv_start, t)
    stacked = run(cfg, params, tokens, kv_start, per_layer=False, length=length, n_decode=6, kv_dtype=jnp.float16)
    kernel = run(cfg, params, tokens, kv_start, per_layer=True, length=length, n_decode=6, decode_kernel=True,
                 kv_dtype=jnp.float16)
    np.testing.assert_allclose(kernel, stacked, atol=1e-5, rtol=1e-6)

    model = Decoder(cfg, jnp.float32, decode_kernel=True)
    cache = KVCache.zeros(cfg, batch, length, jnp.float16, per_layer=True)
    step = jax.jit(lambda p, tok, c: model.apply(p, tok, np.zeros((batch, 1), np.int32), c, t, kv_start, length,
                                                 logit_index=np.zeros(batch, np.int32))).lower(params, tokens[:, :1], cache)
    assert step.as_text().count(cpu_kernels.ATTENTION_F16) == cfg.n_layers
