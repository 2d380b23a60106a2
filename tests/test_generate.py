"""Generation on the real SmolLM2 through the public API: every stop condition, seeds, errors, streaming,
and compiled-program reuse across prompt lengths (bucketing).

Greedy expectations come from llama.cpp's reference continuations (../shared/reference/smollm2/f32.json),
which test_text_parity shows we reproduce token for token.
"""

from __future__ import annotations

import copy

import pytest
from smollm2_model import shared_smollm2

from llava_jax.errors import LlavaError
from llava_jax.generate import Buckets, bucket

pytestmark = pytest.mark.slow

EOS_PROMPT = 0  # "The capital of France is": llama.cpp's greedy run ends with EOS after 29 tokens
STORY = 3  # "Once upon a time, ...": 32 tokens, no EOS


@pytest.fixture(scope="module")
def llm(smollm2_path):
    return shared_smollm2()


def with_context(llm, n_ctx: int):
    """The shared model with another context size (same engine, so the same compiled programs)."""
    small = copy.copy(llm)
    small.n_ctx = n_ctx
    return small


def test_stop_on_eos(llm, smollm2_reference):
    r = smollm2_reference[EOS_PROMPT]
    assert len(r["greedy_ids"]) == 29
    res = llm.generate(r["prompt"], max_new_tokens=64, temperature=0)
    assert res.stop_reason == "eos"
    assert res.token_ids == r["greedy_ids"]  # the EOS id itself is not part of the output
    assert not set(res.token_ids) & llm.tokenizer.stop_ids
    assert res.text == r["greedy_text"]
    assert res.timings.generated_tokens == 29 and res.timings.prompt_tokens == len(r["ids"])


@pytest.mark.parametrize("n", [1, 5, 17, 32])  # 1: prefill only; 17: first token + one whole decode chunk
def test_stop_on_max_new_tokens(n, llm, smollm2_reference):
    r = smollm2_reference[STORY]
    res = llm.generate(r["prompt"], max_new_tokens=n, temperature=0)
    assert res.stop_reason == "length"
    assert res.token_ids == r["greedy_ids"][:n]
    assert res.text == llm.detokenize(r["greedy_ids"][:n])
    assert res.timings.generated_tokens == n


def test_zero_new_tokens(llm, smollm2_reference):
    res = llm.generate(smollm2_reference[STORY]["prompt"], max_new_tokens=0, temperature=0)
    assert res.token_ids == [] and res.text == ""


def test_stop_string(llm, smollm2_reference):
    r = smollm2_reference[STORY]  # greedy text: " a wise and kind woman named Elara. She was a skilled healer ..."
    text = r["greedy_text"]
    res = llm.generate(r["prompt"], max_new_tokens=32, temperature=0, stop=["healer", "Elara"])
    assert res.stop_reason == "stop_string"
    assert res.text == text[: text.index("Elara")]  # the earliest stop string wins; the text ends before it
    # a stop string spanning a token boundary, found in the second decode chunk
    res = llm.generate(r["prompt"], max_new_tokens=32, temperature=0, stop=["healer and"])
    assert res.stop_reason == "stop_string"
    assert res.text == text[: text.index("healer and")]


def test_stop_string_never_streamed(llm, smollm2_reference):
    """Text that could be the start of a stop string is held back, so no streamed piece shows any of it."""
    r = smollm2_reference[STORY]
    pieces = list(llm.stream(r["prompt"], max_new_tokens=32, temperature=0, stop=["Elara."]))
    assert "".join(pieces) == r["greedy_text"][: r["greedy_text"].index("Elara.")]
    assert "Elara" not in "".join(pieces)


def test_stop_on_context_end(llm, smollm2_reference):
    r = smollm2_reference[STORY]
    n_prompt = len(r["ids"])
    res = with_context(llm, n_prompt + 10).generate(r["prompt"], max_new_tokens=64, temperature=0)
    assert res.stop_reason == "context"
    assert res.token_ids == r["greedy_ids"][:10]
    # -n -1 (max_new_tokens < 0): until EOS or the context is full
    res = with_context(llm, n_prompt + 3).generate(r["prompt"], max_new_tokens=-1, temperature=0)
    assert res.stop_reason == "context" and res.token_ids == r["greedy_ids"][:3]
    # one free slot: exactly one token
    res = with_context(llm, n_prompt + 1).generate(r["prompt"], max_new_tokens=64, temperature=0)
    assert res.stop_reason == "context" and res.token_ids == r["greedy_ids"][:1]


@pytest.mark.parametrize("room", [0, -5])  # prompt exactly fills the context / is longer than it
def test_prompt_too_long(room, llm, smollm2_reference):
    r = smollm2_reference[STORY]
    small = with_context(llm, len(r["ids"]) + room)
    with pytest.raises(LlavaError) as info:
        small.generate(r["prompt"], max_new_tokens=8, temperature=0)
    msg = str(info.value)
    assert "\n" not in msg and f"prompt is {len(r['ids'])} tokens" in msg and "context" in msg
    with pytest.raises(LlavaError):
        list(small.stream(r["prompt"], max_new_tokens=8, temperature=0))
    if room < 0:
        with pytest.raises(LlavaError):
            small.logits(r["ids"])


def test_empty_prompt(llm):
    with pytest.raises(LlavaError, match="empty prompt"):
        llm.generate("", max_new_tokens=4, temperature=0)


@pytest.fixture(scope="module")
def seeded_runs(llm, smollm2_reference):
    """Sampling at temperature 0.9 with seeds 1234, 1234, 4321 (+ compiled-program counts)."""
    prompt = smollm2_reference[STORY]["prompt"]
    kw = dict(max_new_tokens=24, temperature=0.9, top_k=40, top_p=0.95, min_p=0.05)
    a1 = llm.generate(prompt, seed=1234, **kw)
    n_compiled = len(llm.engine._compiled)
    a2 = llm.generate(prompt, seed=1234, **kw)
    b = llm.generate(prompt, seed=4321, **kw)
    return {"a1": a1, "a2": a2, "b": b, "n_after_first": n_compiled, "n_after_new_seed": len(llm.engine._compiled)}


def test_seed_reproducible(seeded_runs, smollm2_reference):
    a1, a2, b = seeded_runs["a1"], seeded_runs["a2"], seeded_runs["b"]
    assert len(a1.token_ids) == 24
    assert a1.token_ids == a2.token_ids and a1.text == a2.text
    assert b.token_ids != a1.token_ids  # another seed, another sample (fixed seeds: deterministic, not flaky)
    assert a1.token_ids != smollm2_reference[STORY]["greedy_ids"][:24]  # really sampled, not greedy


def test_new_seed_reuses_compiled_programs(seeded_runs):
    assert seeded_runs["n_after_new_seed"] == seeded_runs["n_after_first"]


def test_stream_pieces_concatenate(llm, smollm2_reference):
    r = smollm2_reference[2]  # code prompt: 32 tokens, several decode chunks
    pieces = list(llm.stream(r["prompt"], max_new_tokens=32, temperature=0))
    assert len(pieces) >= 3  # the first token, then one piece per 16-token decode chunk
    assert all(pieces)
    assert "".join(pieces) == llm.last_result.text == r["greedy_text"]
    assert llm.last_result.token_ids == r["greedy_ids"]


def test_bucketing_reuses_compiled_programs(llm, smollm2_reference):
    short, longer = smollm2_reference[0], smollm2_reference[1]  # 5 and 19 tokens: one 32-token bucket
    assert bucket(len(short["ids"])) == bucket(len(longer["ids"])) == 32
    engine = llm.engine
    llm.generate(short["prompt"], max_new_tokens=20, temperature=0)
    before = set(engine._compiled)
    res = llm.generate(longer["prompt"], max_new_tokens=20, temperature=0)
    assert set(engine._compiled) == before  # same prefill, first-token and decode programs
    assert res.timings.compile_s == 0.0
    assert res.token_ids == longer["greedy_ids"][:20]
    # a prompt in the next bucket (33-64 tokens) adds at most its prefill (none when an earlier test in
    # this session already compiled that bucket); first-token and decode programs are reused
    text = longer["prompt"] * 2
    assert 32 < len(llm.tokenize(text)) <= 64
    res = llm.generate(text, max_new_tokens=20, temperature=0)
    added = set(engine._compiled) - before
    assert [sig[0] for sig in added] in (["prefill"], []), [sig[0] for sig in added]
    assert (res.timings.compile_s > 0.0) == bool(added)


def test_bucket_policy():
    """`Buckets` (the --bucket-min / --bucket-step flags): powers of two from the minimum, then multiples of
    the step; invalid policies are refused with one clear error."""
    b = Buckets(64, 512)
    assert [b(n) for n in (1, 64, 65, 200, 256, 257, 600)] == [64, 64, 128, 256, 256, 512, 1024]
    assert [Buckets()(n) for n in (5, 33, 256, 257, 600, 1025)] == [32, 64, 256, 512, 768, 1280]
    assert b(10, minimum=256) == 256 and b(300, minimum=256) == 512 and b(600, minimum=256) == 1024
    assert Buckets()(33) == bucket(33) == 64  # the default policy is the module's bucket()
    # prompts: powers of two up to the prompt step, then its multiples (595: LLaVA-1.5's image prompt)
    assert [Buckets().prompt(n) for n in (5, 33, 64, 65, 200, 595, 1025)] == [32, 64, 64, 128, 256, 640, 1088]
    assert [Buckets(128, 256, 64).prompt(n) for n in (5, 129, 200)] == [128, 192, 256]
    assert Buckets(32, 256, 256).prompt(595) == 768
    for bad in ((3, 512), (64, 100), (1024, 512), (0, 512), (32, 256, 48)):
        with pytest.raises(LlavaError, match="bucket"):
            Buckets(*bad)


def test_custom_buckets_same_tokens(llm, smollm2_reference):
    """A different bucket policy changes only the padding (other compiled shapes), not the result."""
    r = smollm2_reference[1]  # 19 tokens: the 32 bucket by default, 128 with minimum 128
    engine = llm.engine
    saved = engine.buckets
    try:
        engine.buckets = Buckets(128, 256)
        before = set(engine._compiled)
        res = llm.generate(r["prompt"], max_new_tokens=8, temperature=0)
        added = {sig for sig in set(engine._compiled) - before if sig[0] == "prefill"}
        assert any(shape == (1, 128) for sig in added for shape, _ in sig[2]), added
    finally:
        engine.buckets = saved
    assert res.token_ids == r["greedy_ids"][:8]


def test_logits_with_image_rows(llm, smollm2_reference):
    """`logits(ids, image_embeds=...)` puts the rows at the placeholder slots, in order: giving a prompt's own
    token-embedding rows as "image" rows reproduces its plain logits (only the merge differs: 1e-6)."""
    import numpy as np

    from llava_jax.generate import IMAGE_PLACEHOLDER

    ids = list(smollm2_reference[1]["ids"])
    from llava_jax.qtensor import QTensor

    w = llm.engine.params["token_embd"]["weight"]
    table = np.asarray(w.dequantize() if isinstance(w, QTensor) else w)
    slots = [2, 3, 4, 9]
    with_slots = [IMAGE_PLACEHOLDER if i in slots else t for i, t in enumerate(ids)]
    rows = [table[[ids[i] for i in slots[:3]]], table[[ids[slots[3]]]]]  # two "images": 3 rows and 1 row
    merged = llm.logits(with_slots, image_embeds=rows)
    np.testing.assert_allclose(merged, llm.logits(ids), atol=1e-6, rtol=0)
    shuffled = llm.logits(with_slots, image_embeds=rows[::-1])  # other rows at the slots: other logits
    assert np.abs(shuffled[slots[0]:] - merged[slots[0]:]).max() > 1e-2
    with pytest.raises(LlavaError, match="4 image placeholders"):
        llm.logits(with_slots, image_embeds=rows[:1])
