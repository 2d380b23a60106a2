"""Batch evaluation in LLaVA's question / answer formats, resumable and multi-host.

Questions: JSONL lines `{"question_id", "image", "text", "category"?}` (images under an image folder).
Answers:   JSONL lines `{"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}` — what
LLaVA's scoring scripts read — plus `"error"` for a row that could not be answered.

Each finished answer is appended and flushed at once; a restarted job skips the question ids already
answered, so an interrupted run (Ctrl-C, kill -9) resumes with nothing lost or duplicated. With
`jax.distributed`, process p of P answers every P-th unanswered question into `ANSWERS.part-p`;
after a barrier process 0 merges the parts into ANSWERS in question order.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from llava_jax.errors import LlavaError

ANSWER_NAMESPACE = uuid.UUID("6f1c9a52-4d0e-4c59-9a1e-2b8f0c6d7e31")


@dataclass(frozen=True)
class Question:
    question_id: str | int
    text: str
    image: str | None = None
    category: str | None = None


def read_questions(path: str | os.PathLike) -> list[Question]:
    """LLaVA question JSONL → questions (one-line LlavaError on a missing file or a bad line)."""
    path = Path(path)
    if not path.exists():
        raise LlavaError(f"questions file not found: {path}")
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            out.append(Question(row["question_id"], row["text"], row.get("image"), row.get("category")))
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise LlavaError(f"{path}:{n}: not a question line ({type(e).__name__}: {e})") from None
    ids = [q.question_id for q in out]
    if len(set(map(str, ids))) != len(ids):
        raise LlavaError(f"{path}: duplicate question_id values")
    return out


def answer_id(model_id: str, question_id) -> str:
    """Deterministic per (model, question), so a resumed run writes the same file as an uninterrupted one."""
    return uuid.uuid5(ANSWER_NAMESPACE, f"{model_id}\x00{question_id}").hex[:22]


def read_answered(paths: Sequence[Path]) -> dict[str, dict]:
    """question_id (as str) → answer row, from every answers / part file that exists (a torn last line is ignored)."""
    done: dict[str, dict] = {}
    for path in paths:
        if not path.exists():
            continue
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by kill -9: that question is answered again
            done.setdefault(str(row["question_id"]), row)
    return done


def part_path(answers: Path, process_id: int) -> Path:
    return answers.with_name(f"{answers.name}.part-{process_id}")


class AnswerWriter:
    """Appends one JSON line per answer and flushes it (fsync) before the next."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._repair_tail(path)
        self.f = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()

    @staticmethod
    def _repair_tail(path: Path) -> None:
        """Drop a torn last line (no newline) left by a killed run, so appends start on a fresh line."""
        if not path.exists() or path.stat().st_size == 0:
            return
        data = path.read_bytes()
        if not data.endswith(b"\n"):
            path.write_bytes(data[: data.rfind(b"\n") + 1])

    def write(self, row: dict) -> None:
        self.f.write(json.dumps(row, ensure_ascii=False) + "\n")
        self.f.flush()
        os.fsync(self.f.fileno())

    def close(self) -> None:
        self.f.close()


def merge_parts(answers: Path, questions: Sequence[Question], n_processes: int) -> int:
    """Process 0, after the barrier: answers file + parts → answers file in question order. Returns rows."""
    files = [answers] + [part_path(answers, p) for p in range(n_processes)]
    done = read_answered(files)
    rows = [done[str(q.question_id)] for q in questions if str(q.question_id) in done]
    tmp = answers.with_name(answers.name + ".merging")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(answers)
    for p in range(n_processes):
        part_path(answers, p).unlink(missing_ok=True)
    return len(rows)


@dataclass
class Summary:
    items: int = 0
    errors: int = 0
    images: int = 0
    generated_tokens: int = 0
    seconds: float = 0.0
    skipped: int = 0
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        s = max(self.seconds, 1e-9)
        return {"items": self.items, "errors": self.errors, "skipped_already_answered": self.skipped,
                "images": self.images, "generated_tokens": self.generated_tokens, "seconds": round(self.seconds, 3),
                "items_per_s": self.items / s, "images_per_s": self.images / s,
                "tokens_per_s": self.generated_tokens / s, **self.extra}


def batches(items: Sequence, size: int) -> Iterator[list]:
    for i in range(0, len(items), size):
        yield list(items[i:i + size])


def answer_questions(llm, questions: Sequence[Question], image_folder: str | os.PathLike | None, writer: AnswerWriter,
                     model_id: str, batch_size: int, generation: dict, progress=None) -> Summary:
    """Answer `questions` in batches; every row (or its error) is written as soon as its batch finishes.

    Rows whose image is missing / unreadable or whose prompt does not fit the context are written with an
    `error` field and the job goes on. The last batch is padded (with copies of its last row, results
    dropped) to `batch_size`, so a job compiles one batch shape.
    """
    from llava_jax.images import load_image

    summary = Summary()
    t0 = time.perf_counter()
    folder = Path(image_folder) if image_folder is not None else Path(".")
    for batch in batches(list(questions), batch_size):
        ready, prompts, images = [], [], []
        for q in batch:
            try:
                imgs = [load_image(folder / q.image)] if q.image else []
                n = llm.prompt_length(q.text, imgs, generation.get("template"))
                if n >= llm.n_ctx:
                    raise LlavaError(f"prompt is {n} tokens (images included), context is {llm.n_ctx}: use a larger -c")
            except LlavaError as e:
                writer.write(_answer_row(q, model_id, "", {}, error=str(e)))
                summary.errors += 1
                summary.items += 1
                if progress:
                    progress(1)
                continue
            ready.append(q)
            prompts.append(q.text)
            images.append(imgs)
        if not ready:
            continue
        pad = batch_size - len(ready)
        results = llm.generate_batch(prompts + prompts[-1:] * pad, images + images[-1:] * pad, **generation)
        for q, imgs, res in zip(ready, images, results, strict=False):
            writer.write(_answer_row(q, model_id, res.text, {"stop_reason": res.stop_reason,
                                                             "n_tokens": len(res.token_ids)}))
            summary.items += 1
            summary.images += len(imgs)
            summary.generated_tokens += len(res.token_ids)
        if progress:
            progress(len(ready))
    summary.seconds = time.perf_counter() - t0
    return summary


def _answer_row(q: Question, model_id: str, text: str, metadata: dict, error: str | None = None) -> dict:
    row = {"question_id": q.question_id, "prompt": q.text, "text": text, "answer_id": answer_id(model_id, q.question_id),
           "model_id": model_id, "metadata": metadata}
    if error is not None:
        row["error"] = error
    return row
