"""`scripts/batch_eval.py` on LLaVA's own eval files, with LLaVA's own flags (`scripts/v1_5/eval/*.sh`).

Slow tests (real SmolLM2 + a small random mmproj, `--conv-mode vicuna_v1`, subprocesses): POPE and TextVQA
JSONL (TextVQA repeats an image id as `question_id`), a `llava_test_CQM-A.json`-style ScienceQA list with
`--single-pred-prompt`, an MMBench-style TSV (base64 images, a hint, a row with three options) with
`--all-rounds`; the answer files are checked field by field against the rows LLaVA's `model_vqa_loader.py`
/ `model_vqa_science.py` / `model_vqa_mmbench.py` write (`expected_*` below spell those rules out).

Fast tests run `batch_eval.main` in this process on a fake model (`llava_jax.load` replaced): LLaVA's
`--num-chunks/--chunk-idx` chunks concatenated equal one run, `--retry-errors`, `--limit`, resume with a
torn tail, the merge's checks, and every check made before the model loads (the loader fails the test
if it is called).
"""

from __future__ import annotations

import base64
import importlib.util
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from tiny_mmproj import drawing, tiny_spec

import llava_jax
from llava_jax import evaluation as ev
from llava_jax.errors import LlavaError
from llava_jax.prompts import CONV_MODE_ALIASES, TEMPLATES, build_prompt
from llava_jax.random_mmproj import write_random_mmproj

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "batch_eval.py"
MODEL_ID = "llava-v1.5-7b"
LETTER = "Answer with the option's letter from the given choices directly."
LOADER_FIELDS = ["question_id", "prompt", "text", "answer_id", "model_id", "metadata"]
MMBENCH_FIELDS = ["question_id", "round_id", "prompt", "text", "options", "option_char", "answer_id", "model_id",
                  "metadata"]


def load_script():
    spec = importlib.util.spec_from_file_location("batch_eval", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


batch_eval = load_script()


# ---------------------------------------------------------------------------------------------------
# LLaVA-format files, and the answer rows LLaVA's scripts write for them


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def textvqa_rows() -> list[dict]:
    """llava_textvqa_val_v051_ocr.jsonl style: question_id is the image id; image 'a1' has two questions."""
    tail = "\nAnswer the question using a single word or phrase."
    return [
        {"question_id": "a1", "image": "a1.jpg", "text": "what is written here?\nReference OCR token: STOP" + tail,
         "category": "default"},
        {"question_id": "b2", "image": "b2.jpg", "text": "what colour is it?" + tail, "category": "default"},
        {"question_id": "a1", "image": "a1.jpg", "text": "what brand is it?" + tail, "category": "default"},
        {"question_id": "c3", "image": "c3.jpg", "text": "what number is shown?" + tail, "category": "default"},
        {"question_id": "b2", "image": "b2.jpg", "text": "what colour is it?" + tail, "category": "default"},
    ]


def pope_rows() -> list[dict]:
    return [{"question_id": i + 1, "image": f"COCO_val2014_{i:012d}.jpg", "text": f"Is there a {thing} in the image?",
             "category": "adversarial"} for i, thing in enumerate(["dog", "car", "cup"])]


def expected_loader(rows: list[dict]) -> list[dict]:
    """model_vqa_loader.py: one row per line, in line order; prompt is the line's text."""
    return [{"question_id": r["question_id"], "prompt": r["text"], "model_id": MODEL_ID} for r in rows]


def science_items() -> list[dict]:
    """llava_test_CQM-A.json style: image items carry "<image>\\n" in the human turn; one item has no image."""
    return [
        {"id": "4", "image": "4/image.png", "conversations": [
            {"from": "human", "value": "<image>\nContext: A map.\nQuestion: Which state is farthest north?\n"
                                       "Options: (A) Ohio (B) Texas"}, {"from": "gpt", "value": "A"}]},
        {"id": "7", "conversations": [
            {"from": "human", "value": "Context: N/A\nQuestion: Which word is a noun?\nOptions: (A) run (B) cat  "},
            {"from": "gpt", "value": "B"}]},
        {"id": "11", "image": "11/image.png", "conversations": [
            {"from": "human", "value": "Context: Look at the picture. <image>\nQuestion: What is it?\n"
                                       "Options: (A) a fish (B) a bird"}, {"from": "gpt", "value": "B"}]},
    ]


def expected_science(items: list[dict], single_pred: bool = True) -> list[dict]:
    """model_vqa_science.py: the question without <image>, stripped, the letter instruction appended;
    prompt = "<image>\\n" + that when the item has an image."""
    out = []
    for item in items:
        q = item["conversations"][0]["value"].replace("<image>", "").strip()
        if single_pred:
            q = q + "\n" + LETTER
        out.append({"question_id": item["id"], "prompt": ("<image>\n" + q) if "image" in item else q,
                    "model_id": MODEL_ID, "metadata": {}})
    return out


def b64_png(seed: int) -> str:
    buf = io.BytesIO()
    drawing(48, 40, seed=seed).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


MMBENCH_HEADER = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "l2-category", "image"]


def mmbench_rows() -> list[list[str]]:
    """MMBench dev TSV style: row 0 has a hint and four options, row 1 no hint and three (D empty)."""
    return [["101", "What is the main colour?", "The picture shows a toy.", "red", "blue", "green", "black", "A",
             "attribute", "perception", b64_png(1)],
            ["205", "How many shapes are there?", "", "one", "two", "four", "", "C", "counting", "perception",
             b64_png(2)]]


def write_tsv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    path.write_text("".join("\t".join(r) + "\n" for r in [header, *rows]))
    return path


def expected_mmbench(rows: list[list[str]], all_rounds: bool = True) -> list[dict]:
    """model_vqa_mmbench.py: question = hint + "\\n" + question (when there is a hint), then "\\n<L>. <option>"
    with letters A.. over the options rotated by the round; options stop at the first missing one; one round
    per option with --all-rounds; option_char rotates with the options; prompt has no letter instruction."""
    out = []
    for cells in rows:
        row = dict(zip(MMBENCH_HEADER, cells, strict=True))
        options = []
        for letter in "ABCD":
            if row[letter] in ("", "nan", "NaN", "None"):
                break
            options.append(row[letter])
        letters = list("ABCD"[:len(options)])
        base = (row["hint"] + "\n" + row["question"]) if row["hint"] else row["question"]
        for r in range(len(options) if all_rounds else 1):
            prompt = base + "".join(f"\n{c}. {o}" for c, o in zip("ABCD", options, strict=False))
            out.append({"question_id": int(row["index"]), "round_id": r, "prompt": prompt, "options": options,
                        "option_char": letters, "model_id": MODEL_ID, "metadata": {}})
            options, letters = options[1:] + options[:1], letters[1:] + letters[:1]
    return out


def check_rows(answers: Path, expected: list[dict], fields: list[str]) -> list[dict]:
    """The answers file against LLaVA's rows: same fields in the same order, the given values equal, one
    non-empty stripped model answer and a 22-character answer id each."""
    rows = [json.loads(line) for line in answers.read_text().splitlines()]
    assert len(rows) == len(expected), rows
    for row, exp in zip(rows, expected, strict=True):
        assert "error" not in row, row
        assert list(row) == fields, row
        for k, v in exp.items():
            assert row[k] == v, (k, row, exp)
        assert isinstance(row["text"], str) and row["text"] == row["text"].strip() and row["text"], row
        assert isinstance(row["answer_id"], str) and len(row["answer_id"]) == 22
    return rows


# ---------------------------------------------------------------------------------------------------
# slow: the real script on the real model


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("llava_formats")
    images = root / "images"
    (images / "4").mkdir(parents=True)
    (images / "11").mkdir()
    for i, name in enumerate(["a1.jpg", "b2.jpg", "c3.jpg", "4/image.png", "11/image.png",
                              *(r["image"] for r in pope_rows())]):
        drawing(40 + 8 * i, 36, seed=i).save(images / name)
    return SimpleNamespace(
        root=root, images=images, cache=root / "xla-cache",
        mmproj=write_random_mmproj(root / "tiny16.gguf", tiny_spec(56, True, seed=1)),
        textvqa=write_jsonl(root / "llava_textvqa_val_v051_ocr.jsonl", textvqa_rows()),
        pope=write_jsonl(root / "llava_pope_test.jsonl", pope_rows()),
        science=root / "llava_test_CQM-A.json", mmbench=write_tsv(root / "mmbench_dev.tsv", MMBENCH_HEADER,
                                                                   mmbench_rows()))


def llava_run(files, question_file: Path, answers: Path, *extra: str) -> str:
    """batch_eval.py with the flags LLaVA's eval scripts pass (plus the small model's)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(files.cache),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("XLA_FLAGS", None)
    cmd = [sys.executable, str(SCRIPT), "--mmproj", str(files.mmproj), "--question-file", str(question_file),
           "--image-folder", str(files.images), "--answers-file", str(answers), "--temperature", "0",
           "--conv-mode", "vicuna_v1", "--model-id", MODEL_ID, "--max-new-tokens", "3", "--batch-size", "4",
           "--ctx-size", "512", "--scan-layers", "on", "--no-progress", *extra]
    proc = subprocess.run(cmd, cwd=files.root, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stderr


@pytest.mark.slow
def test_textvqa_with_repeated_image_ids(files):
    answers = files.root / "answers" / "textvqa.jsonl"
    llava_run(files, files.textvqa, answers)
    rows = check_rows(answers, expected_loader(textvqa_rows()), LOADER_FIELDS)
    # what eval_textvqa.py matches on: (question_id, prompt) of every line
    assert [(r["question_id"], r["prompt"]) for r in rows] == [(q["question_id"], q["text"]) for q in textvqa_rows()]
    assert rows[1]["text"] == rows[4]["text"]  # the same line twice: the same greedy answer
    # run again: everything is answered already, the file stays as it is
    before = answers.read_text()
    err = llava_run(files, files.textvqa, answers)
    assert '"items": 0' in err and '"skipped_already_answered": 5' in err and answers.read_text() == before


@pytest.mark.slow
def test_pope(files):
    answers = files.root / "answers" / "pope.jsonl"
    llava_run(files, files.pope, answers)
    check_rows(answers, expected_loader(pope_rows()), LOADER_FIELDS)


@pytest.mark.slow
def test_scienceqa_single_pred_prompt(files):
    files.science.write_text(json.dumps(science_items(), indent=2))
    answers = files.root / "answers" / "sqa.jsonl"
    llava_run(files, files.science, answers, "--single-pred-prompt")
    rows = check_rows(answers, expected_science(science_items()), LOADER_FIELDS)
    # eval_science_qa.py: multimodal rows are those with <image> in the prompt (none: ZeroDivisionError)
    assert [("<image>" in r["prompt"]) for r in rows] == [True, False, True]


@pytest.mark.slow
def test_mmbench_all_rounds(files):
    answers = files.root / "answers" / "mmbench.jsonl"
    llava_run(files, files.mmbench, answers, "--single-pred-prompt", "--lang", "en", "--all-rounds")
    rows = check_rows(answers, expected_mmbench(mmbench_rows()), MMBENCH_FIELDS)
    assert [(r["question_id"], r["round_id"]) for r in rows] == [(101, 0), (101, 1), (101, 2), (101, 3),
                                                                  (205, 0), (205, 1), (205, 2)]


# ---------------------------------------------------------------------------------------------------
# fast: the script's bookkeeping on a fake model


class FakeLlava:
    """Enough of `Llava` for batch_eval: answers are a function of the prompt and the image count."""

    n_ctx = 4096
    metadata: dict = {}
    path = "/models/llava-v1.5-7b.gguf"
    load_s = 0.0

    def __init__(self):
        self.prompts = []

    def prompt_length(self, prompt, images=(), template=None):
        return len(prompt.split()) + 10 * len(images)

    def generate_batch(self, prompts, images, **kw):
        self.prompts += [p for p, n in zip(prompts, kw["max_new_tokens"], strict=True) if n != 1]  # not the padding
        return [SimpleNamespace(text=f" {len(p)}-{len(imgs)} ", token_ids=[1], stop_reason="length")
                for p, imgs in zip(prompts, images, strict=True)]


@pytest.fixture
def fake(monkeypatch):
    """llava_jax.load → a FakeLlava (the list of the ones made)."""
    made = []

    def load(*args, **kwargs):
        made.append(FakeLlava())
        return made[-1]

    monkeypatch.setattr(llava_jax, "load", load)
    return made


@pytest.fixture
def no_load(monkeypatch):
    def load(*args, **kwargs):
        raise AssertionError("the model was loaded before the check")

    monkeypatch.setattr(llava_jax, "load", load)


@pytest.fixture
def tv(tmp_path):
    """TextVQA-style files: 5 questions (a repeated id), their images."""
    images = tmp_path / "images"
    images.mkdir()
    for name in ("a1.jpg", "b2.jpg", "c3.jpg"):
        drawing(30, 20, seed=len(name)).save(images / name)
    return SimpleNamespace(root=tmp_path, images=images, questions=write_jsonl(tmp_path / "q.jsonl", textvqa_rows()))


def fake_run(tv, answers: Path, *extra: str, questions: Path | None = None, mmproj: bool = True) -> int:
    argv = ["--question-file", str(questions or tv.questions), "--image-folder", str(tv.images), "--answers-file",
            str(answers), "--conv-mode", "vicuna_v1", "--model-id", MODEL_ID, "--batch-size", "2", "--no-progress",
            *extra]
    if mmproj:
        (tv.root / "mm.gguf").write_bytes(b"")
        argv += ["--mmproj", str(tv.root / "mm.gguf")]
    return batch_eval.main(argv)


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_chunks_concatenated_equal_one_run(tv, fake, tmp_path):
    assert fake_run(tv, tmp_path / "all.jsonl") == 0
    parts = []
    for k in range(3):  # 5 lines in chunks of ceil(5 / 3) = 2: [0, 1], [2, 3], [4]
        parts.append(tmp_path / "chunks" / f"3_{k}.jsonl")
        assert fake_run(tv, parts[-1], "--num-chunks", "3", "--chunk-idx", str(k)) == 0
    assert [len(lines(p)) for p in parts] == [2, 2, 1]
    assert "".join(p.read_text() for p in parts) == (tmp_path / "all.jsonl").read_text()  # `cat` merges them
    assert [r["question_id"] for r in lines(tmp_path / "all.jsonl")] == ["a1", "b2", "a1", "c3", "b2"]


def test_get_chunk_is_llavas():
    assert ev.get_chunk(list(range(10)), 4, 0) == [0, 1, 2] and ev.get_chunk(list(range(10)), 4, 3) == [9]
    assert ev.get_chunk(list(range(4)), 3, 2) == []  # chunks of 2: only two of them
    assert ev.get_chunk([], 2, 1) == []


def test_repeated_ids_are_answered_per_line(tv, fake, tmp_path):
    answers = tmp_path / "a.jsonl"
    assert fake_run(tv, answers) == 0
    rows = lines(answers)
    assert [(r["question_id"], r["prompt"]) for r in rows] == [(q["question_id"], q["text"]) for q in textvqa_rows()]
    assert len(fake[0].prompts) == 5
    assert rows[0]["answer_id"] != rows[2]["answer_id"]  # same id, other question
    assert rows[1]["answer_id"] == rows[4]["answer_id"]  # the same line twice


def test_retry_errors_answers_a_row_whose_image_appeared(tv, fake, tmp_path):
    answers = tmp_path / "a.jsonl"
    assert fake_run(tv, tmp_path / "ref.jsonl") == 0
    (tv.images / "c3.jpg").rename(tmp_path / "c3.jpg")
    assert fake_run(tv, answers) == 0
    assert "image not found" in lines(answers)[3]["error"]
    (tmp_path / "c3.jpg").rename(tv.images / "c3.jpg")
    assert fake_run(tv, answers) == 0  # without --retry-errors the error row is final
    assert "error" in lines(answers)[3] and len(fake[-1].prompts) == 0
    assert fake_run(tv, answers, "--retry-errors") == 0
    assert len(fake[-1].prompts) == 1 and answers.read_text() == (tmp_path / "ref.jsonl").read_text()


def test_limit_takes_the_first_questions(tv, fake, tmp_path):
    assert fake_run(tv, tmp_path / "a.jsonl", "--limit", "2") == 0
    assert [r["prompt"] for r in lines(tmp_path / "a.jsonl")] == [q["text"] for q in textvqa_rows()[:2]]


def test_a_complete_last_line_without_newline_is_answered_again(tv, fake, tmp_path):
    """The torn-tail repair runs before the answers are read: a last line cut just before its newline is
    no answer (before the fix it counted as one, was then deleted, and its question never answered)."""
    answers = tmp_path / "a.jsonl"
    assert fake_run(tv, answers) == 0
    full = answers.read_text()
    answers.write_text(full[:-1])  # the last row's JSON complete, its newline not written
    assert fake_run(tv, answers) == 0
    assert answers.read_text() == full and len(fake[-1].prompts) == 1


def test_text_only_rows_need_no_image_folder_or_mmproj(tv, fake, tmp_path):
    q = write_jsonl(tmp_path / "text.jsonl", [{"question_id": 1, "text": "Say hi."}])
    assert batch_eval.main(["--questions", str(q), "--answers", str(tmp_path / "a.jsonl"), "--image-folder",
                            str(tmp_path / "nowhere"), "--conv-mode", "llava_v1", "--no-progress"]) == 0
    assert fake[0].prompts == ["".join(build_prompt("Say hi.", 0, "vicuna"))]


def test_mmbench_images_are_decoded_in_memory(tmp_path, fake):
    tsv = write_tsv(tmp_path / "mmb.tsv", MMBENCH_HEADER, mmbench_rows())
    answers = tmp_path / "a.jsonl"
    (tmp_path / "mm.gguf").write_bytes(b"")
    assert batch_eval.main(["--question-file", str(tsv), "--answers-file", str(answers), "--mmproj",
                            str(tmp_path / "mm.gguf"), "--image-folder", str(tmp_path / "nowhere"), "--lang", "cn",
                            "--single-pred-prompt", "--no-progress", "--model-id", MODEL_ID]) == 0
    rows = lines(answers)
    assert [r["question_id"] for r in rows] == [101, 205] and all("error" not in r for r in rows)
    exp = expected_mmbench(mmbench_rows(), all_rounds=False)
    assert [{k: r[k] for k in exp[0]} for r in rows] == exp
    assert fake[0].prompts[0] == exp[0]["prompt"] + "\n请直接回答选项字母。"  # the model code adds the template


def test_conv_mode_aliases():
    assert all(target in TEMPLATES for target in CONV_MODE_ALIASES.values())
    for alias, name in [("vicuna_v1", "vicuna"), ("llava_v1", "vicuna"), ("llava_v0", "vicuna"),
                        ("mistral_instruct", "mistral"), ("chatml_direct", "chatml"), ("llava_llama_3", "llama3"),
                        ("plain", "raw")]:
        assert ev.resolve_template(alias) == name
        assert build_prompt("What is it?", 1, alias) == build_prompt("What is it?", 1, name)
    with pytest.raises(LlavaError, match="choose one of: vicuna, .*vicuna_v1"):
        ev.resolve_template("vicuna_v2")


def test_merge_checks_parts_and_question_count(tmp_path):
    answers = tmp_path / "a.jsonl"
    qs = [ev.Question(i, f"t{i}") for i in range(4)]
    row = lambda q: {"question_id": q.question_id, "prompt": q.text, "text": "x"}  # noqa: E731
    write_jsonl(ev.part_path(answers, 0), [row(q) for q in qs[0::2]])
    with pytest.raises(LlavaError, match="part file.* missing: a.jsonl.part-1"):
        ev.merge_parts(answers, qs, 2)  # a process that left no part is an error, not silence
    assert ev.part_path(answers, 0).exists() and not answers.exists()
    write_jsonl(ev.part_path(answers, 1), [row(qs[1])])
    with pytest.raises(LlavaError, match="1 of 4 questions have no answer"):
        ev.merge_parts(answers, qs, 2)
    assert [r["question_id"] for r in lines(answers)] == [0, 1, 2]  # what there is, kept in order


def test_the_split_between_processes_does_not_depend_on_what_is_done(tv, tmp_path):
    args = batch_eval.build_parser().parse_args(["--questions", str(tv.questions), "--answers", str(tmp_path / "a"),
                                                 "--image-folder", str(tv.images), "--mmproj", str(tv.questions),
                                                 "--num-processes", "2", "--process-id", "1"])
    plan = batch_eval.make_plan(args)
    assert [q.text for q in plan.todo] == [r["text"] for r in textvqa_rows()[1::2]]
    write_jsonl(tmp_path / "a", [{"question_id": "a1", "prompt": textvqa_rows()[0]["text"], "text": "x"}])
    plan = batch_eval.make_plan(args)  # line 0 answered: process 1 still has lines 1 and 3
    assert [q.text for q in plan.todo] == [r["text"] for r in textvqa_rows()[1::2]] and plan.skipped == 0


# ---------------------------------------------------------------------------------------------------
# checks before the model loads


def one_error(capsys, rc: int, *needles: str) -> str:
    err = capsys.readouterr().err
    assert rc == 1 and err.startswith("error: ") and err.count("\n") == 1, err
    for needle in needles:
        assert needle in err, err
    return err


@pytest.mark.parametrize("case, needle", [
    ("conv-mode", "unknown chat template / --conv-mode 'vicuna_v2'; choose one of: vicuna"),
    ("no-questions-file", "questions file not found"),
    ("bad-line", "q.jsonl:3: not a question line"),
    ("no-image-folder", "image folder not found"),
    ("no-mmproj", "the questions have images but no --mmproj"),
    ("mmproj-missing", "mmproj file not found"),
    ("chunk", "--chunk-idx must be in [0, 2)"),
    ("limit", "--limit must be >= 0"),
    ("batch", "--batch-size must be >= 1"),
    ("single-pred-jsonl", "--single-pred-prompt applies to ScienceQA"),
    ("all-rounds-sqa", "--all-rounds applies to MMBench"),
])
def test_checked_before_the_model_loads(tv, tmp_path, capsys, no_load, case, needle):
    answers = tmp_path / "a.jsonl"
    extra, questions, mmproj = [], None, True
    if case == "conv-mode":
        extra = ["--conv-mode", "vicuna_v2"]
    elif case == "no-questions-file":
        questions = tmp_path / "typo.jsonl"
    elif case == "bad-line":
        questions = tmp_path / "q.jsonl"
        questions.write_text(json.dumps(textvqa_rows()[0]) + "\n\n" + '{"question_id": 9}\n')
    elif case == "no-image-folder":
        extra = ["--image-folder", str(tmp_path / "imgs")]
    elif case == "no-mmproj":
        mmproj = False
    elif case == "mmproj-missing":
        mmproj, extra = False, ["--mmproj", str(tmp_path / "mmproj-typo.gguf")]
    elif case == "chunk":
        extra = ["--num-chunks", "2", "--chunk-idx", "2"]
    elif case == "limit":
        extra = ["--limit", "-1"]
    elif case == "batch":
        extra = ["--batch-size", "0"]
    elif case == "single-pred-jsonl":
        extra = ["--single-pred-prompt"]
    elif case == "all-rounds-sqa":
        questions = tmp_path / "sqa.json"
        questions.write_text(json.dumps(science_items()))
        extra = ["--all-rounds"]
    one_error(capsys, fake_run(tv, answers, *extra, questions=questions, mmproj=mmproj), needle)
    assert not answers.exists()


def test_checks_run_before_the_model_path_is_opened(tmp_path):
    """The script itself (subprocess): a bad --conv-mode is reported although --model does not exist."""
    q = write_jsonl(tmp_path / "q.jsonl", [{"question_id": 1, "text": "hi"}])
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, str(SCRIPT), "--model-path", str(tmp_path / "no-such-model.gguf"),
                           "--question-file", str(q), "--answers-file", str(tmp_path / "a.jsonl"),
                           "--conv-mode", "llava_v2"], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 1 and proc.stderr.startswith("error: unknown chat template / --conv-mode 'llava_v2'")
    assert proc.stderr.count("\n") == 1, proc.stderr


def test_question_file_formats_are_told_by_content(tmp_path):
    sqa = tmp_path / "questions.jsonl"  # the name says JSONL, the content is ScienceQA's list
    sqa.write_text(json.dumps(science_items(), indent=1))
    qs = ev.read_questions(sqa, single_pred_prompt=True)
    assert [(q.question_id, q.answer_prompt) for q in qs] == [(r["question_id"], r["prompt"])
                                                             for r in expected_science(science_items())]
    assert qs[0].text == expected_science(science_items())[0]["prompt"].removeprefix("<image>\n")
    assert [q.image for q in qs] == ["4/image.png", None, "11/image.png"]
    tsv = write_tsv(tmp_path / "mmb.txt", MMBENCH_HEADER, mmbench_rows())
    assert len(ev.read_questions(tsv, all_rounds=True)) == 7 and len(ev.read_questions(tsv)) == 2
    bad = tmp_path / "bad.json"
    bad.write_text('[{"id": 1}]')
    with pytest.raises(LlavaError, match="item 0: not a ScienceQA question"):
        ev.read_questions(bad)


# ---------------------------------------------------------------------------------------------------
# several processes (jax.distributed on localhost), on a fake model


RUNNER = """
import os, sys
from types import SimpleNamespace
import llava_jax

class Fake:
    n_ctx, metadata, path, load_s = 4096, {}, "fake.gguf", 0.0
    def prompt_length(self, prompt, images=(), template=None):
        return len(prompt.split())
    def generate_batch(self, prompts, images, **kw):
        die = os.environ.get("DIE_IN_PROCESS")
        if die is not None and die == sys.argv[sys.argv.index("--process-id") + 1]:
            os._exit(3)  # killed mid-job
        return [SimpleNamespace(text=str(len(p)), token_ids=[1], stop_reason="length") for p in prompts]

llava_jax.load = lambda *a, **k: Fake()
sys.argv[0] = SCRIPT
exec(compile(open(SCRIPT).read(), SCRIPT, "exec"), {"__name__": "__main__"})
"""


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_fake(questions: Path, answers: Path, *extra: str, env: dict | None = None) -> subprocess.Popen:
    code = f"SCRIPT = {str(SCRIPT)!r}\n" + RUNNER
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               **(env or {}))
    env.pop("XLA_FLAGS", None)
    return subprocess.Popen([sys.executable, "-c", code, "--questions", str(questions), "--answers", str(answers),
                             "--conv-mode", "vicuna_v1", "--batch-size", "2", "--no-progress", *extra],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def two_processes(questions: Path, answers: Path, *extra: str, env: dict | None = None) -> list[tuple[int, str]]:
    coordinator = f"127.0.0.1:{free_port()}"
    procs = [start_fake(questions, answers, "--num-processes", "2", "--process-id", str(p), "--coordinator",
                        coordinator, *extra, env=env) for p in range(2)]
    try:
        return [(proc.wait(timeout=240), proc.stdout.read()) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()


def test_two_processes_equal_one_with_repeated_ids(tmp_path):
    q = write_jsonl(tmp_path / "q.jsonl", [{"question_id": i % 3, "text": f"question {i} " * (i + 1)}
                                           for i in range(7)])
    one = start_fake(q, tmp_path / "one.jsonl")
    assert one.wait(timeout=240) == 0, one.stdout.read()
    (rc0, out0), (rc1, out1) = two_processes(q, tmp_path / "two.jsonl")
    assert rc0 == 0 and rc1 == 0, out0 + out1
    assert (tmp_path / "two.jsonl").read_text() == (tmp_path / "one.jsonl").read_text()
    assert len(lines(tmp_path / "two.jsonl")) == 7 and not list(tmp_path.glob("two.jsonl.part-*"))


def test_a_dead_peer_is_an_error_not_a_hang(tmp_path):
    q = write_jsonl(tmp_path / "q.jsonl", [{"question_id": i, "text": f"question {i}"} for i in range(4)])
    (rc0, out0), (rc1, _) = two_processes(q, tmp_path / "a.jsonl", "--barrier-timeout", "15",
                                          env={"DIE_IN_PROCESS": "1"})
    assert rc1 == 3
    assert rc0 == 1 and "error: process 0: not every process reached barrier 'answered' within 15 s" in out0, out0[-2000:]
    assert not (tmp_path / "a.jsonl").exists()  # nothing merged from a job with a missing share
