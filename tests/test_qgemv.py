"""The quantized product kernel (`cpu_kernels.qgemv`) and `text.project` over `QTensor` weights.

Reference: float64 `x @ dequantize(blocks).T`, with `quants.dequantize` (itself bit-exact with
gguf.quants). Tolerance: the kernel sums K f32 products in 8-lane partial sums and then a tree, so
its error is bounded by about (K / 8 + 3) f32 roundings of the sum of |x_i w_i|: we allow
`(K / 8 + 8) * 2**-24 * (|x| @ |w|.T)` per output, the worst-case bound of that summation order
(typical errors are ~100x smaller). Any wrong unpacking of a block moves outputs by whole quanta,
far beyond it.

The integer decode path (`qgemv(..., int8=True)`, Q4_K / Q6_K on AVX-512 VNNI) also rounds x to 21 bits
relative to the largest |x| of each group of 16 values: its bound adds `max|x_group| * 2**-21` per value
times |w| (`int8_bound`); its integer sums are exact.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llava_jax import cpu_kernels, quants, text
from llava_jax.qtensor import Q, QTensor

pytestmark = pytest.mark.skipif(not cpu_kernels.kernels_available(), reason="native kernels unavailable")

# Byte offsets of each format's f16 scale fields (set to small finite values; the rest stays random).
SCALES = {Q.Q4_0: (0,), Q.Q4_1: (0, 2), Q.Q5_0: (0,), Q.Q5_1: (0, 2), Q.Q8_0: (0,), Q.IQ4_NL: (0,), Q.Q2_K: (80, 82),
          Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}
TYPES = sorted(cpu_kernels.QGEMV_UNITS, key=int)


def random_blocks(qtype, n: int, k: int, seed: int) -> np.ndarray:
    """uint8 [n, k / bs, ts]: random quants, small finite f16 scales (and finite F16 / BF16 values)."""
    rng = np.random.default_rng(seed)
    bs, ts = GGML_QUANT_SIZES[qtype]
    if qtype == Q.F16:
        return rng.standard_normal((n, k)).astype(np.float16).view(np.uint8).reshape(n, k, 2)
    if qtype == Q.BF16:
        bits = (rng.standard_normal((n, k)).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
        return bits.view(np.uint8).reshape(n, k, 2)
    blocks = rng.integers(0, 256, (n, k // bs, ts), dtype=np.uint8)
    for off in SCALES[qtype]:
        scale = rng.uniform(0.001, 0.05, (n, k // bs)).astype(np.float16)
        blocks[..., off:off + 2] = scale.view(np.uint8).reshape(n, k // bs, 2)
    return blocks


def reference(x: np.ndarray, blocks: np.ndarray, qtype) -> tuple[np.ndarray, np.ndarray]:
    """(float64 x @ w.T, the error bound per output) for w = dequantize(blocks)."""
    w = np.asarray(quants.dequantize_blocks(jnp.asarray(blocks), qtype)).reshape(blocks.shape[0], -1).astype(np.float64)
    k = w.shape[1]
    bound = (k / 8 + 8) * 2.0**-24 * (np.abs(x) @ np.abs(w).T) + 1e-30
    return x.astype(np.float64) @ w.T, bound


def kernel_blocks(qtype, blocks: np.ndarray) -> np.ndarray:
    """F16 / BF16 blocks are single values; the kernel takes any [N, nb, ts] grouping of a row's bytes."""
    return blocks.reshape(blocks.shape[0], -1, 64) if qtype in (Q.F16, Q.BF16) else blocks


def check(qtype, n: int, k: int, m: int, seed: int, product=cpu_kernels.qgemv) -> None:
    blocks = random_blocks(qtype, n, k, seed)
    x = np.random.default_rng(seed + 1).standard_normal((m, k)).astype(np.float32)
    y = np.asarray(jax.jit(lambda a, b: product(a, b, qtype))(x, kernel_blocks(qtype, blocks)))
    ref, bound = reference(x, blocks, qtype)
    assert y.shape == (m, n)
    err = np.abs(y - ref)
    assert np.all(err <= bound), f"{qtype.name} n={n} k={k} m={m}: max err {err.max():.3g}, worst ratio {(err / bound).max():.3g}"


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("m", [1, 2, 3, 8, 16])
def test_qgemv_equals_dequantize_then_dot(qtype, m):
    k = 512 if cpu_kernels.QGEMV_UNITS[qtype] == 256 else 96
    check(qtype, 37, k, m, seed=int(qtype) * 100 + m)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(qtype=st.sampled_from(TYPES), n=st.integers(1, 70), units=st.integers(1, 4), m=st.integers(1, 8),
       seed=st.integers(0, 2**16))
def test_qgemv_ragged_shapes(qtype, n, units, m, seed):
    """Any row count (one row, fewer rows than threads' pieces, odd), any whole number of units, 1-8 inputs."""
    check(qtype, n, units * cpu_kernels.QGEMV_UNITS[qtype], m, seed)


def test_qgemv_refuses_what_it_cannot_take():
    blocks = random_blocks(Q.Q4_0, 4, 64, 0)
    with pytest.raises(ValueError):
        cpu_kernels.qgemv(jnp.zeros((17, 64)), blocks, Q.Q4_0)  # too many rows
    with pytest.raises(ValueError):
        cpu_kernels.qgemv(jnp.zeros((1, 64)), blocks, Q.IQ4_NL)  # no kernel for the type
    assert not cpu_kernels.qgemv_applies((1, 48), jnp.float32, Q.F16, 48)  # F16 rows need a multiple of 32


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q6_K, Q.Q4_1, Q.Q8_0, Q.F16], ids=lambda t: t.name)
@pytest.mark.parametrize("rows", [1, 5, 64])
def test_project_over_qtensor(qtype, rows):
    """`text.project` on a QTensor: the kernel for a few rows, dequantize-in-program for a prefill block;
    both equal the reference, and the HLO holds the custom call exactly where the kernel applies."""
    n, k = 48, 512
    blocks = random_blocks(qtype, n, k, 7)
    w = QTensor(jnp.asarray(blocks), qtype, (n, k))
    x = np.random.default_rng(3).standard_normal((rows, k)).astype(np.float32)
    fn = jax.jit(lambda a, ww: text.project(a, ww, jnp.float32, kernel=True))
    y = np.asarray(fn(x, w))
    ref, bound = reference(x, blocks, qtype)
    assert np.all(np.abs(y - ref) <= bound)
    hlo = fn.lower(x, w).as_text()
    assert (cpu_kernels.QGEMV in hlo) == (rows <= cpu_kernels.QGEMV_MAX_ROWS)
    assert (cpu_kernels.QMATMUL in hlo) == (rows > cpu_kernels.QGEMV_MAX_ROWS and cpu_kernels.amx_available())


# The AMX prompt product (`cpu_kernels.qmatmul`): x and w split into three bf16 parts, six part products
# summed in f32 by the tiles. The dropped part products are below 2^-26 of each |x_i w_i|; the tiles add
# the products one after another (a worst case of 6K roundings, beyond the bound above), but rounding
# errors of these random inputs add like a random walk: the largest seen is 0.05 of the bound above, so
# the same bound holds with a 20x margin, and a wrong tile layout or unpacking moves outputs by whole
# weights, far beyond it.
needs_amx = pytest.mark.skipif(not cpu_kernels.amx_available(), reason="no AMX on this CPU (or LLAVA_JAX_AMX=0)")


@needs_amx
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("m", [17, 33, 100])
def test_qmatmul_equals_dequantize_then_dot(qtype, m):
    k = 768 if cpu_kernels.QGEMV_UNITS[qtype] == 256 else 96
    check(qtype, 300, k, m, seed=int(qtype) * 100 + m, product=cpu_kernels.qmatmul)


@needs_amx
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(qtype=st.sampled_from(TYPES), n=st.integers(1, 530), units=st.integers(1, 5), m=st.integers(17, 70),
       seed=st.integers(0, 2**16))
def test_qmatmul_ragged_shapes(qtype, n, units, m, seed):
    """Row counts that leave partial output groups and pieces, any whole number of units (k blocks that
    end mid-block of 256), token counts that leave a partial and an odd token group."""
    check(qtype, n, units * cpu_kernels.QGEMV_UNITS[qtype], m, seed, product=cpu_kernels.qmatmul)


# ---- the integer decode path ------------------------------------------------------------------------------
needs_int8 = pytest.mark.skipif(not cpu_kernels.int8_available(), reason="no AVX-512 VNNI here (or LLAVA_JAX_INT8=0)")
INT8_TYPES = sorted(cpu_kernels.INT8_TYPES, key=int)


def int8_bound(x: np.ndarray, blocks: np.ndarray, qtype) -> np.ndarray:
    """The f32 bound plus x's rounding: each value moves by at most 2^-21 of its group of 16's largest |x|."""
    w = np.asarray(quants.dequantize_blocks(jnp.asarray(blocks), qtype)).reshape(blocks.shape[0], -1).astype(np.float64)
    m, k = x.shape
    group_max = np.abs(x.astype(np.float64)).reshape(m, k // 16, 16).max(-1)
    return reference(x, blocks, qtype)[1] + (np.repeat(group_max, 16, axis=1) * 2.0**-21) @ np.abs(w).T


def check_int8(qtype, n: int, k: int, x: np.ndarray, seed: int) -> None:
    blocks = random_blocks(qtype, n, k, seed)
    y = np.asarray(jax.jit(lambda a, b: cpu_kernels.qgemv(a, b, qtype, int8=True))(x, blocks))
    err = np.abs(y - reference(x, blocks, qtype)[0])
    bound = int8_bound(x, blocks, qtype)
    assert np.all(err <= bound), f"{qtype.name} n={n} k={k} m={len(x)}: worst ratio {(err / bound).max():.3g}"


@needs_int8
@pytest.mark.parametrize("qtype", INT8_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("m", [1, 2])
def test_int8_qgemv_equals_dequantize_then_dot(qtype, m):
    x = np.random.default_rng(m).standard_normal((m, 768)).astype(np.float32)
    check_int8(qtype, 45, 768, x, seed=int(qtype) + m)


@needs_int8
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(qtype=st.sampled_from(INT8_TYPES), n=st.integers(1, 70), units=st.integers(1, 4), m=st.integers(1, 2),
       seed=st.integers(0, 2**16), outliers=st.integers(0, 8), zero_groups=st.integers(0, 3))
def test_int8_qgemv_ragged_shapes_and_outliers(qtype, n, units, m, seed, outliers, zero_groups):
    """Any row count and whole number of blocks; x with outliers 1000x the rest (LLaMA's hidden states have
    such dims), all-zero groups and tiny groups: digits of every magnitude and groups with nothing in them."""
    rng = np.random.default_rng(seed)
    k = units * 256
    x = rng.standard_normal((m, k)).astype(np.float32)
    x[:, rng.integers(0, k, outliers)] *= 1000.0
    for g in rng.integers(0, k // 16, zero_groups):
        x[:, 16 * g:16 * g + 16] = 0.0
    x[:, :16] *= 1e-30
    check_int8(qtype, n, k, x, seed)


@needs_int8
def test_int8_is_the_default_for_one_or_two_rows_and_the_switch(monkeypatch):
    """Q4_K / Q6_K at 1-2 rows take the integer path by default (the result is not the f32 path's, and is
    within the int8 bound); from 3 rows on, other types, or with LLAVA_JAX_INT8=0 the f32 path runs."""
    blocks = random_blocks(Q.Q4_K, 40, 512, 3)
    x = np.random.default_rng(4).standard_normal((2, 512)).astype(np.float32)
    f32 = np.asarray(cpu_kernels.qgemv(x, blocks, Q.Q4_K, int8=False))
    default = np.asarray(cpu_kernels.qgemv(x, blocks, Q.Q4_K))
    assert not np.array_equal(default, f32)
    assert np.all(np.abs(default - reference(x, blocks, Q.Q4_K)[0]) <= int8_bound(x, blocks, Q.Q4_K))
    x3 = np.concatenate([x, x[:1]])
    np.testing.assert_array_equal(np.asarray(cpu_kernels.qgemv(x3, blocks, Q.Q4_K, int8=True)),
                                  np.asarray(cpu_kernels.qgemv(x3, blocks, Q.Q4_K, int8=False)))
    monkeypatch.setenv(cpu_kernels.INT8_SWITCH, "0")
    assert not cpu_kernels.int8_available()
    np.testing.assert_array_equal(np.asarray(cpu_kernels.qgemv(x, blocks, Q.Q4_K)), f32)


@needs_int8
def test_int8_keeps_nan_and_zero():
    """A NaN in x makes its outputs NaN (as the f32 product does); an all-zero x gives exact zeros."""
    blocks = random_blocks(Q.Q6_K, 8, 256, 5)
    x = np.zeros((2, 256), np.float32)
    x[1, 7] = np.nan
    y = np.asarray(cpu_kernels.qgemv(x, blocks, Q.Q6_K, int8=True))
    assert np.all(y[0] == 0.0) and np.all(np.isnan(y[1]))


def test_amx_switch(monkeypatch):
    """LLAVA_JAX_AMX=0 sends prompts back to dequantize + XLA's dot."""
    monkeypatch.setenv(cpu_kernels.AMX_SWITCH, "0")
    assert not cpu_kernels.amx_available()
    assert not cpu_kernels.qmatmul_applies((64, 256), jnp.float32, Q.Q4_K, 256)


def test_qtensor_take_rows_and_slices():
    blocks = random_blocks(Q.Q4_K, 10, 256, 1)
    w = QTensor(jnp.asarray(blocks), Q.Q4_K, (10, 256))
    full = np.asarray(w.dequantize())
    ids = jnp.array([[3, 0], [9, 3]])
    np.testing.assert_array_equal(np.asarray(w.take_rows(ids)), full[np.asarray(ids)])
    np.testing.assert_array_equal(np.asarray(w.row_slice(2, 5).dequantize()), full[2:7])


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_native_dequantize_is_bit_exact(qtype):
    """`cpu_kernels.dequantize` (the prefill path's unpacking) gives exactly `quants.dequantize`'s values."""
    k = 512 if cpu_kernels.QGEMV_UNITS[qtype] == 256 else 96
    blocks = random_blocks(qtype, 29, k, int(qtype))
    ours = np.asarray(jax.jit(lambda b: cpu_kernels.dequantize(b, qtype, k))(blocks))
    ref = np.asarray(quants.dequantize_blocks(jnp.asarray(blocks), qtype)).reshape(29, k)
    np.testing.assert_array_equal(ours.view(np.uint32), ref.view(np.uint32))


def test_prefill_dequantizes_one_weight_at_a_time(monkeypatch):
    """A program with several quantized products holds about one dequantized weight at a time (the
    conditional in `text.dequantize_when_needed`), not all of them (XLA hoisted them all before).
    (Without AMX's product, which dequantizes nothing: switched off here.)"""
    monkeypatch.setenv(cpu_kernels.AMX_SWITCH, "0")
    n, k, layers = 256, 1024, 8
    ws = [QTensor(jnp.asarray(random_blocks(Q.Q4_K, n, k, i)), Q.Q4_K, (n, k)) for i in range(layers)]
    x = jnp.ones((64, k), jnp.float32)

    def chain(x, ws):
        for w in ws:
            x = text.project(x, w, jnp.float32, kernel=True) @ jnp.eye(n, k)
        return x

    temp = jax.jit(chain).lower(x, ws).compile().memory_analysis().temp_size_in_bytes
    one_weight = n * k * 4
    assert temp < 3 * one_weight, (temp, one_weight)
