"""`Llava.stream`'s handle: its result is there after a `break`, two threads streaming at once each get their own,
and `generate_batch` rows each get their own `Timings` (on the one-layer tiny llama of test_cli)."""

from __future__ import annotations

import threading

import pytest
from test_cli import write_tiny_llama

import llava_jax

GREEDY = dict(max_new_tokens=24, temperature=0)


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "tiny.gguf"
    write_tiny_llama(path)
    return llava_jax.load(path, decode_chunk=2)  # short chunks: several pieces per answer


def test_result_after_break(llm):
    full = llm.generate("hello", **GREEDY)
    stream = llm.stream("hello", **GREEDY)
    assert stream.result.stop_reason == "interrupted" and stream.result.text == ""  # nothing shown yet
    first = next(stream)
    res = stream.result
    assert res.stop_reason == "interrupted" and res.text == first and full.text.startswith(first)
    assert res.token_ids == full.token_ids[:len(res.token_ids)] and 0 < len(res.token_ids) < len(full.token_ids)
    assert res.prompt_ids == full.prompt_ids
    stream.close()
    assert stream.result.text == first  # closing keeps what was shown


def test_iterating_to_the_end_gives_the_generate_result(llm):
    stream = llm.stream("hello", **GREEDY)
    pieces = list(stream)
    res, full = stream.result, llm.generate("hello", **GREEDY)
    assert "".join(pieces) == res.text == full.text and res.token_ids == full.token_ids
    assert res.stop_reason == full.stop_reason != "interrupted"
    assert llm.last_result.text == full.text  # kept for old code


def test_two_threads_stream_at_once(llm):
    prompts = ["hello", "the man said"]
    want = {p: llm.generate(p, **GREEDY) for p in prompts}
    assert want[prompts[0]].token_ids != want[prompts[1]].token_ids
    both_started = threading.Barrier(2, timeout=120)
    got, errors = {}, []

    def worker(prompt):
        try:
            stream = llm.stream(prompt, **GREEDY)
            text = next(stream)
            both_started.wait()  # the two generations overlap from here
            text += "".join(stream)
            got[prompt] = (text, stream.result)
        except Exception as e:  # reported below, not lost in the thread
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(p,)) for p in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    for p in prompts:
        text, res = got[p]
        assert text == res.text == want[p].text and res.token_ids == want[p].token_ids, p
        assert res.prompt_ids == want[p].prompt_ids


def test_batch_rows_have_their_own_timings(llm):
    outs = llm.generate_batch(["hello", "the man said"], max_new_tokens=4, temperature=0)
    assert outs[0].timings is not outs[1].timings
    outs[0].timings.generate_s = -1.0
    assert outs[1].timings.generate_s >= 0
