"""Weights kept in their GGUF block formats (`weights="quantized"`, the CPU default): memory, layout,
the function computed, fallbacks, the memory check before load, rope_freqs and the f32 logits.

Tolerances: quantized and dequantized storage compute the same function (the values are bit-exact,
`test_qgemv`); teacher-forced logits differ only by the order of f32 sums in the products, on SmolLM2
logits of magnitude ~10-30: 1e-3 absolute, the bound the llama.cpp F32-rewrite parity test states for
the same reason (measured here: ~1e-4).
"""

from __future__ import annotations

import numpy as np
import pytest
import tiny_llama
from smollm2_model import shared_smollm2
from tiny_llama import write_tiny_llama

import llava_jax
from llava_jax import cpu_kernels, memory
from llava_jax.errors import LlavaError
from llava_jax.gguf_io import open_gguf
from llava_jax.qtensor import Q, QTensor, param_bytes

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def dequantized():
    return llava_jax.load(weights="dequantized")


def test_quantized_params_occupy_the_file_tensor_bytes(smollm2_path, dequantized):
    llm = shared_smollm2()
    assert llm.engine.params["blk_0"]["ffn_gate_up"]["weight"].qtype == Q.Q4_1  # fused at load, still blocks
    assert llm.engine.params["token_embd"]["weight"].qtype == Q.Q8_0
    g = open_gguf(smollm2_path)
    file_bytes = sum(v.raw.nbytes for v in g.tensors.values())
    held = param_bytes(llm.engine.params)
    assert held == file_bytes, (held, file_bytes)  # every byte once: no f32 copy, no second copy
    assert param_bytes(dequantized.engine.params) > 5 * file_bytes  # f32: ~5.6x the Q4_1 / Q8_0 bytes


def test_quantized_equals_dequantized(smollm2_reference, dequantized):
    llm = shared_smollm2()
    for ref in smollm2_reference[:3]:
        diff = np.abs(llm.logits(ref["ids"]) - dequantized.logits(ref["ids"])).max()
        assert diff < 1e-3, diff
    a = llm.generate(smollm2_reference[3]["prompt"], max_new_tokens=16, temperature=0)
    b = dequantized.generate(smollm2_reference[3]["prompt"], max_new_tokens=16, temperature=0)
    assert a.token_ids == b.token_ids


def test_scanned_layers_keep_blocks(smollm2_reference):
    llm = llava_jax.load(scan_layers=True)
    w = llm.engine.params["blk"]["ffn_down"]["weight"]
    assert isinstance(w, QTensor) and w.shape == (30, 576, 1536)
    diff = np.abs(llm.logits(smollm2_reference[1]["ids"]) - shared_smollm2().logits(smollm2_reference[1]["ids"])).max()
    assert diff < 1e-3


def test_mixed_types_and_fallbacks(tmp_path, smollm2_path, monkeypatch):
    """attn_v in another type than q/k in one layer: q/k/v stay apart (every layer alike), gate/up fuse;
    an IQ4_NL matrix has no product kernel: dequantized at load with a one-line notice. The storage is
    compared here, so both models' prompt products are XLA's dot (AMX's product sums in another order;
    its accuracy is test_qgemv's)."""
    monkeypatch.setenv(cpu_kernels.AMX_SWITCH, "0")
    path = write_tiny_llama(tmp_path / "mixed.gguf", smollm2_path,
                            {"blk.1.attn_v.weight": Q.Q6_K, "ffn_up": Q.Q8_0, "ffn_gate": Q.Q8_0, "attn_q": Q.Q4_K,
                             "attn_k": Q.Q4_K, "blk.0.attn_v.weight": Q.Q4_K, "ffn_down": Q.IQ4_NL})
    notices: list[str] = []
    llm = llava_jax.load(path, notice=notices.append)
    layer = llm.engine.params["blk_0"]
    assert "attn_qkv" not in layer and isinstance(layer["attn_q"]["weight"], QTensor)
    assert isinstance(layer["ffn_gate_up"]["weight"], QTensor)
    assert not isinstance(layer["ffn_down"]["weight"], QTensor)
    assert any("ffn_down" in n and "IQ4_NL" in n for n in notices), notices
    ref = llava_jax.load(path, weights="dequantized")
    ids = llm.tokenize("Hello there, how are you?")
    assert np.abs(llm.logits(ids) - ref.logits(ids)).max() < 1e-4  # logits ~70: 1e-4 is ~1e-6 of them
    assert llm.generate("Hi", max_new_tokens=8, temperature=0).token_ids == \
        ref.generate("Hi", max_new_tokens=8, temperature=0).token_ids


def test_rope_freqs_tensor(tmp_path, smollm2_path):
    """A file with `rope_freqs.weight` loads (it crashed: the loader's params["rope_freqs"]["weight"] vs the
    decoder's bare param) and applies it: factors of 2 everywhere divide every frequency by 2, which is
    exactly linear rope scaling by 2 (positions halved) of the same weights without the tensor."""
    half = tiny_llama.DIM // tiny_llama.HEADS // 2
    with_freqs = write_tiny_llama(tmp_path / "freqs.gguf", smollm2_path, rope_freqs=np.full(half, 2.0))
    scaled = write_tiny_llama(tmp_path / "scaled.gguf", smollm2_path,
                              extra_metadata={"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 2.0})
    a, b = llava_jax.load(with_freqs), llava_jax.load(scaled)
    assert a.cfg.has_rope_freqs and not b.cfg.has_rope_freqs
    ids = a.tokenize("one two three four five six seven eight nine ten")
    np.testing.assert_allclose(a.logits(ids), b.logits(ids), rtol=0, atol=1e-5)
    plain = llava_jax.load(write_tiny_llama(tmp_path / "plain.gguf", smollm2_path))
    assert np.abs(plain.logits(ids) - a.logits(ids)).max() > 1e-3  # the factors do change the function


def test_untied_logits_are_f32_in_bf16(tmp_path, smollm2_path):
    """An untied `output` projection returns f32 logits under bf16 compute (they were rounded to bf16)."""
    path = write_tiny_llama(tmp_path / "untied.gguf", smollm2_path)
    llm = llava_jax.load(path, dtype="bf16", weights="dequantized")
    logits = llm.logits(llm.tokenize("Hello"))
    assert logits.dtype == np.float32
    # bf16 has 8 significant bits: rounded logits would all sit on a coarse grid
    as_bf16 = logits.astype(np.float32).view(np.uint32) & 0xFFFF
    assert np.count_nonzero(as_bf16) > 0.5 * as_bf16.size


def test_memory_check_refuses_before_reading(monkeypatch, smollm2_path):
    from llava_jax import params

    def boom(*a, **k):
        raise AssertionError("a tensor was read")

    monkeypatch.setattr(params, "place_leaf", boom)
    monkeypatch.setenv(memory.ENV_LIMIT, "1.5GiB")  # dequantized at -c 8192 needs ~1.7 GiB, quantized ~1.3
    with pytest.raises(LlavaError) as e:
        llava_jax.load(weights="dequantized", n_ctx=8192)
    msg = str(e.value)
    assert "\n" not in msg and "not enough memory" in msg and "LLAVA_JAX_MEMORY_LIMIT" in msg
    assert "--weights quantized" in msg  # the quantized load fits
    monkeypatch.setenv(memory.ENV_LIMIT, "100MB")
    with pytest.raises(LlavaError, match="no smaller setting fits|would fit: -c"):
        llava_jax.load(n_ctx=8192)


def test_memory_estimate_names_what_fits(smollm2_path):
    g = open_gguf(smollm2_path)
    cfg = shared_smollm2().cfg
    q = memory.estimate(g, cfg, 8192, np.float32, "quantized")
    d = memory.estimate(g, cfg, 8192, np.float32, "dequantized")
    assert q.weights == sum(v.raw.nbytes for v in g.tensors.values())
    assert d.weights > 5 * q.weights
    half = memory.estimate(g, cfg, 8192, np.float32, "quantized", kv_dtype=np.float16)
    assert half.kv_cache * 2 == q.kv_cache == 2 * cfg.n_layers * 8192 * cfg.n_kv_heads * cfg.head_dim * 4


def test_f16_kv_cache(smollm2_reference):
    """`kv_dtype="f16"` halves the cache; logits move by f16 rounding of K/V only (llama.cpp's default)."""
    llm = llava_jax.load(kv_dtype="f16")
    cache = llm.engine.new_cache(1, 256, per_layer=True)
    assert cache.k[0].dtype == np.float16
    ref = shared_smollm2()
    a = llm.generate(smollm2_reference[3]["prompt"], max_new_tokens=8, temperature=0)
    b = ref.generate(smollm2_reference[3]["prompt"], max_new_tokens=8, temperature=0)
    assert a.token_ids == b.token_ids


def test_unknown_weights_mode():
    with pytest.raises(LlavaError, match="unknown weights mode"):
        llava_jax.load(weights="int4")
