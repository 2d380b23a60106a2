"""The native decode kernels (`cpu_kernels`) compute what XLA computes: attention as `text._attention`,
`gemv` as `text.project`'s einsum.

Random f32 operands in the per-layer cache layout (transposed keys, size-1 lead dims dropped),
ragged left-padded rows, padding queries, columns that split into several chunks (the kernel merges
per-chunk softmax sums), head sizes that are and are not multiples of 4. The kernel sums in a different
order and uses its own exp polynomial (relative error < 2e-7), so the tolerance is float32 rounding:
1e-5 absolute on outputs of size ~1.
"""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llava_jax import cpu_kernels, text
from llava_jax.errors import LlavaError

pytestmark = pytest.mark.skipif(not cpu_kernels.kernels_available(),
                                reason=f"decode kernels {cpu_kernels.kernel_status()}")


def operands(rng, b, n_kv, g, d, s, scale=1.0):
    lead = text.head_lead(b, n_kv)
    q = jnp.asarray(rng.standard_normal((b, 1, n_kv * g, d)) * scale, jnp.float32)
    kt = jnp.asarray(rng.standard_normal((*lead, d, s)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((*lead, s, d)), jnp.float32)
    return q, kt, v


CASES = [  # batch, kv heads, query heads per kv head, head dim, buffer length, column, kv_start per row
    (1, 3, 3, 64, 768, 600, [0]),  # SmolLM2 decode: lead dims (3,), two chunks per head
    (1, 3, 3, 64, 768, 0, [0]),  # first column
    (1, 3, 3, 64, 768, 767, [0]),  # last column
    (2, 2, 2, 8, 64, 40, [0, 17]),  # ragged batch
    (2, 1, 4, 16, 300, 299, [5, 250]),  # one kv head: lead (B,)
    (3, 2, 1, 10, 520, 513, [0, 511, 513]),  # head dim not a multiple of 4; a row whose only column is its own
    (2, 2, 3, 12, 96, 20, [0, 60]),  # a padding query (column < kv_start): sees only itself
    (1, 1, 8, 128, 2048, 1999, [100]),  # no lead dims at all, many chunks
]


@pytest.mark.parametrize("b,n_kv,g,d,s,column,kv_start", CASES)
def test_kernel_equals_xla_attention(b, n_kv, g, d, s, column, kv_start):
    rng = np.random.default_rng(s + column)
    q, kt, v = operands(rng, b, n_kv, g, d, s)
    kv_start = jnp.asarray(kv_start, jnp.int32)
    want = text._attention(q, kt, v, text.attention_mask(jnp.int32(column), 1, kv_start, s), jnp.float32)
    got = jax.jit(cpu_kernels.decode_attention)(q, kt, v, kv_start, jnp.int32(column))
    assert got.shape == want.shape == (b, 1, n_kv * g * d)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=0)


@pytest.mark.parametrize("b,n_kv,g,d,s,column,kv_start", CASES)
def test_f16_cache_kernel_reads_the_values_exactly(b, n_kv, g, d, s, column, kv_start):
    """An f16 cache (`-ctk/-ctv f16`): the kernel converts each value to f32 exactly, so it computes what
    it computes on the f32 copy of the cache (1e-6: only the generic path's sums may vectorize apart),
    and what XLA's attention computes on that copy (f32 rounding, as above)."""
    rng = np.random.default_rng(s + column + 1)
    q, kt, v = operands(rng, b, n_kv, g, d, s)
    kt16, v16 = kt.astype(jnp.float16), v.astype(jnp.float16)
    kv_start = jnp.asarray(kv_start, jnp.int32)
    got = jax.jit(cpu_kernels.decode_attention)(q, kt16, v16, kv_start, jnp.int32(column))
    on_f32 = cpu_kernels.decode_attention(q, kt16.astype(jnp.float32), v16.astype(jnp.float32), kv_start,
                                          jnp.int32(column))
    want = text._attention(q, kt16.astype(jnp.float32), v16.astype(jnp.float32),
                           text.attention_mask(jnp.int32(column), 1, kv_start, s), jnp.float32)
    np.testing.assert_allclose(np.asarray(got), np.asarray(on_f32), atol=1e-6, rtol=0)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=0)


def test_mixed_or_bf16_caches_are_refused():
    q, kt, v = operands(np.random.default_rng(0), 1, 3, 3, 8, 32)
    with pytest.raises(ValueError, match="f32 or f16 cache"):
        cpu_kernels.decode_attention(q, kt.astype(jnp.float16), v, jnp.zeros((1,), jnp.int32), 3)
    with pytest.raises(ValueError, match="f32 or f16 cache"):
        cpu_kernels.decode_attention(q, kt.astype(jnp.bfloat16), v.astype(jnp.bfloat16), jnp.zeros((1,), jnp.int32), 3)


def test_peaked_scores_exercise_the_exp():
    """Scores spanning ~0..-300 (large queries): exponents near the underflow clamp, and a softmax
    dominated by a few columns, as in real attention heads."""
    rng = np.random.default_rng(7)
    q, kt, v = operands(rng, 1, 2, 2, 32, 512, scale=12.0)
    kv_start = jnp.zeros((1,), jnp.int32)
    want = text._attention(q, kt, v, text.attention_mask(jnp.int32(400), 1, kv_start, 512), jnp.float32)
    got = cpu_kernels.decode_attention(q, kt, v, kv_start, jnp.int32(400))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=0)


def test_kernel_inside_scan_and_jit_reads_updated_cache():
    """Under lax.scan (as decode runs it) each step sees the column written just before it."""
    rng = np.random.default_rng(3)
    q, kt, v = operands(rng, 1, 3, 3, 16, 64)
    kv_start = jnp.zeros((1,), jnp.int32)

    def step(kind):
        def body(carry, col):
            kt, v = carry
            kt = jax.lax.dynamic_update_slice(kt, jnp.full((3, 16, 1), 0.5, jnp.float32), (0, 0, col))
            v = jax.lax.dynamic_update_slice(v, jnp.full((3, 1, 16), col.astype(jnp.float32), jnp.float32),
                                             (0, col, 0))
            if kind == "kernel":
                out = cpu_kernels.decode_attention(q, kt, v, kv_start, col)
            else:
                out = text._attention(q, kt, v, text.attention_mask(col, 1, kv_start, 64), jnp.float32)
            return (kt, v), out
        return jax.jit(lambda kt, v: jax.lax.scan(body, (kt, v), jnp.arange(10, 30, dtype=jnp.int32))[1])

    np.testing.assert_allclose(np.asarray(step("kernel")(kt, v)), np.asarray(step("xla")(kt, v)), atol=1e-5, rtol=0)


def test_bad_shapes_are_refused():
    q, kt, v = operands(np.random.default_rng(0), 1, 3, 3, 8, 32)
    with pytest.raises(ValueError, match="one query token"):
        cpu_kernels.decode_attention(jnp.concatenate([q, q], axis=1), kt, v, jnp.zeros((1,), jnp.int32), 3)
    with pytest.raises(Exception, match="column outside"):
        np.asarray(cpu_kernels.decode_attention(q, kt, v, jnp.zeros((1,), jnp.int32), jnp.int32(32)))


def test_engine_refuses_kernel_where_it_does_not_apply():
    from llava_jax.generate import TextEngine, decode_kernel_applies
    from llava_jax.sharding import make_mesh

    mesh = make_mesh()
    assert decode_kernel_applies(mesh, jnp.float32, scan_layers=False)
    assert not decode_kernel_applies(mesh, jnp.bfloat16, scan_layers=False)
    assert not decode_kernel_applies(mesh, jnp.float32, scan_layers=True)
    with pytest.raises(LlavaError, match="decode kernels need"):
        TextEngine(None, {}, mesh, jnp.float32, scan_layers=True, fuse_projections=False, decode_kernel=True)


def test_compile_failure_is_reported(tmp_path, monkeypatch):
    broken = tmp_path / "broken.cc"
    broken.write_text("this is not C++\n")
    monkeypatch.setattr(cpu_kernels, "SOURCES", (broken,))
    monkeypatch.setenv("LLAVA_JAX_CACHE", str(tmp_path))
    with pytest.raises(RuntimeError, match="compiling broken.cc failed"):
        cpu_kernels.build_library()
    assert not list(tmp_path.glob("kernels/*.so"))


@pytest.mark.parametrize("env,reason", [({"CXX": "/nonexistent/c++"}, "no C++ compiler"),
                                        ({"LLAVA_JAX_CPU_KERNELS": "0"}, "disabled by LLAVA_JAX_CPU_KERNELS=0")])
def test_without_the_kernel_the_xla_path_is_used(tmp_path, env, reason):
    """No compiler (or the switch off): no kernel, a reason, and an engine that decodes with XLA."""
    code = (
        "from llava_jax import cpu_kernels\n"
        "assert not cpu_kernels.kernels_available()\n"
        "print(cpu_kernels.kernel_status())\n"
    )
    env = {**os.environ, "LLAVA_JAX_CACHE": str(tmp_path), **env}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert reason in proc.stdout
    assert not list(tmp_path.glob("kernels/*.so"))


GEMV_CASES = [  # rows M (as x's lead shape), N outputs, K inputs
    ((1, 1), 960, 576),  # SmolLM2's fused q/k/v in a decode step
    ((1,), 49152 // 16, 576),  # an lm-head-like wide product
    ((3, 1), 576, 1536),  # three decode rows
    ((8,), 37, 19),  # N not a multiple of 4, K not a multiple of 16, fewer rows than one piece
    ((2, 2), 5, 3),  # tiny: one piece, scalar tails only
]


@pytest.mark.parametrize("lead,n,k", GEMV_CASES)
def test_gemv_equals_xla_dot(lead, n, k):
    """f32 sums in another order: within 1e-5 relative to the size of the terms (K products of O(1))."""
    rng = np.random.default_rng(n + k)
    x = jnp.asarray(rng.standard_normal((*lead, k)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((n, k)), jnp.float32)
    want = np.asarray(jnp.einsum("...i,oi->...o", x, w, precision="highest"))
    got = np.asarray(jax.jit(cpu_kernels.gemv)(x, w))
    assert got.shape == (*lead, n)
    np.testing.assert_allclose(got, want, atol=1e-5 * np.sqrt(k), rtol=0)


def test_project_uses_gemv_only_where_it_applies():
    """`text.project(kernel=True)`: a few f32 rows go to the custom call, more rows or bf16 to XLA's dot."""
    w = jnp.ones((16, 32), jnp.float32)

    def custom_calls(x, dtype=jnp.float32):
        hlo = jax.jit(lambda x, w: text.project(x, w, dtype, kernel=True)).lower(x, w).as_text()
        return hlo.count(cpu_kernels.GEMV)

    assert custom_calls(jnp.ones((1, 1, 32))) == 1
    assert custom_calls(jnp.ones((cpu_kernels.GEMV_MAX_ROWS, 32))) == 1
    assert custom_calls(jnp.ones((cpu_kernels.GEMV_MAX_ROWS + 1, 32))) == 0
    assert custom_calls(jnp.ones((1, 32)), jnp.bfloat16) == 0


def test_gemv_refuses_what_it_cannot_take():
    with pytest.raises(ValueError, match="gemv takes"):
        cpu_kernels.gemv(jnp.ones((cpu_kernels.GEMV_MAX_ROWS + 1, 4)), jnp.ones((3, 4)))
    with pytest.raises(ValueError, match="gemv takes"):
        cpu_kernels.gemv(jnp.ones((1, 4)), jnp.ones((3, 5)))
    with pytest.raises(ValueError, match="gemv takes"):
        cpu_kernels.gemv(jnp.ones((1, 4), jnp.bfloat16), jnp.ones((3, 4), jnp.bfloat16))
