"""quants.py: bit-exact against gguf-py's numpy dequantizers, on any leading dims and when sharded."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf import quants as gq

from llava_jax import quants
from llava_jax.errors import LlavaError

Q = GGMLQuantizationType

# Byte offsets of the f16 (or bf16/f32) scale fields inside one block; they are forced finite.
SCALE_FIELDS: dict[GGMLQuantizationType, tuple[int, ...]] = {
    Q.F32: (), Q.F16: (0,), Q.BF16: (0,),
    Q.Q4_0: (0,), Q.Q4_1: (0, 2), Q.Q5_0: (0,), Q.Q5_1: (0, 2), Q.Q8_0: (0,),
    Q.Q2_K: (80, 82), Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,),
    Q.IQ4_NL: (0,), Q.IQ4_XS: (0,),
}
ALL = sorted(quants.SUPPORTED)
_jit_blocks = jax.jit(quants.dequantize_blocks, static_argnums=1)


def _finite(blocks: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """Clear the top exponent bit of any inf/NaN scale (or value, for the float types)."""
    blocks = blocks.copy()
    if qtype == Q.F32:
        u = blocks.view(np.uint32)
        u[(u & 0x7F800000) == 0x7F800000] &= 0xBFFFFFFF
        return blocks
    exp = 0x7F80 if qtype == Q.BF16 else 0x7C00
    for off in SCALE_FIELDS[qtype]:
        u = np.ascontiguousarray(blocks[..., off:off + 2]).view(np.uint16)
        u[(u & exp) == exp] &= 0xBFFF
        blocks[..., off:off + 2] = u.view(np.uint8)
    return blocks


def random_blocks(qtype, lead: tuple[int, ...], seed: int) -> np.ndarray:
    type_size = GGML_QUANT_SIZES[qtype][1]
    rng = np.random.default_rng(seed)
    return _finite(rng.integers(0, 256, size=(*lead, type_size), dtype=np.uint8), qtype)


def special_blocks(qtype) -> np.ndarray:
    """Edge patterns: all-zero, all-0xFF, alternating bytes, and extreme scales (max, subnormal, -0)."""
    type_size = GGML_QUANT_SIZES[qtype][1]
    rows = [np.full(type_size, v, np.uint8) for v in (0x00, 0xFF, 0x55, 0xAA, 0x0F, 0xF0, 0x80, 0x7F)]
    out = np.stack(rows)
    extra = []
    for f16 in (0x7BFF, 0xFBFF, 0x0001, 0x83FF, 0x8000, 0x3C00):  # ±max, subnormals, -0, 1.0
        b = out.copy()
        for off in SCALE_FIELDS[qtype]:
            b[:, off], b[:, off + 1] = f16 & 0xFF, f16 >> 8
        extra.append(b)
    return _finite(np.concatenate([out, *extra]), qtype)


def reference(blocks: np.ndarray, qtype) -> np.ndarray:
    """gguf-py's numpy dequantization, on the rows `[..., n_blocks * type_size]`."""
    *lead, n_blocks, type_size = blocks.shape
    raw = np.ascontiguousarray(blocks).reshape(*lead, n_blocks * type_size)
    ref = np.asarray(gq.dequantize(raw, qtype), dtype=np.float32)
    return ref.reshape(*lead, -1)


def assert_bits_equal(got, want):
    got = np.asarray(got)
    assert got.dtype == np.float32 and got.shape == want.shape, (got.dtype, got.shape, want.shape)
    assert not np.isnan(want).any()
    bad = got.view(np.uint32) != want.view(np.uint32)
    assert not bad.any(), f"{bad.sum()} of {bad.size} differ, e.g. {got[bad][:4]} vs {want[bad][:4]}"


def test_supported_set():
    assert quants.SUPPORTED == frozenset(SCALE_FIELDS)
    assert isinstance(quants.SUPPORTED, frozenset)


@pytest.mark.parametrize("qtype", ALL, ids=lambda t: t.name)
def test_random_blocks_bit_exact(qtype):
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    for seed in range(3):
        blocks = random_blocks(qtype, (257,), seed)
        got = _jit_blocks(jnp.asarray(blocks), qtype)
        assert got.shape == (257, block_size)
        assert_bits_equal(got, reference(blocks[None], qtype)[0].reshape(257, block_size))


@pytest.mark.parametrize("qtype", ALL, ids=lambda t: t.name)
def test_special_blocks_bit_exact(qtype):
    blocks = special_blocks(qtype)
    got = _jit_blocks(jnp.asarray(blocks), qtype)
    want = reference(blocks[:, None], qtype)
    assert_bits_equal(got, want)


@pytest.mark.parametrize("qtype", ALL, ids=lambda t: t.name)
def test_leading_dims_and_dequantize(qtype):
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    blocks = random_blocks(qtype, (3, 5, 4), seed=7)
    want = reference(blocks, qtype)  # [3, 5, 4 * block_size]
    got = _jit_blocks(jnp.asarray(blocks), qtype)
    assert got.shape == (3, 5, 4, block_size)
    assert_bits_equal(np.asarray(got).reshape(3, 5, -1), want)
    raw = blocks.reshape(3, 5, 4 * type_size)
    assert_bits_equal(jax.jit(quants.dequantize, static_argnums=1)(raw, qtype), want)


def test_dequantize_eager_with_shape():
    blocks = random_blocks(Q.Q4_1, (6, 2), seed=3)
    want = reference(blocks, Q.Q4_1)  # [6, 64]
    got = quants.dequantize(blocks.reshape(6, 40), Q.Q4_1, (3, 2, 64))
    assert_bits_equal(got, want.reshape(3, 2, 64))
    with pytest.raises(ValueError, match="shape"):
        quants.dequantize(blocks.reshape(6, 40), Q.Q4_1, (5, 64))


def test_unsupported_type_names_tensor():
    quants.check_supported("blk.0.attn_q.weight", Q.Q4_K)
    with pytest.raises(LlavaError, match=r"tensor blk\.3\.ffn_up\.weight: quant type IQ2_XXS is not supported") as e:
        quants.check_supported("blk.3.ffn_up.weight", Q.IQ2_XXS)
    assert "\n" not in str(e.value) and "Q4_K" in str(e.value)
    with pytest.raises(LlavaError, match="TQ1_0"):
        quants.dequantize_blocks(jnp.zeros((1, GGML_QUANT_SIZES[Q.TQ1_0][1]), jnp.uint8), Q.TQ1_0)


def test_wrong_block_width_rejected():
    with pytest.raises(ValueError, match="Q8_0"):
        quants.dequantize_blocks(jnp.zeros((2, 33), jnp.uint8), Q.Q8_0)
    with pytest.raises(ValueError, match="Q4_1"):
        quants.dequantize(jnp.zeros((2, 30), jnp.uint8), Q.Q4_1)


SHARDED_SNIPPET = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q
    from llava_jax import quants
    from tests.test_quants import random_blocks, reference
    assert jax.device_count() == 8, jax.devices()
    mesh = Mesh(np.array(jax.devices()), ("x",))
    for qtype in (Q.Q8_0, Q.Q4_1, Q.Q4_K, Q.Q6_K, Q.IQ4_XS, Q.F16):
        blocks = random_blocks(qtype, (16, 8), seed=int(qtype))
        want = reference(blocks, qtype)
        for spec in (P("x"), P(None, "x")):  # shard rows, or shard the n_blocks axis
            sh = NamedSharding(mesh, spec)
            x = jax.device_put(blocks, sh)
            f = jax.jit(quants.dequantize_blocks, static_argnums=1, out_shardings=sh)
            got = f(x, qtype)
            assert len(got.sharding.device_set) == 8
            assert got.addressable_shards[0].data.shape[:2] == ((2, 8) if spec == P("x") else (16, 1))
            got = np.asarray(got).reshape(16, -1)
            assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), (qtype.name, spec)
    print("SHARDED-OK")
    """
)


def test_sharded_over_8_cpu_devices():
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = repo + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", SHARDED_SNIPPET], cwd=repo, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "SHARDED-OK" in proc.stdout, proc.stderr[-3000:]


def test_real_file_tensors(smollm2_path):
    from llava_jax.gguf_io import open_gguf

    f = open_gguf(smollm2_path)
    names = {"token_embd.weight": Q.Q8_0, "blk.0.ffn_down.weight": Q.Q4_1, "blk.0.attn_norm.weight": Q.F32}
    for name, qtype in names.items():
        t = f.tensors[name]
        assert t.qtype == qtype
        quants.check_supported(name, t.qtype)
        raw = np.asarray(t.raw[:256]) if len(t.shape) > 1 else np.asarray(t.raw)
        want = np.asarray(gq.dequantize(raw, qtype), np.float32)
        got = jax.jit(quants.dequantize, static_argnums=1)(raw, qtype)
        assert_bits_equal(got, want)
        blocks = t.blocks()[:256] if len(t.shape) > 1 else t.blocks()
        assert_bits_equal(np.asarray(_jit_blocks(blocks, qtype)).reshape(want.shape), want)


def test_real_file_dequantizes(smollm2_path):
    """The whole 49152x576 Q8_0 embedding and 576x1536 Q4_1 matrix of the real file (test_real_file_tensors
    checks their first rows) dequantize under jit to what `gguf.quants` gives. Speed is measured by
    scripts/bench.py, never asserted here."""
    from llava_jax.gguf_io import open_gguf

    f = open_gguf(smollm2_path)
    fn = jax.jit(quants.dequantize, static_argnums=1)
    for name in ("token_embd.weight", "blk.0.ffn_down.weight"):
        t = f.tensors[name]
        out = np.asarray(fn(jnp.asarray(t.raw), t.qtype))
        assert out.shape == t.shape and out.dtype == np.float32
        assert_bits_equal(out, np.asarray(gq.dequantize(np.asarray(t.raw), t.qtype), np.float32).reshape(t.shape))
