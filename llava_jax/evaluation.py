"""Batch evaluation in LLaVA's question / answer formats, resumable, chunked and multi-host.

Question files (the format is told from the content):
- JSONL (`model_vqa_loader.py`: POPE, TextVQA, VizWiz, GQA, ...): lines `{"question_id", "image", "text",
  "category"?}`, images under an image folder. Ids may repeat (TextVQA uses the image id).
- A JSON list (`model_vqa_science.py`, `llava_test_CQM-A.json`): `{"id", "image"?, "conversations"}`; the
  question is `conversations[0].value` without `<image>`.
- A TSV (`model_vqa_mmbench.py`): columns `index`, `question`, `hint`, `A`..`D`, base64 `image`; with
  `all_rounds` one question per option, the options rotated.
Answers: JSONL lines as those scripts write them (`question_id`, `prompt`, `text`, `answer_id`, `model_id`,
`metadata`, plus `round_id`, `options`, `option_char` for MMBench) — plus `"error"` for a row that could
not be answered.

Answers are keyed by question-file line: a row belongs to the line with its `question_id`, `prompt`
(and `round_id`), the k-th such row to the k-th such line. Each finished answer is appended and flushed at
once; a restarted job skips the lines already answered (error rows too, unless `retry_errors`), so an
interrupted run (Ctrl-C, kill -9) resumes with nothing lost or duplicated. `select` takes LLaVA's
`--num-chunks / --chunk-idx` chunk; with `jax.distributed`, process p of P answers every P-th line of it
into `ANSWERS.part-p` and process 0 merges the parts. At the end of every run the answers file is
rewritten in question-line order (`finalize_answers`), so an interrupted-and-resumed job, a one-process
job, a multi-process job and concatenated chunks leave the same bytes.

Every question is wrapped in the chat template (`--conv-mode`), text-only ones included, as LLaVA's
`model_vqa*` scripts do; `--conv-mode raw` sends the text as is.
"""

from __future__ import annotations

import base64
import binascii
import csv
import io
import json
import math
import os
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from llava_jax.errors import LlavaError

ANSWER_NAMESPACE = uuid.UUID("6f1c9a52-4d0e-4c59-9a1e-2b8f0c6d7e31")
SINGLE_PRED_PROMPT = {"en": "Answer with the option's letter from the given choices directly.",
                      "cn": "请直接回答选项字母。"}
OPTION_LETTERS = ("A", "B", "C", "D")
# cells pandas.read_table reads as NaN (its default na_values), which LLaVA's is_none treats as missing
PANDAS_NA = frozenset({"", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN",
                       "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null"})


@dataclass(frozen=True)
class Question:
    """One question to answer. `text` is what the model is asked (before the chat template); `prompt` is
    the answer row's "prompt" (default: `text`); `record` is the question-file line / row it came from."""

    question_id: str | int
    text: str
    image: str | None = None
    category: str | None = None
    prompt: str | None = None
    image_b64: str | None = field(default=None, repr=False)
    record: int = 0
    extra: tuple = ()  # more answer fields, (name, value) pairs: MMBench's round_id, options, option_char

    @property
    def answer_prompt(self) -> str:
        return self.text if self.prompt is None else self.prompt

    @property
    def has_image(self) -> bool:
        return self.image is not None or self.image_b64 is not None

    def key(self) -> tuple:
        """What an answer row of this question is recognized by."""
        return str(self.question_id), self.answer_prompt, dict(self.extra).get("round_id")


def row_key(row: dict) -> tuple:
    """`Question.key` of the question an answer row answers."""
    return str(row.get("question_id")), row.get("prompt"), row.get("round_id")


# ---------------------------------------------------------------------------------------------------
# question files


def read_questions(path: str | os.PathLike, single_pred_prompt: bool = False, all_rounds: bool = False,
                   lang: str = "en") -> list[Question]:
    """A LLaVA question file (JSONL, ScienceQA JSON list or MMBench TSV, told by content) → questions.

    One-line LlavaError on a missing file, a bad line, or an option that does not apply to the format.
    """
    path = Path(path)
    if not path.is_file():
        raise LlavaError(f"questions file not found: {path}")
    text = path.read_text(encoding="utf-8-sig")
    head = text.lstrip()
    first_line = head.split("\n", 1)[0]
    if head.startswith("["):
        kind, questions = "ScienceQA", _science_questions(path, text, single_pred_prompt)
    elif "\t" in first_line and not first_line.startswith("{"):
        kind, questions = "MMBench", _mmbench_questions(path, text, all_rounds, single_pred_prompt, lang)
    else:
        kind, questions = "JSONL", _jsonl_questions(path, text)
    if single_pred_prompt and kind == "JSONL":
        raise LlavaError(f"{path}: --single-pred-prompt applies to ScienceQA (JSON list) and MMBench (TSV) files")
    if all_rounds and kind != "MMBench":
        raise LlavaError(f"{path}: --all-rounds applies to MMBench (TSV) files")
    return questions


def _jsonl_questions(path: Path, text: str) -> list[Question]:
    """`model_vqa_loader.py` lines: every non-empty line is a question (ids may repeat)."""
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            image = row.get("image")
            if not isinstance(row["text"], str) or not (image is None or isinstance(image, str)):
                raise TypeError("text and image must be strings")
            out.append(Question(row["question_id"], row["text"], image, row.get("category"), record=len(out)))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise LlavaError(f"{path}:{n}: not a question line ({type(e).__name__}: {e})") from None
    return out


def _science_questions(path: Path, text: str, single_pred_prompt: bool) -> list[Question]:
    """`model_vqa_science.py` items: the question without `<image>`; "prompt" gets "<image>\\n" when there is one."""
    try:
        items = json.loads(text)
    except json.JSONDecodeError as e:
        raise LlavaError(f"{path}: not valid JSON ({e})") from None
    out = []
    for n, item in enumerate(items):
        try:
            question = item["conversations"][0]["value"].replace("<image>", "").strip()
            image = item.get("image") if "image" in item else None
            if "image" in item and not isinstance(image, str):
                raise TypeError("image must be a string")
            if single_pred_prompt:
                question += "\n" + SINGLE_PRED_PROMPT["en"]
            prompt = "<image>\n" + question if image is not None else question
            out.append(Question(item["id"], question, image, prompt=prompt, record=n))
        except (KeyError, IndexError, TypeError, AttributeError) as e:
            raise LlavaError(f"{path}: item {n}: not a ScienceQA question ({type(e).__name__}: {e})") from None
    return out


def _is_none(value: str | None) -> bool:
    """A TSV cell LLaVA's mmbench script sees as missing (NaN after pandas, or "nan" / "none")."""
    return value is None or value in PANDAS_NA or value.lower() in ("nan", "none")


def _mmbench_questions(path: Path, text: str, all_rounds: bool, single_pred_prompt: bool,
                       lang: str) -> list[Question]:
    """`model_vqa_mmbench.py` rows: hint + question + lettered options; one question per round."""
    csv.field_size_limit(sys.maxsize)  # base64 images are long cells
    rows = [r for r in csv.reader(io.StringIO(text), delimiter="\t") if any(r)]
    header = rows[0]
    missing = [c for c in ("index", "question", "image") if c not in header]
    if missing:
        raise LlavaError(f"{path}: not an MMBench TSV (no {', '.join(missing)} column)")
    suffix = "\n" + SINGLE_PRED_PROMPT.get(lang, SINGLE_PRED_PROMPT["en"]) if single_pred_prompt else ""
    out = []
    for n, cells in enumerate(rows[1:]):
        if len(cells) != len(header):
            raise LlavaError(f"{path}: row {n + 1}: {len(cells)} fields, the header has {len(header)}")
        row = dict(zip(header, cells, strict=True))
        options = []
        for letter in OPTION_LETTERS:
            if _is_none(row.get(letter)):
                break
            options.append(row[letter])
        question = row["question"] if _is_none(row.get("hint")) else row["hint"] + "\n" + row["question"]
        index = int(row["index"]) if row["index"].lstrip("-").isdigit() else row["index"]
        letters = list(OPTION_LETTERS[:len(options)])
        for r in range(len(options) if all_rounds else 1):
            opts, chars = options[r:] + options[:r], letters[r:] + letters[:r]
            built = question + "".join(f"\n{c}. {o}" for c, o in zip(OPTION_LETTERS, opts, strict=False))
            out.append(Question(index, built + suffix, None, row.get("category"), prompt=built,
                                image_b64=row["image"], record=n,
                                extra=(("round_id", r), ("options", opts), ("option_char", chars))))
    return out


def get_chunk(items: Sequence, n: int, k: int) -> list:
    """LLaVA's `get_chunk`: chunks of ceil(len / n) items, chunk k of them ([] past the last one)."""
    if n < 1 or not 0 <= k < n:
        raise LlavaError(f"--chunk-idx must be in [0, --num-chunks), got {k} of {n}")
    size = math.ceil(len(items) / n)
    chunks = [list(items[i:i + size]) for i in range(0, len(items), size)] if size else []
    return chunks[k] if k < len(chunks) else []


def select(questions: Sequence[Question], limit: int | None = None, num_chunks: int = 1,
           chunk_idx: int = 0) -> list[Question]:
    """The questions of the first `limit` question-file records, then of chunk `chunk_idx` of those."""
    records = list(dict.fromkeys(q.record for q in questions))
    if limit is not None:
        if limit < 0:
            raise LlavaError(f"--limit must be >= 0, got {limit}")
        records = records[:limit]
    chosen = set(get_chunk(records, num_chunks, chunk_idx))
    return [q for q in questions if q.record in chosen]


def check_images(questions: Sequence[Question], image_folder: str | os.PathLike | None) -> list[str]:
    """The image folder must exist when a question names an image file; returns the missing image paths
    (they become error rows)."""
    named = [q.image for q in questions if q.image is not None]
    if not named:
        return []
    folder = Path(image_folder) if image_folder is not None else Path(".")
    if not folder.is_dir():
        raise LlavaError(f"image folder not found: {folder}")
    return [str(folder / name) for name in dict.fromkeys(named) if not (folder / name).exists()]


def resolve_template(name: str | None) -> str | None:
    """A `--conv-mode` name (ours or LLaVA's) → the template name; None stays None (the model's own)."""
    from llava_jax.prompts import CONV_MODE_ALIASES, TEMPLATES

    if name is None or name in TEMPLATES:
        return name
    if name in CONV_MODE_ALIASES:
        return CONV_MODE_ALIASES[name]
    raise LlavaError(f"unknown chat template / --conv-mode {name!r}; choose one of: "
                     f"{', '.join(TEMPLATES)} (or LLaVA's {', '.join(CONV_MODE_ALIASES)})")


# ---------------------------------------------------------------------------------------------------
# answer files


def answer_id(model_id: str, q: Question) -> str:
    """Deterministic per (model, question line content), so a resumed run writes the same file as an
    uninterrupted one."""
    qid, prompt, round_id = q.key()
    return uuid.uuid5(ANSWER_NAMESPACE, f"{model_id}\x00{qid}\x00{prompt}\x00{round_id}").hex[:22]


def read_answered(paths: Sequence[Path]) -> list[dict]:
    """Every answer row, in file order, of the answers / part files that exist. Only lines ending in a
    newline count: a last line without one (torn by kill -9, or still being written) is answered again."""
    rows: list[dict] = []
    for path in paths:
        if not path.exists():
            continue
        for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
            if not line.endswith("\n"):
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by kill -9 and appended to: that question is answered again
            if isinstance(row, dict):
                rows.append(row)
    return rows


def assign(questions: Sequence[Question], rows: Sequence[dict]) -> tuple[list[dict | None], list[dict]]:
    """Answer rows → the row of each question (None: unanswered) and the rows of no question.

    The k-th row with a question's key goes to the k-th line with that key; answers come before error
    rows (the first answer wins, else the last error), so a retried error row gives way to its answer.
    Rows of no question (an answers file shared with another question set) are kept, one per key.
    """
    lines: dict[tuple, list[int]] = {}
    for i, q in enumerate(questions):
        lines.setdefault(q.key(), []).append(i)
    grouped: dict[tuple, list[dict]] = {}
    foreign: dict[tuple, dict] = {}
    for row in rows:
        k = row_key(row)
        if k in lines:
            grouped.setdefault(k, []).append(row)
        else:
            foreign.setdefault(k, row)
    out: list[dict | None] = [None] * len(questions)
    for k, group in grouped.items():
        ranked = [r for r in group if "error" not in r] + [r for r in reversed(group) if "error" in r]
        for i, row in zip(lines[k], ranked, strict=False):
            out[i] = row
    return out, list(foreign.values())


def pending(questions: Sequence[Question], rows: Sequence[dict], retry_errors: bool = False) -> list[bool]:
    """Per question: does it still need an answer (no row; or an error row, with `retry_errors`)?"""
    done, _ = assign(questions, rows)
    return [r is None or (retry_errors and "error" in r) for r in done]


def part_path(answers: Path, process_id: int) -> Path:
    return answers.with_name(f"{answers.name}.part-{process_id}")


def existing_parts(answers: Path) -> list[Path]:
    """Every `ANSWERS.part-N` file next to ANSWERS (of this run or of an interrupted one with another -np)."""
    if not answers.parent.exists():
        return []
    parts = [p for p in answers.parent.glob(f"{answers.name}.part-*") if p.name.rsplit("-", 1)[-1].isdigit()]
    return sorted(parts, key=lambda p: int(p.name.rsplit("-", 1)[-1]))


def repair_tail(path: Path) -> None:
    """Drop a torn last line (no newline) left by a killed run, so appends start on a fresh line."""
    if not path.exists() or path.stat().st_size == 0:
        return
    data = path.read_bytes()
    if not data.endswith(b"\n"):
        os.truncate(path, data.rfind(b"\n") + 1)  # in place: a peer reading the file never sees it empty


class AnswerWriter:
    """Appends one JSON line per answer and flushes it (fsync) before the next."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        repair_tail(path)
        self.f = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()

    def write(self, row: dict) -> None:
        self.f.write(json.dumps(row, ensure_ascii=False) + "\n")
        self.f.flush()
        os.fsync(self.f.fileno())

    def close(self) -> None:
        self.f.close()


def finalize_answers(answers: Path, questions: Sequence[Question], parts: Sequence[Path] = ()) -> int:
    """Answers file + part files → the answers file, one row per question line, in question order.

    Rows of no question are kept after the others. The file is replaced atomically, then the parts are
    deleted. Returns the number of rows written; LlavaError if a question has no row (the rows there
    are are kept: running the job again answers the rest).
    """
    done, foreign = assign(questions, read_answered([answers, *parts]))
    rows = [r for r in done if r is not None] + foreign
    tmp = answers.with_name(answers.name + ".merging")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(answers)
    for part in parts:
        if part != answers:
            part.unlink(missing_ok=True)
    missing = [i for i, r in enumerate(done) if r is None]
    if missing:
        q = questions[missing[0]]
        raise LlavaError(f"{answers}: {len(missing)} of {len(questions)} questions have no answer (the first: "
                         f"question_id {q.question_id!r}); run the same command again to answer them")
    return len(rows)


def merge_parts(answers: Path, questions: Sequence[Question], n_processes: int) -> int:
    """Process 0, after the barrier: answers file + every part file → the answers file in question order.
    Each process's part must be there (LlavaError otherwise, nothing merged)."""
    expected = [part_path(answers, p) for p in range(n_processes)]
    absent = [p.name for p in expected if not p.exists()]
    if absent:
        raise LlavaError(f"part file(s) missing: {', '.join(absent)} (did a process fail?); nothing merged")
    parts = sorted(set(existing_parts(answers)) | set(expected), key=lambda p: int(p.name.rsplit("-", 1)[-1]))
    return finalize_answers(answers, questions, parts)


# ---------------------------------------------------------------------------------------------------
# answering


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


def question_images(q: Question, folder: Path) -> list:
    """The question's image (from the folder, or decoded in memory from base64) as a list of 0 or 1."""
    from llava_jax.images import load_image

    if q.image is not None:
        return [load_image(folder / q.image)]
    if q.image_b64 is None:
        return []
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(base64.b64decode(q.image_b64, validate=False))) as img:
            img.load()
            return [img.convert("RGB")]
    except (binascii.Error, UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise LlavaError(f"cannot read the base64 image of question {q.question_id!r}: {reason}") from None


def answer_questions(llm, questions: Sequence[Question], image_folder: str | os.PathLike | None, writer: AnswerWriter,
                     model_id: str, batch_size: int, generation: dict, progress=None) -> Summary:
    """Answer `questions` in batches; every row (or its error) is written as soon as it is known.

    Rows whose image is missing / unreadable or whose prompt does not fit the context are written at once
    with an `error` field and the job goes on; the next good rows fill their places, so every batch but
    the last is full. The last is padded to `batch_size` with copies of its cheapest row (one new token
    each, results dropped), so a job compiles one batch size. Should a whole batch still fail with a
    LlavaError, its rows are retried one at a time so only the bad one becomes an error row.
    """
    from llava_jax.prompts import build_prompt, template_from_metadata

    if batch_size < 1:
        raise LlavaError(f"batch size must be >= 1, got {batch_size}")
    template = resolve_template(generation.get("template") or template_from_metadata(llm.metadata))
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
            writer.write(_answer_row(q, model_id, res.text.strip(), {"stop_reason": res.stop_reason,
                                                                     "n_tokens": len(res.token_ids)}))
            summary.items += 1
            summary.images += len(imgs)
            summary.generated_tokens += len(res.token_ids)
        if progress:
            progress(len(rows))

    ready: list[tuple[Question, str, list]] = []
    for q in questions:
        try:
            imgs = question_images(q, folder)
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
    """The answer row as LLaVA's script for the format writes it (MMBench: round_id after question_id,
    options and option_char after text; its and ScienceQA's metadata is {})."""
    extra = dict(q.extra)
    if extra or q.prompt is not None:
        metadata = {}
    row = {"question_id": q.question_id}
    if "round_id" in extra:
        row["round_id"] = extra.pop("round_id")
    row |= {"prompt": q.answer_prompt, "text": text, **extra, "answer_id": answer_id(model_id, q),
            "model_id": model_id, "metadata": metadata}
    if error is not None:
        row["error"] = error
    return row
