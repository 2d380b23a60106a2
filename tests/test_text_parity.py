"""The f32 decoder on the real SmolLM2 Q4_1 file vs llama.cpp on its F32 rewrite (../shared/reference/smollm2).

The F32 rewrite holds exactly the values our on-device dequantization produces, so both sides compute the
same function and differ only in float summation order. Tolerance: 1e-3 absolute on logits of magnitude
~10-30 (measured max 1.1e-4 over all five prompts). f32 has a 24-bit mantissa (relative 6e-8); each of
the 30 layers sums 576- to 1536-term dot products and softmaxes in a different order than llama.cpp's
kernels (SIMD widths, blocking, fused vs separate ops), and the residual stream carries those rounding
differences forward, so ~1e-5 relative at the output (~1e-4 absolute) is expected; 1e-3 leaves 10x room
while still failing on any real bug (a wrong RoPE pairing, norm epsilon or Q/K permutation moves logits by
O(0.1-10)).
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from smollm2_model import shared_smollm2

LOGIT_TOL = 1e-3
N_PROMPTS = 5


@pytest.fixture(scope="module")
def llm(smollm2_path):
    return shared_smollm2()


@pytest.fixture(scope="module")
def last_logits(shared_reference):
    with np.load(shared_reference / "smollm2" / "f32_last_logits.npz") as npz:
        return {k: npz[k] for k in npz.files}


@pytest.fixture(scope="module")
def our_logits(llm, smollm2_reference):
    """Teacher-forced logits [len(ids), vocab] of each reference prompt (llama.cpp's own token ids)."""
    return [llm.logits(r["ids"]) for r in smollm2_reference]


def top10_mismatches(logits: np.ndarray, ref_ids: np.ndarray, tol: float) -> list[tuple[int, int, int, int]]:
    """Positions/ranks where our top-10 ids differ from the reference beyond a tie.

    At rank k, our id a and the reference's id b may differ only if the two tokens are tied within `tol`
    under our logits (equal logits sort arbitrarily; near-equal ones swap under summation-order noise).
    Returns (position, rank, our id, reference id) for every real mismatch.
    """
    ours = np.argsort(-logits, axis=1, kind="stable")[:, :10]
    bad = []
    for pos, rank in zip(*np.nonzero(ours != ref_ids), strict=True):
        a, b = int(ours[pos, rank]), int(ref_ids[pos, rank])
        if abs(logits[pos, a] - logits[pos, b]) >= tol:
            bad.append((int(pos), int(rank), a, b))
    return bad


def test_tokenization_matches(llm, smollm2_reference):
    for r in smollm2_reference:
        assert llm.tokenize(r["prompt"]) == r["ids"], r["prompt"]


@pytest.mark.parametrize("i", range(N_PROMPTS))
def test_top10_ids_every_position(i, our_logits, smollm2_reference):
    r = smollm2_reference[i]
    logits = our_logits[i]
    assert logits.shape == (len(r["ids"]), 49152) and logits.dtype == np.float32
    assert top10_mismatches(logits, np.array(r["top10_ids"]), LOGIT_TOL) == []


@pytest.mark.parametrize("i", range(N_PROMPTS))
def test_top10_logits_every_position(i, our_logits, smollm2_reference):
    r = smollm2_reference[i]
    ours = np.take_along_axis(our_logits[i], np.array(r["top10_ids"]), axis=1)
    diff = np.abs(ours - np.array(r["top10_logits"], np.float32)).max()
    assert diff < LOGIT_TOL, diff


@pytest.mark.parametrize("i", range(N_PROMPTS))
def test_last_position_full_logits(i, our_logits, last_logits):
    want = last_logits[f"p{i}"]
    got = our_logits[i][-1]
    assert got.shape == want.shape
    diff = np.abs(got - want).max()
    assert diff < LOGIT_TOL, diff


def test_max_diff_summary(our_logits, last_logits, smollm2_reference):
    """One number for the record: the worst diff over every comparison above (measured ~1.1e-4)."""
    worst = 0.0
    for i, r in enumerate(smollm2_reference):
        top = np.take_along_axis(our_logits[i], np.array(r["top10_ids"]), axis=1)
        worst = max(worst, float(np.abs(top - np.array(r["top10_logits"])).max()),
                    float(np.abs(our_logits[i][-1] - last_logits[f"p{i}"]).max()))
    print(f"max abs logit diff vs llama.cpp F32: {worst:.3g}")
    assert worst < LOGIT_TOL


def test_tie_rule_is_not_vacuous():
    """The tie allowance only forgives swaps of (near-)equal logits."""
    logits = np.array([[5.0, 4.0, 4.0 + 1e-5, 1.0] + [0.0] * 8], np.float32)
    ref = np.argsort(-logits, axis=1, kind="stable")[:, :10]
    swapped = ref.copy()
    swapped[0, [1, 2]] = swapped[0, [2, 1]]
    assert top10_mismatches(logits, swapped, 1e-3) == []
    wrong = ref.copy()
    wrong[0, [0, 1]] = wrong[0, [1, 0]]
    assert len(top10_mismatches(logits, wrong, 1e-3)) == 2


@pytest.mark.slow
@pytest.mark.parametrize("i", range(N_PROMPTS))
def test_greedy_continuation(i, llm, smollm2_reference):
    """32 greedy tokens through the public API equal llama.cpp's; its run stops early at EOS (prompt 0
    stops after 29 tokens), and so must ours, with stop_reason "eos"."""
    r = smollm2_reference[i]
    res = llm.generate(r["prompt"], max_new_tokens=32, temperature=0)
    assert res.prompt_ids == r["ids"]
    assert res.token_ids == r["greedy_ids"]
    assert res.text == r["greedy_text"]
    assert res.stop_reason == ("length" if len(r["greedy_ids"]) == 32 else "eos")


@pytest.mark.slow
def test_greedy_continuation_xla_attention(llm, smollm2_reference):
    """The default engine decodes with the native attention kernel where it builds; XLA's attention
    (the path of meshes, bf16 and scanned layers) must give llama.cpp's tokens too."""
    from llava_jax import cpu_kernels
    from llava_jax.generate import TextEngine

    default = llm.engine
    assert default.model.decode_kernel == cpu_kernels.kernels_available()
    llm.engine = TextEngine(default.cfg, default.canonical_params(), default.mesh, default.dtype, decode_kernel=False)
    try:
        for i in (1, 4):
            r = smollm2_reference[i]
            assert llm.generate(r["prompt"], max_new_tokens=32, temperature=0).token_ids == r["greedy_ids"]
    finally:
        llm.engine = default


@pytest.mark.slow
def test_scan_layers_equals_unrolled(smollm2_reference, monkeypatch):
    """Layers stacked and scanned vs separate arrays unrolled: the same ops per layer, but XLA fuses and
    orders the work differently around a while loop, so allow 1e-5 rather than bit equality. Scanned
    layers do not use the native kernels, so the unrolled model here runs its prompt products as XLA's
    dot too (AMX's product sums in another order; its accuracy is test_qgemv's)."""
    import llava_jax
    from llava_jax import cpu_kernels

    monkeypatch.setenv(cpu_kernels.AMX_SWITCH, "0")
    unrolled = llava_jax.load()
    scanned = llava_jax.load(scan_layers=True)
    assert "blk" in scanned.engine.params and "blk_0" not in scanned.engine.params
    assert scanned.engine.params["blk"]["attn_qkv"]["weight"].shape == (30, 576 + 2 * 192, 576)  # fused q/k/v
    assert scanned.engine.canonical_params()["blk"]["attn_q"]["weight"].shape == (30, 576, 576)
    for i in (1, 4):
        ids = smollm2_reference[i]["ids"]
        diff = np.abs(scanned.logits(ids) - unrolled.logits(ids)).max()
        print(f"prompt {i}: scanned vs unrolled max abs logit diff {diff:.3g}")
        assert diff < 1e-5, (i, diff)


@pytest.mark.slow
def test_bf16_sanity(smollm2_reference):
    """bf16 weights and activations (norms, softmax, logits still f32) run end to end and start the same
    greedy answer. Loose on purpose: bf16 keeps 8 mantissa bits, so logits move by ~0.1, and greedy output
    can only be trusted where the top-1/top-2 gap is larger; on this prompt the first four f32 greedy
    tokens (" Paris", ".", "\\n", "\\n") win by 1.3-2.5 logits, so only those are compared."""
    import jax.numpy as jnp

    import llava_jax

    llm = llava_jax.load(dtype="bf16", weights="dequantized")  # bf16 storage (quantized keeps the blocks)
    assert llm.engine.params["blk_0"]["attn_qkv"]["weight"].dtype == jnp.bfloat16
    assert llm.engine.params["blk_0"]["attn_norm"]["weight"].dtype == jnp.float32
    r = smollm2_reference[0]
    res = llm.generate(r["prompt"], max_new_tokens=8, temperature=0)
    assert len(res.token_ids) == 8
    assert res.token_ids[:4] == r["greedy_ids"][:4]


@pytest.mark.slow
def test_fused_projections_equal_separate(our_logits, smollm2_reference):
    """One q/k/v weight and one gate/up weight per layer (the default on a model-axis-1 mesh) vs GGUF's
    separate weights: the same products, but XLA may block the longer dots differently, so 1e-5; the
    fused weights split back into exactly GGUF's tensors."""
    import llava_jax
    from llava_jax.generate import TextEngine

    llm = llava_jax.load()
    eng = llm.engine
    assert eng.model.fused_projections and "attn_qkv" in eng.params["blk_0"] and "attn_q" not in eng.params["blk_0"]
    canonical = eng.canonical_params()
    separate = TextEngine(eng.cfg, canonical, eng.mesh, eng.dtype, fuse_projections=False)
    assert not separate.model.fused_projections and "attn_q" in separate.params["blk_0"]
    refused = TextEngine(eng.cfg, canonical, eng.mesh, eng.dtype)
    for a, b in zip(jax.tree_util.tree_leaves(refused.params), jax.tree_util.tree_leaves(eng.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    llm.engine = separate
    for i in (0, 3):
        diff = np.abs(llm.logits(smollm2_reference[i]["ids"]) - our_logits[i]).max()
        print(f"prompt {i}: separate vs fused projections max abs logit diff {diff:.3g}")
        assert diff < 1e-5, (i, diff)
