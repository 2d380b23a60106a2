"""The slot engine (`llava_jax.serving.engine`): continuous batching gives each row what it gets alone.

The real SmolLM2 and a small LLaVA-1.6-style random mmproj (112-px base tile, anyres + unpad: ~120
image tokens). The engine is driven step by step (admit, decode one chunk) so that requests join at
chosen chunks of a running batch: text only, one image, two images, different lengths and limits,
a slot context small enough that the rows must be shifted left when the shared column reaches the
cache's end. Every greedy row must equal `Llava.generate(..., temperature=0)` on it alone; a seeded
sampled row must draw the same tokens alone and in a busy batch; a cancelled row frees its slot.
"""

from __future__ import annotations

import hashlib

import pytest
from tiny_mmproj import drawing, tiny_spec

import llava_jax
from llava_jax.prompts import build_prompt
from llava_jax.random_mmproj import write_random_mmproj
from llava_jax.serving.engine import ImageInput, Job, RowSampling, SlotEngine
from llava_jax.serving.image_cache import ImageCache

pytestmark = pytest.mark.slow

N_CTX = 384
SLOTS = 3


@pytest.fixture(scope="module")
def llm(tmp_path_factory, smollm2_path):
    path = write_random_mmproj(tmp_path_factory.mktemp("mmproj") / "tiny16.gguf", tiny_spec(112, True, seed=1))
    return llava_jax.load(smollm2_path, mmproj=path, n_ctx=N_CTX)


IMAGES = [drawing(90, 60, 1), drawing(40, 100, 2)]
# (question, images, max_tokens, the chunk at which it is submitted)
CASES = [
    ("Tell me a long story about a lighthouse keeper and the sea.", [], 100, 0),
    ("Describe the image.", [IMAGES[0]], 12, 0),
    ("What is the capital of France?", [], 20, 2),
    ("Compare the two pictures.", IMAGES[::-1], 6, 3),
    ("Write a poem about autumn leaves falling in the park.", [], 80, 4),
    ("Hi", [], 5, 4),
    ("List three colours.", [], 30, 8),
    ("Explain why the sky is blue, step by step, in detail.", [], 150, 14),
]


def prompt_of(question: str, images) -> str:
    return question if images else "".join(build_prompt(question, 0, "chatml"))


class Collector:
    def __init__(self):
        self.tokens, self.text, self.done = [], "", None

    def __call__(self, ev):
        if ev["type"] == "delta":
            self.tokens += ev["tokens"]
            self.text += ev["text"]
        else:
            self.done = ev


def make_job(llm, i, question, images, max_tokens, sampling=None):
    prompt = prompt_of(question, images)
    tokens = llm.build_request(prompt, images).tokens if images else llm.tokenize(prompt)
    out = Collector()
    inputs = [ImageInput(hashlib.sha256(im.tobytes()).hexdigest(), im) for im in images]
    return Job(str(i), tokens, inputs, max_tokens, sampling or RowSampling(temperature=0), out), out


def drive(engine: SlotEngine, schedule: dict[int, list[Job]], limit: int = 400) -> None:
    """Admit the jobs of chunk k before decoding chunk k, until every job is done."""
    for k in range(limit):
        for job in schedule.get(k, []):
            engine.submit(job)
        engine._admit()
        if any(engine.slots):
            engine._decode_chunk()
        elif k > max(schedule):
            return
    raise AssertionError("the engine did not finish")


def test_rows_joining_a_running_batch_equal_their_solo_greedy_answers(llm):
    engine = SlotEngine(llm, n_slots=SLOTS, image_cache=ImageCache(1 << 26))
    schedule, outs = {}, []
    for i, (question, images, max_tokens, at) in enumerate(CASES):
        job, out = make_job(llm, i, question, images, max_tokens)
        schedule.setdefault(at, []).append(job)
        outs.append(out)
    drive(engine, schedule)
    assert engine.shifts >= 1  # the shared column reached the end of the cache at least once
    for (question, images, max_tokens, _), out in zip(CASES, outs, strict=True):
        solo = llm.generate(prompt_of(question, images), images, max_new_tokens=max_tokens, temperature=0)
        assert out.tokens == solo.token_ids, question
        assert out.text == solo.text
        assert out.done["finish_reason"] == ("length" if solo.stop_reason in ("length", "context") else "stop")
        assert out.done["completion_tokens"] == len(solo.token_ids)
    assert not any(engine.slots)
    assert engine.image_cache.encodes == 2 and engine.image_cache.hits == 1  # IMAGES[0] asked twice


def test_seeded_sampling_is_the_same_alone_and_in_a_busy_batch(llm):
    sampling = RowSampling(temperature=0.9, top_k=40, top_p=0.95, min_p=0.05, seed=1234)
    engine = SlotEngine(llm, n_slots=SLOTS)
    alone, out_alone = make_job(llm, "a", "Write a haiku about rain.", [], 24, sampling)
    drive(engine, {0: [alone]})
    busy = SlotEngine(llm, n_slots=SLOTS)
    other1, _ = make_job(llm, "b", CASES[0][0], [], 24, RowSampling(temperature=1.0, top_k=0, top_p=0.8, seed=5))
    other2, _ = make_job(llm, "c", CASES[2][0], [], 24)
    again, out_again = make_job(llm, "d", "Write a haiku about rain.", [], 24, sampling)
    drive(busy, {0: [other1, other2], 2: [again]})
    assert out_alone.tokens == out_again.tokens and len(out_alone.tokens) > 0
    greedy = llm.generate(prompt_of("Write a haiku about rain.", []), max_new_tokens=24, temperature=0)
    assert out_alone.tokens != greedy.token_ids  # it really sampled


def test_a_cancelled_row_frees_its_slot(llm):
    engine = SlotEngine(llm, n_slots=SLOTS)
    longs = [make_job(llm, f"long{i}", CASES[0][0], [], 100) for i in range(SLOTS)]
    short, out_short = make_job(llm, "short", "Hi", [], 5)
    for job, _ in longs:
        engine.submit(job)
    engine.submit(short)
    engine._admit()
    engine._decode_chunk()
    assert all(slot is not None for slot in engine.slots) and out_short.done is None  # all slots busy: it waits
    longs[1][0].cancel()
    engine._admit()
    engine._decode_chunk()  # frees the cancelled row before decoding
    engine._admit()  # the waiting request takes it
    assert engine.slots[1].job is short
    for job, _ in longs:
        job.cancel()
    drive(engine, {0: []})
    assert all(out.done is None and len(out.tokens) < 100 for _, out in longs)  # no "done": the clients are gone
    solo = llm.generate(prompt_of("Hi", []), max_new_tokens=5, temperature=0)
    assert out_short.tokens == solo.token_ids and out_short.done["finish_reason"] == "length"


def test_the_waiting_queue_is_bounded(llm):
    from llava_jax.serving.engine import QueueFull

    engine = SlotEngine(llm, n_slots=1, queue_size=1)
    jobs = [make_job(llm, i, "Hi", [], 2)[0] for i in range(3)]
    engine.submit(jobs[0])  # takes the free slot at the next loop
    engine.submit(jobs[1])  # waits
    with pytest.raises(QueueFull):
        engine.submit(jobs[2])
