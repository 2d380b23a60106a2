"""`scripts/batch_eval.py` end to end, and the evaluation module's bookkeeping.

Slow tests (real SmolLM2 + a small random LLaVA-1.6-style mmproj, greedy, subprocesses): a 50-question set
built here (images drawn with Pillow, two missing images, one unreadable, one truncated, one prompt too long
for `--ctx-size`) gives 50 answer rows in question order with LLaVA's answer fields and error rows for the
bad ones; then the same file, byte for byte, from
- a run killed with SIGKILL mid-job (plus a torn last line) and restarted,
- two processes joined by `jax.distributed` on localhost (CPU, gloo collectives),
- one process on 8 simulated CPU devices with `--mesh 2x4` (batch split 2 ways, weights 4 ways).
All runs share a persistent XLA compilation cache (speed only: a cached program is the same program).

Fast tests drive `evaluation.answer_questions` with a fake model (padding of the last batch, error rows,
chat template on text-only rows) and check the answers-file rules (torn lines, merge order, parts).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from tiny_mmproj import drawing, tiny_spec

from llava_jax import evaluation as ev
from llava_jax.errors import LlavaError
from llava_jax.random_mmproj import write_random_mmproj

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "batch_eval.py"
N_QUESTIONS = 50
MODEL_ID = "smollm2-tiny16"
ANSWER_FIELDS = {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}
SHORT_QUESTIONS = ["What is 2+2?", "Name a colour.", "Say hello.", "Name a fruit.", "Count to three.",
                   "What is the sea?", "Name an animal.", "Is ice cold?", "Spell cat.", "Name a planet."]
# question index -> drawn image size; image rows lengthen their whole batch (CPU prefill is the cost), so
# they sit in two batches of eight, text-only batches around them
IMAGE_QUESTIONS = {9: (40, 30), 10: (80, 60), 12: (200, 60), 13: (60, 200), 17: (100, 100), 18: (300, 90),
                   20: (150, 40), 22: (120, 90)}
MISSING, UNREADABLE, TRUNCATED, TOO_LONG = (11, 38), 24, 30, 44
CTX = 256


def qid(i: int):
    return f"q{i}" if i % 10 == 7 else i  # LLaVA files use int ids; some benchmarks use strings


# ---------------------------------------------------------------------------------------------------
# the data set and the runs


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    images = root / "images"
    (images / "sub").mkdir(parents=True)
    rows = []
    for i in range(N_QUESTIONS):
        row = {"question_id": qid(i), "text": SHORT_QUESTIONS[i % len(SHORT_QUESTIONS)]}
        if i in IMAGE_QUESTIONS:
            name = f"sub/img{i}.jpg" if i % 2 else f"img{i}.png"
            drawing(*IMAGE_QUESTIONS[i], seed=i).save(images / name)
            row |= {"image": name, "text": "What is in the image?" if i % 3 else "Describe it briefly.",
                    "category": "conv"}
        elif i in MISSING:
            row["image"] = f"nowhere{i}.png"
        elif i == UNREADABLE:
            (images / "garbage.png").write_bytes(b"this is not a png file\n" * 4)
            row["image"] = "garbage.png"
        elif i == TRUNCATED:
            drawing(64, 64, seed=i).save(images / "full.png")
            (images / "cut.png").write_bytes((images / "full.png").read_bytes()[:200])
            row["image"] = "cut.png"
        elif i == TOO_LONG:
            row["text"] = "Repeat after me: " + "the quick brown fox jumps over the lazy dog " * 30
        rows.append(row)
    questions = root / "questions.jsonl"
    questions.write_text("".join(json.dumps(r) + "\n" for r in rows))
    mmproj = write_random_mmproj(root / "tiny16.gguf", tiny_spec(56, True, seed=1))
    return SimpleNamespace(root=root, images=images, questions=questions, rows=rows, mmproj=mmproj,
                           cache=root / "xla-cache")


def command(ds, answers: Path, *extra: str) -> list[str]:
    return [sys.executable, str(SCRIPT), "--mmproj", str(ds.mmproj), "--questions", str(ds.questions),
            "--image-folder", str(ds.images), "--answers", str(answers), "--batch-size", "8",
            "--max-new-tokens", "5", "--ctx-size", str(CTX), "--temp", "0", "--scan-layers", "on",
            "--model-id", MODEL_ID, *extra]


def environment(ds, **extra: str) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(ds.cache),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("XLA_FLAGS", None)
    return env | extra


def start(ds, answers: Path, *extra: str, log: Path, env: dict | None = None) -> subprocess.Popen:
    with open(log, "wb") as f:  # a file, not a pipe: the progress bar must never block on a full pipe
        return subprocess.Popen(command(ds, answers, *extra), cwd=ds.root, env=env or environment(ds),
                                stdout=f, stderr=subprocess.STDOUT)


def finish(proc: subprocess.Popen, log: Path, timeout: float = 900) -> str:
    rc = proc.wait(timeout=timeout)
    text = log.read_text(errors="replace")
    assert rc == 0, text[-3000:]
    return text


def summary_of(log_text: str) -> dict:
    lines = [ln for ln in log_text.splitlines() if ln.startswith("batch_eval: {")]
    assert lines, log_text[-2000:]
    return json.loads(lines[-1].removeprefix("batch_eval: "))


@pytest.fixture(scope="module")
def reference(dataset):
    """The uninterrupted one-process run: (answers file text, its log)."""
    answers = dataset.root / "reference.jsonl"
    log = dataset.root / "reference.log"
    t0 = time.perf_counter()
    text = finish(start(dataset, answers, "--no-progress", log=log), log)
    print(f"\nbatch_eval reference run: {time.perf_counter() - t0:.1f} s")
    return answers.read_text(), text


# ---------------------------------------------------------------------------------------------------
# slow: the script for real


@pytest.mark.slow
def test_uninterrupted_run_answers_every_question(dataset, reference):
    content, log = reference
    rows = [json.loads(line) for line in content.splitlines()]
    assert [r["question_id"] for r in rows] == [qid(i) for i in range(N_QUESTIONS)]  # each once, in order
    errors = {}
    for i, (q, r) in enumerate(zip(dataset.rows, rows, strict=True)):
        assert set(r) - {"error"} == ANSWER_FIELDS
        assert r["prompt"] == q["text"] and r["model_id"] == MODEL_ID
        assert r["answer_id"] == ev.answer_id(MODEL_ID, ev.Question(q["question_id"], q["text"]))
        if "error" in r:
            errors[i] = r["error"]
            assert r["text"] == "" and r["metadata"] == {}
        else:
            assert r["metadata"]["stop_reason"] in ("length", "eos") and 1 <= r["metadata"]["n_tokens"] <= 5, r
            assert r["text"].strip(), r
    assert sorted(errors) == sorted([*MISSING, UNREADABLE, TRUNCATED, TOO_LONG])
    for i in MISSING:
        assert errors[i].startswith("image not found: ") and f"nowhere{i}.png" in errors[i]
    assert errors[UNREADABLE].startswith("cannot read image ") and "garbage.png" in errors[UNREADABLE]
    assert errors[TRUNCATED].startswith("cannot read image ") and "cut.png" in errors[TRUNCATED]
    assert errors[TOO_LONG].startswith("prompt is ") and f"context is {CTX}" in errors[TOO_LONG]
    assert all("\n" not in e for e in errors.values())
    assert len({r["answer_id"] for r in rows}) == N_QUESTIONS
    assert len({r["text"] for r in rows if "error" not in r}) > 5  # not one answer copied everywhere
    s = summary_of(log)
    assert (s["items"], s["errors"], s["images"], s["skipped_already_answered"]) == (N_QUESTIONS, 5, 8, 0)
    assert s["generated_tokens"] == sum(r["metadata"].get("n_tokens", 0) for r in rows)
    assert s["tokens_per_s"] > 0 and s["images_per_s"] > 0 and s["items_per_s"] > 0


@pytest.mark.slow
def test_killed_and_restarted_run_equals_uninterrupted(dataset, reference):
    answers = dataset.root / "killed.jsonl"
    log = dataset.root / "killed.log"
    proc = start(dataset, answers, log=log)  # with the progress bar
    deadline = time.monotonic() + 900
    try:
        # kill inside the second batch: the first batch (questions 0-7) written, and the error row of
        # question 11, written as soon as it is found, before the batch it would have joined is generated
        while True:
            n = answers.read_bytes().count(b"\n") if answers.exists() else 0
            if n > 8 or proc.poll() is not None or time.monotonic() > deadline:
                break
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, log.read_text()[-2000:]
    partial = answers.read_text()
    complete = [json.loads(line) for line in partial.splitlines(keepends=True) if line.endswith("\n")]
    assert len({str(r["question_id"]) for r in complete}) == len(complete)
    assert [r["question_id"] for r in complete][:9] == [*map(qid, range(8)), MISSING[0]], partial
    assert len(complete) == 9  # mid-job, mid-batch
    with open(answers, "a") as f:  # and a line torn by the kill, as a write cut short would leave
        f.write('{"question_id": 49, "prompt": "Name a plan')

    log2 = dataset.root / "resumed.log"
    out = finish(start(dataset, answers, "--no-progress", log=log2), log2)
    assert answers.read_text() == reference[0]
    s = summary_of(out)
    assert s["skipped_already_answered"] == len(complete) and s["items"] == N_QUESTIONS - len(complete)

    # a third run over the finished file answers nothing and leaves it as it is
    log3 = dataset.root / "again.log"
    s = summary_of(finish(start(dataset, answers, "--no-progress", log=log3), log3))
    assert (s["items"], s["skipped_already_answered"]) == (0, N_QUESTIONS)
    assert answers.read_text() == reference[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_equal_one(dataset, reference):
    answers = dataset.root / "two.jsonl"
    coordinator = f"127.0.0.1:{free_port()}"
    logs = [dataset.root / f"two-{p}.log" for p in range(2)]
    procs = [start(dataset, answers, "--no-progress", "--num-processes", "2", "--process-id", str(p),
                   "--coordinator", coordinator, log=logs[p]) for p in range(2)]
    try:
        outs = [finish(proc, log) for proc, log in zip(procs, logs, strict=True)]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    assert answers.read_text() == reference[0]
    assert not list(dataset.root.glob("two.jsonl.part-*"))  # merged, then removed
    items = [summary_of(o)["items"] for o in outs]
    assert sum(items) == N_QUESTIONS and min(items) == N_QUESTIONS // 2  # each process answered its half
    assert summary_of(outs[0])["merged_rows"] == N_QUESTIONS


@pytest.mark.slow
def test_mesh_2x4_on_8_devices_equals_one_device(dataset, reference):
    answers = dataset.root / "mesh.jsonl"
    log = dataset.root / "mesh.log"
    env = environment(dataset, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    finish(start(dataset, answers, "--no-progress", "--mesh", "2x4", log=log, env=env), log)
    assert answers.read_text() == reference[0]


# ---------------------------------------------------------------------------------------------------
# fast: the bookkeeping, with a fake model


class FakeLlava:
    """Enough of `Llava` for answer_questions: prompt lengths from the text, answers echo the prompt."""

    n_ctx = 64
    metadata = {"tokenizer.chat_template": "{{ '<|im_start|>' }}"}  # → chatml

    def __init__(self):
        self.batches = []

    def prompt_length(self, prompt, images=(), template=None):
        return len(prompt.split()) + 10 * len(images)

    def generate_batch(self, prompts, images, **kw):
        self.batches.append((list(prompts), [len(x) for x in images], kw))
        return [SimpleNamespace(text=f"A:{p[-30:]}", token_ids=[1] * (1 + len(imgs)), stop_reason="length")
                for p, imgs in zip(prompts, images, strict=True)]


def test_answer_questions_pads_batches_and_reports_bad_rows(tmp_path):
    drawing(30, 20, seed=0).save(tmp_path / "ok.png")
    qs = [ev.Question(0, "first"), ev.Question(1, "look", "ok.png"), ev.Question(2, "lost", "missing.png"),
          ev.Question(3, "word " * 80), ev.Question(4, "fifth"), ev.Question("x", "<image> marker without image")]
    llm, ticks = FakeLlava(), []
    writer = ev.AnswerWriter(tmp_path / "a.jsonl")
    s = ev.answer_questions(llm, qs, tmp_path, writer, "m", 4, {"max_new_tokens": 3, "template": None},
                            progress=ticks.append)
    writer.close()
    rows = {str(r["question_id"]): r for r in map(json.loads, (tmp_path / "a.jsonl").read_text().splitlines())}
    assert set(rows) == {"0", "1", "2", "3", "4", "x"}
    assert "image not found" in rows["2"]["error"] and "context is 64" in rows["3"]["error"]
    assert "image marker" in rows["x"]["error"]
    assert (s.items, s.errors, s.images, sum(ticks)) == (6, 3, 1, 6)
    # error rows leave no holes: the three good rows make one batch, padded to 4 with a copy of the
    # cheapest row (no image, shortest text), which gets one new token
    assert len(llm.batches) == 1
    prompts, n_images, kw = llm.batches[0]
    chatml = "<|im_start|>system\nAnswer the questions.<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
    assert prompts == [chatml.format("first"), "look", chatml.format("fifth"), chatml.format("first")]
    assert n_images == [0, 1, 0, 0] and kw["max_new_tokens"] == [3, 3, 3, 1] and kw["template"] == "chatml"
    assert s.generated_tokens == 1 + 2 + 1  # padding rows not counted
    with pytest.raises(LlavaError, match="unknown chat template"):
        ev.answer_questions(llm, qs, tmp_path, writer, "m", 4, {"template": "nope"})


def test_a_failing_batch_is_retried_row_by_row(tmp_path):
    class Picky(FakeLlava):
        def generate_batch(self, prompts, images, **kw):
            if any("poison" in p for p in prompts):
                raise LlavaError("cannot tile this image")
            return super().generate_batch(prompts, images, **kw)

    qs = [ev.Question(i, "poison" if i == 2 else f"q{i}") for i in range(5)]
    writer = ev.AnswerWriter(tmp_path / "a.jsonl")
    s = ev.answer_questions(Picky(), qs, tmp_path, writer, "m", 4, {"template": "raw"})
    writer.close()
    rows = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert sorted(r["question_id"] for r in rows) == [0, 1, 2, 3, 4]
    assert [r["question_id"] for r in rows if "error" in r] == [2] and (s.items, s.errors) == (5, 1)


def test_questions_file_errors(tmp_path):
    with pytest.raises(LlavaError, match="questions file not found"):
        ev.read_questions(tmp_path / "none.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question_id": 1, "text": "a"}\n{"question_id": 2}\n')
    with pytest.raises(LlavaError, match=r"bad.jsonl:2: not a question line"):
        ev.read_questions(bad)
    # LLaVA's TextVQA file repeats ids (the image id): every line is a question (this was an error)
    bad.write_text('{"question_id": 1, "text": "a"}\n\n{"question_id": 1, "text": "b"}\n{"question_id": 1, "text": "a"}\n')
    assert [(q.question_id, q.text, q.record) for q in ev.read_questions(bad)] == [(1, "a", 0), (1, "b", 1), (1, "a", 2)]


def test_torn_lines_parts_and_final_order(tmp_path):
    answers = tmp_path / "a.jsonl"
    qs = [ev.Question(i, f"t{i}") for i in (0, 1, 3, 4, 5)]
    row = lambda i: {"question_id": i, "prompt": f"t{i}", "text": f"r{i}"}  # noqa: E731
    answers.write_text(json.dumps(row(3)) + "\n" + json.dumps(row(99)) + "\n" + '{"question_id": 4, "te')
    w = ev.AnswerWriter(answers)  # drops the torn tail, appends on a fresh line
    w.write(row(1))
    w.close()
    assert [r["question_id"] for r in map(json.loads, answers.read_text().splitlines())] == [3, 99, 1]
    ev.part_path(answers, 0).write_text(json.dumps(row(0)) + "\n" + json.dumps(row(4)) + "\n")
    ev.part_path(answers, 3).write_text(json.dumps(row(5)) + "\n" + json.dumps(row(1) | {"text": "dup"}) + "\n{")
    assert ev.existing_parts(answers) == [ev.part_path(answers, 0), ev.part_path(answers, 3)]
    assert {r["question_id"] for r in ev.read_answered([answers, *ev.existing_parts(answers)])} == {0, 1, 3, 4, 5, 99}
    n = ev.merge_parts(answers, qs, 1)  # parts of an earlier run with more processes are merged too
    rows = [json.loads(line) for line in answers.read_text().splitlines()]
    assert n == 6 and [r["question_id"] for r in rows] == [0, 1, 3, 4, 5, 99]  # question order, foreign id kept
    assert rows[1]["text"] == "r1"  # the first answer of a question wins
    assert not ev.existing_parts(answers) and not (tmp_path / "a.jsonl.merging").exists()


def test_a_last_line_without_newline_is_not_an_answer(tmp_path):
    """A kill between a row's JSON and its newline: read_answered must not count it (it used to, and the
    tail repair then deleted it, so its question was never answered)."""
    answers = tmp_path / "a.jsonl"
    answers.write_text('{"question_id": 1, "prompt": "t1", "text": "r1"}\n{"question_id": 2, "prompt": "t2", "text": "r2"}')
    assert [r["question_id"] for r in ev.read_answered([answers])] == [1]
    ev.repair_tail(answers)
    assert answers.read_text().count("\n") == 1 and ev.read_answered([answers])[0]["question_id"] == 1


def test_retried_error_rows_give_way_to_their_answer(tmp_path):
    answers = tmp_path / "a.jsonl"
    qs = [ev.Question(1, "t1"), ev.Question(2, "t2")]
    rows = [{"question_id": 1, "prompt": "t1", "text": "", "error": "image not found: x"},
            {"question_id": 2, "prompt": "t2", "text": "two"}, {"question_id": 1, "prompt": "t1", "text": "one"}]
    answers.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert ev.pending(qs, rows[:2]) == [False, False] and ev.pending(qs, rows[:2], retry_errors=True) == [True, False]
    assert ev.finalize_answers(answers, qs) == 2
    assert [r["text"] for r in map(json.loads, answers.read_text().splitlines())] == ["one", "two"]
