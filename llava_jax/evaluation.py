"""Batch evaluation in LLaVA's question / answer formats, resumable and multi-host.

Questions: JSONL lines `{"question_id", "image", "text", "category"?}` (images under an image folder).
Answers:   JSONL lines `{"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}` — what
LLaVA's scoring scripts read — plus `"error"` for a row that could not be answered.

Each finished answer is appended and flushed at once; a restarted job skips the question ids already
answered, so an interrupted run (Ctrl-C, kill -9) resumes with nothing lost or duplicated. With
`jax.distributed`, process p of P answers every P-th unanswered question into `ANSWERS.part-p`;
after a barrier process 0 merges the parts into ANSWERS. At the end of every run the answers file is
rewritten in question order (`finalize_answers`), so an interrupted-and-resumed job, a one-process job
and a multi-process job leave byte-identical files.

Every question is wrapped in the chat template (`--conv-mode`), text-only ones included, as LLaVA's
`model_vqa*` scripts do; `--conv-mode raw` sends the text as is.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Sequence
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


def existing_parts(answers: Path) -> list[Path]:
    """Every `ANSWERS.part-N` file next to ANSWERS (of this run or of an interrupted one with another -np)."""
    if not answers.parent.exists():
        return []
    parts = [p for p in answers.parent.glob(f"{answers.name}.part-*") if p.name.rsplit("-", 1)[-1].isdigit()]
    return sorted(parts, key=lambda p: int(p.name.rsplit("-", 1)[-1]))


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


def finalize_answers(answers: Path, questions: Sequence[Question], parts: Sequence[Path] = ()) -> int:
    """Answers file + part files → the answers file, one row per question id, in question order.

    Rows for question ids not in `questions` (an answers file shared with another question set) are
    kept, after the others, in their file order. The file is replaced atomically, then the parts are
    deleted. Returns the number of rows written.
    """
    done = read_answered([answers, *parts])
    order = [str(q.question_id) for q in questions]
    known = set(order)
    keys = [k for k in order if k in done] + [k for k in done if k not in known]
    tmp = answers.with_name(answers.name + ".merging")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("".join(json.dumps(done[k], ensure_ascii=False) + "\n" for k in keys))
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(answers)
    for part in parts:
        part.unlink(missing_ok=True)
    return len(keys)


def merge_parts(answers: Path, questions: Sequence[Question], n_processes: int) -> int:
    """Process 0, after the barrier: answers file + every part file → the answers file in question order."""
    parts = sorted(set(existing_parts(answers)) | {part_path(answers, p) for p in range(n_processes)})
    return finalize_answers(answers, questions, parts)


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


def answer_questions(llm, questions: Sequence[Question], image_folder: str | os.PathLike | None, writer: AnswerWriter,
                     model_id: str, batch_size: int, generation: dict, progress=None) -> Summary:
    """Answer `questions` in batches; every row (or its error) is written as soon as it is known.

    Rows whose image is missing / unreadable or whose prompt does not fit the context are written at once
    with an `error` field and the job goes on; the next good rows fill their places, so every batch but
    the last is full. The last is padded to `batch_size` with copies of its cheapest row (one new token
    each, results dropped), so a job compiles one batch size. Should a whole batch still fail with a
    LlavaError, its rows are retried one at a time so only the bad one becomes an error row.
    """
    from llava_jax.images import load_image
    from llava_jax.prompts import TEMPLATES, build_prompt, template_from_metadata

    if batch_size < 1:
        raise LlavaError(f"batch size must be >= 1, got {batch_size}")
    template = generation.get("template") or template_from_metadata(llm.metadata)
    if template not in TEMPLATES:
        raise LlavaError(f"unknown chat template {template!r}; choose one of: {', '.join(TEMPLATES)}")
    generation = {**generation, "template": template}
    summary = Summary()
    t0 = time.perf_counter()
    folder = Path(image_folder) if image_folder is not None else Path(".")

    def error_row(q: Question, e: LlavaError) -> None:
        writer.write(_answer_row(q, model_id, "", {}, error=str(e)))
        summary.errors += 1
        summary.items += 1
        if progress:
            progress(1)

    def run(rows: list[tuple[Question, str, list]]) -> None:
        try:
            results = _generate_padded(llm, rows, batch_size, generation)
        except LlavaError as e:
            if len(rows) == 1:
                error_row(rows[0][0], e)
                return
            for row in rows:
                run([row])
            return
        for (q, _, imgs), res in zip(rows, results, strict=False):
            writer.write(_answer_row(q, model_id, res.text, {"stop_reason": res.stop_reason,
                                                             "n_tokens": len(res.token_ids)}))
            summary.items += 1
            summary.images += len(imgs)
            summary.generated_tokens += len(res.token_ids)
        if progress:
            progress(len(rows))

    ready: list[tuple[Question, str, list]] = []
    for q in questions:
        try:
            imgs = [load_image(folder / q.image)] if q.image else []
            # text-only questions get the chat template too (the model code only templates image prompts)
            text = q.text if imgs else "".join(build_prompt(q.text, 0, template))
            n = llm.prompt_length(text, imgs, template)
            if n >= llm.n_ctx:
                raise LlavaError(f"prompt is {n} tokens (images included), context is {llm.n_ctx}: use a larger -c")
        except LlavaError as e:
            error_row(q, e)
            continue
        ready.append((q, text, imgs))
        if len(ready) == batch_size:
            run(ready)
            ready = []
    if ready:
        run(ready)
    summary.seconds = time.perf_counter() - t0
    return summary


def _generate_padded(llm, rows: list[tuple[Question, str, list]], batch_size: int, generation: dict) -> list:
    """generate_batch over `rows` padded to batch_size with copies of the cheapest row (fewest images, then
    shortest text), which get one new token each."""
    pad = batch_size - len(rows)
    cheap = min(rows, key=lambda r: (len(r[2]), len(r[1])))
    rows = list(rows) + [cheap] * pad
    limit = generation.get("max_new_tokens", 128)
    return llm.generate_batch([r[1] for r in rows], [r[2] for r in rows],
                              **{**generation, "max_new_tokens": [limit] * (batch_size - pad) + [1] * pad})


def _answer_row(q: Question, model_id: str, text: str, metadata: dict, error: str | None = None) -> dict:
    row = {"question_id": q.question_id, "prompt": q.text, "text": text, "answer_id": answer_id(model_id, q.question_id),
           "model_id": model_id, "metadata": metadata}
    if error is not None:
        row["error"] = error
    return row
