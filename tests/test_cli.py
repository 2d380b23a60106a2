"""`python -m llava_jax.run` as a user runs it (a subprocess): streamed text + llama.cpp-style timing lines,
`--json`, and exactly one `error: ...` stderr line with exit status 1 (never a traceback) for bad input."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType

from llava_jax import quants

REPO = Path(__file__).resolve().parents[1]
Q = GGMLQuantizationType


def run_cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llava_jax.run", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def assert_one_error_line(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr[-2000:]
    assert lines[0].startswith("error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert proc.stdout == ""
    return lines[0]


# ---- tiny GGUF files ----------------------------------------------------------------------------------


def _bytes_to_unicode() -> list[str]:
    """GPT-2's byte → printable character table (the 256 base tokens of a byte-level BPE vocabulary)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    table = dict(zip(bs, cs, strict=True))
    return [chr(table[b]) for b in range(256)]


TINY = {"dim": 64, "heads": 2, "kv_heads": 1, "ffn": 256, "layers": 1, "ctx": 64}


def write_tiny_llama(path: Path, bad: tuple[str, GGMLQuantizationType] | None = None) -> list[str]:
    """A complete one-layer llama GGUF (byte-level BPE vocabulary of 257 tokens, F32 tensors). With
    `bad = (tensor name, type)` that tensor is stored in `type` instead (zero bytes: only the header matters).
    Returns the tensor names."""
    tokens = [*_bytes_to_unicode(), "he"]
    d, f, hd = TINY["dim"], TINY["ffn"], TINY["dim"] // TINY["heads"]
    shapes = {"token_embd.weight": (len(tokens), d), "output_norm.weight": (d,),
              "blk.0.attn_norm.weight": (d,), "blk.0.attn_q.weight": (d, d),
              "blk.0.attn_k.weight": (TINY["kv_heads"] * hd, d), "blk.0.attn_v.weight": (TINY["kv_heads"] * hd, d),
              "blk.0.attn_output.weight": (d, d), "blk.0.ffn_norm.weight": (d,), "blk.0.ffn_gate.weight": (f, d),
              "blk.0.ffn_up.weight": (f, d), "blk.0.ffn_down.weight": (d, f)}
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(TINY["ctx"])
    w.add_embedding_length(d)
    w.add_feed_forward_length(f)
    w.add_block_count(TINY["layers"])
    w.add_head_count(TINY["heads"])
    w.add_head_count_kv(TINY["kv_heads"])
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_merges(["h e"])
    w.add_eos_token_id(0)
    w.add_add_bos_token(False)
    rng = np.random.default_rng(0)
    for name, shape in shapes.items():
        if bad is not None and name == bad[0]:
            block, type_size = gguf.GGML_QUANT_SIZES[bad[1]]
            raw = np.zeros((*shape[:-1], shape[-1] // block * type_size), np.uint8)
            w.add_tensor(name, raw, raw_dtype=bad[1])
        elif len(shape) == 1:
            w.add_tensor(name, np.ones(shape, np.float32))
        else:
            w.add_tensor(name, (rng.standard_normal(shape) / np.sqrt(shape[-1])).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return list(shapes)


def write_mamba(path: Path) -> None:
    w = gguf.GGUFWriter(str(path), "mamba")
    w.add_block_count(1)
    w.add_embedding_length(16)
    w.add_tensor("token_embd.weight", np.zeros((8, 16), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_tiny_llama_is_valid(tmp_path):
    """The unsupported-quant test below only swaps one tensor's type in this file, which itself loads
    and runs, so its error can only come from that tensor."""
    import llava_jax

    path = tmp_path / "tiny.gguf"
    write_tiny_llama(path)
    llm = llava_jax.load(path)
    assert llm.logits([1, 2, 3]).shape == (3, 257)
    assert llm.cfg.n_layers == 1 and llm.cfg.vocab_size == 257


# ---- bad input: one line, exit 1, no traceback ----------------------------------------------------------


def test_missing_file(tmp_path):
    assert_one_error_line(run_cli("-m", str(tmp_path / "nope.gguf"), "-p", "hi"), "file not found", "nope.gguf")


def test_directory(tmp_path):
    assert_one_error_line(run_cli("-m", str(tmp_path), "-p", "hi"), "directory")


def test_not_gguf(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("definitely not a model\n" * 10)
    assert_one_error_line(run_cli("-m", str(path), "-p", "hi"), "not a GGUF file")


def test_truncated_header(smollm2_path, tmp_path):
    path = tmp_path / "cut.gguf"
    with open(smollm2_path, "rb") as f:
        path.write_bytes(f.read(1_000_000))  # inside the vocabulary
    assert_one_error_line(run_cli("-m", str(path), "-p", "hi"), "truncated")


def test_truncated_tensor_data(smollm2_path, tmp_path):
    path = tmp_path / "cut.gguf"
    with open(smollm2_path, "rb") as f:
        path.write_bytes(f.read(30_000_000))  # header complete, tensor data cut
    assert_one_error_line(run_cli("-m", str(path), "-p", "hi"), "past the end of the file")


def test_unsupported_architecture(tmp_path):
    path = tmp_path / "mamba.gguf"
    write_mamba(path)
    assert_one_error_line(run_cli("-m", str(path), "-p", "hi"), "unsupported architecture", "mamba")


@pytest.mark.parametrize("qtype", [Q.IQ2_XXS, Q.TQ1_0])
def test_unsupported_quant_type(qtype, tmp_path):
    assert qtype not in quants.SUPPORTED
    path = tmp_path / "tiny_bad.gguf"
    write_tiny_llama(path, bad=("blk.0.ffn_down.weight", qtype))
    line = assert_one_error_line(run_cli("-m", str(path), "-p", "hi"), "blk.0.ffn_down.weight", qtype.name)
    assert "not supported" in line


def test_mmproj_as_model(shared_reference):
    path = shared_reference / "mm" / "mmproj-llava15-tiny-f32.gguf"
    assert_one_error_line(run_cli("-m", str(path), "-p", "hi"), "mmproj", "--mmproj")


def test_prompt_longer_than_context(smollm2_path, smollm2_reference):
    r = smollm2_reference[3]  # 15 tokens
    line = assert_one_error_line(run_cli("-m", str(smollm2_path), "-c", "8", "-p", r["prompt"]), "context is 8")
    assert "prompt is 15 tokens" in line
    assert "trained on 8192 tokens" in line and "at most" not in line  # -c has no such limit (above it: a warning)


def test_no_prompt(smollm2_path):
    assert_one_error_line(run_cli("-m", str(smollm2_path)), "no prompt")


# ---- successful runs ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_streams_text_and_prints_timings(smollm2_path, smollm2_reference):
    r = smollm2_reference[3]
    proc = run_cli("-m", str(smollm2_path), "-p", r["prompt"], "-n", "20", "--temp", "0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    from llava_jax import Tokenizer

    want = Tokenizer.from_gguf(smollm2_path).decode(r["greedy_ids"][:20])
    assert proc.stdout == want + "\n"
    err = proc.stderr
    assert "Traceback" not in err
    assert re.search(r"load time = +[\d.]+ ms", err), err
    assert re.search(r"decode kernels = (native|xla \(.+\))\n", err), err
    assert re.search(r"prompt eval time = +[\d.]+ ms / +15 tokens \( *[\d.]+ tokens per second\)", err), err
    assert re.search(r"eval time = +[\d.]+ ms / +20 runs +\( *[\d.]+ tokens per second\)", err), err


@pytest.mark.slow
def test_json_output(smollm2_path, smollm2_reference):
    """-n 1: the first token comes from the prefill, so this run compiles no decode program (~20 s saved);
    multi-token results, EOS included, are covered through the same `GenerationResult` in test_generate."""
    r = smollm2_reference[0]
    proc = run_cli("-m", str(smollm2_path), "-p", r["prompt"], "-n", "1", "--temp", "0", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, proc.stdout
    out = json.loads(lines[0])
    assert out["text"] == " Paris"
    assert out["token_ids"] == r["greedy_ids"][:1]
    assert out["prompt_ids"] == r["ids"]
    assert out["stop_reason"] == "length"
    t = out["timings"]
    assert t["prompt_tokens"] == len(r["ids"]) and t["generated_tokens"] == 1
    for key in ("prompt_s", "generate_s", "compile_s", "prompt_tps", "generate_tps"):
        assert isinstance(t[key], float) and t[key] >= 0, key
    assert t["compile_s"] > 0
    from llava_jax import cpu_kernels

    native = cpu_kernels.kernels_available()
    assert out["decode_kernels"] == "native" if native else out["decode_kernels"].startswith("xla (")
    assert "Traceback" not in proc.stderr


# ---- the environment: one line too (issue: tracebacks still reachable) -----------------------------------------


def run_main(argv: list[str], capsys) -> tuple[int, str, str]:
    """`llava_jax.run.main` in this process (for failures that need monkeypatching): (status, stdout, stderr)."""
    from llava_jax import run

    rc = run.main([*argv, "--no-compile-cache"])
    out, err = capsys.readouterr()
    return rc, out, err


def one_error_line(rc: int, err: str, *fragments: str) -> str:
    assert rc == 1, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny") / "tiny.gguf"
    write_tiny_llama(path)
    return path


def test_non_utf8_prompt_file(tmp_path):
    path = tmp_path / "prompt.txt"
    path.write_bytes(b"caf\xe9 latin-1 text\n")
    assert_one_error_line(run_cli("-f", str(path)), "prompt.txt", "not UTF-8")


def test_unreadable_model_file(tiny_path, monkeypatch, capsys):
    """Permission denied (tests run as root, where chmod 000 still reads: the open is made to fail)."""
    real = np.memmap

    def denied(filename, *args, **kwargs):
        if str(filename) == str(tiny_path):
            raise PermissionError(13, "Permission denied", str(filename))
        return real(filename, *args, **kwargs)

    monkeypatch.setattr(np, "memmap", denied)
    rc, out, err = run_main(["-m", str(tiny_path), "-p", "hi"], capsys)
    one_error_line(rc, err, "Permission denied", "tiny.gguf")
    assert out == ""


def test_device_out_of_memory(tiny_path, monkeypatch, capsys):
    """An XLA RESOURCE_EXHAUSTED error during generation is one line, not a traceback."""
    from jax.errors import JaxRuntimeError

    from llava_jax.generate import TextEngine

    def exhausted(self, *args, **kwargs):
        raise JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1234567 bytes.")
        yield  # a generator, as the real one

    monkeypatch.setattr(TextEngine, "generate", exhausted)
    rc, out, err = run_main(["-m", str(tiny_path), "-p", "hi", "-n", "4"], capsys)
    line = one_error_line(rc, err, "device out of memory", "1234567 bytes")
    assert "RESOURCE_EXHAUSTED" not in line


def test_broken_pipe(tiny_path):
    """`... | head -c 5`: the reader is gone before the first piece is written."""
    proc = subprocess.Popen([sys.executable, "-m", "llava_jax.run", "-m", str(tiny_path), "-p", "hello", "-n", "40",
                             "--temp", "0", "--no-compile-cache"], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    proc.stdout.close()  # the CLI is still importing jax: every write it makes fails
    err = proc.stderr.read()
    assert proc.wait(timeout=600) == 1, err
    assert "Traceback" not in err and "Exception ignored" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert errors == ["error: output closed early (broken pipe)"], err


def test_corrupt_orbax_directory(tmp_path):
    cache = tmp_path / "weights"
    (cache / "params").mkdir(parents=True)
    (cache / "meta.json").write_text(json.dumps({"text_metadata": {}, "text_tensors": [], "dtype": "float32"}))
    (cache / "params" / "_METADATA").write_bytes(b"\x00garbage\xff" * 10)
    (cache / "params" / "d").write_bytes(b"not a tensorstore")
    assert_one_error_line(run_cli("-m", str(cache), "-p", "hi"), "corrupt or incomplete Orbax checkpoint", "weights")


# ---- context size ------------------------------------------------------------------------------------------------


def test_ctx_above_trained_context_warns(tiny_path, capsys):
    rc, out, err = run_main(["-m", str(tiny_path), "-c", "128", "-p", "hello", "-n", "2", "--temp", "0"], capsys)
    assert rc == 0, err
    assert "warning: model was trained on only 64 context tokens (128 specified)" in err


def test_too_long_prompt_message_is_true(tiny_path):
    """The hint names the trained context without claiming a -c limit that does not exist."""
    import llava_jax
    from llava_jax.errors import LlavaError

    llm = llava_jax.load(tiny_path, n_ctx=8)
    with pytest.raises(LlavaError) as e:
        llm.generate("hello hello hello", max_new_tokens=2, temperature=0)
    msg = str(e.value)
    assert "context is 8" in msg and "-c" in msg and "trained on 64" in msg and "at most" not in msg
    llm = llava_jax.load(tiny_path, n_ctx=100)  # above the trained 64: a longer -c does not help the model
    with pytest.raises(LlavaError) as e:
        llm.generate("x" * 150, max_new_tokens=2, temperature=0)
    assert "context is 100" in str(e.value) and "shorten the prompt" in str(e.value) and "at most" not in str(e.value)


# ---- sampling flags, templates, defaults, --help -----------------------------------------------------------------


@pytest.mark.parametrize("flag, value, name", [("--min-p", "1.5", "min_p"), ("--top-p", "0", "top_p"),
                                               ("--top-p", "1.2", "top_p"), ("--top-k", "-1", "top_k"),
                                               ("--repeat-penalty", "0", "repeat_penalty"), ("--temp", "-0.5", "temperature"),
                                               ("--repeat-last-n", "-2", "repeat-last-n")])
def test_bad_sampling_flags(flag, value, name):
    """Rejected before the model loads (the model path does not exist: it is never opened)."""
    assert_one_error_line(run_cli("-m", "never-opened.gguf", "-p", "hi", flag, value), name)


def test_unknown_template_rejected_text_only():
    line = assert_one_error_line(run_cli("-m", "never-opened.gguf", "-p", "hi", "--chat-template", "nope"),
                                 "unknown chat template", "nope")
    assert "vicuna" in line  # the names to choose from


def test_text_only_template_rule(tiny_path, capsys):
    """Text-only: as is without --chat-template / -sys; wrapped in the named template (or, with -sys only, the
    GGUF's) otherwise, exactly as batch_eval wraps text-only questions (`build_prompt(text, 0, template)`)."""
    import llava_jax
    from llava_jax.prompts import build_prompt, template_from_metadata

    llm = llava_jax.load(tiny_path)

    def prompt_ids(*flags: str) -> list[int]:
        rc, out, err = run_main(["-m", str(tiny_path), "-c", "256", "-p", "hello", "-n", "1", "--temp", "0", "--json",
                                 *flags], capsys)
        assert rc == 0, err
        return json.loads(out)["prompt_ids"]

    assert prompt_ids() == llm.tokenize("hello")
    assert prompt_ids("--chat-template", "chatml") == llm.tokenize("".join(build_prompt("hello", 0, "chatml")))
    default = template_from_metadata(llm.metadata)
    want = llm.tokenize("".join(build_prompt("hello", 0, default, "Be brief.")))
    assert prompt_ids("-sys", "Be brief.") == want


def test_help_shows_defaults_and_example():
    proc = subprocess.run([sys.executable, "-m", "llava_jax.run", "--help"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    text = " ".join(proc.stdout.split())
    assert "--temp TEMP temperature, >= 0 (0 = greedy; llama-mtmd-cli's value) (default: 0.2)" in text
    for fragment in ("(default: 40)", "(default: 0.95)", "(default: 0.05)", "(default: 1.0)", "(default: 64)",
                     "-sys SYSTEM_PROMPT, --system-prompt SYSTEM_PROMPT", "--no-compile-cache", "example",
                     "python -m llava_jax.run --default-mmproj --image", "text-only prompt is used as is"):
        assert fragment in text, fragment


def test_cli_defaults_are_mtmd_cli_defaults():
    from llava_jax.run import build_parser

    a = build_parser().parse_args([])
    assert (a.temp, a.top_k, a.top_p, a.min_p, a.repeat_penalty, a.repeat_last_n) == (0.2, 40, 0.95, 0.05, 1.0, 64)


# ---- startup cost: no jax for --help or `import llava_jax` -------------------------------------------------------


@pytest.mark.parametrize("code", [
    "import llava_jax, sys; assert 'jax' not in sys.modules, 'import llava_jax imported jax'",
    "import sys\nfrom llava_jax.run import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
    "assert 'jax' not in sys.modules, '--help imported jax'",
])
def test_no_jax_import(code):
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_lazy_names_still_work():
    import llava_jax

    assert callable(llava_jax.load) and llava_jax.Llava.__name__ == "Llava" and llava_jax.Tokenizer.from_gguf
    assert set(llava_jax.__all__) <= set(dir(llava_jax))
    with pytest.raises(AttributeError):
        llava_jax.no_such_name  # noqa: B018


def test_bucket_defaults_match_generate():
    from llava_jax import defaults
    from llava_jax.generate import Buckets

    assert (defaults.BUCKET_MIN, defaults.BUCKET_STEP, defaults.BUCKET_PROMPT_STEP) == (
        Buckets.minimum, Buckets.step, Buckets.prompt_step)


# ---- persistent compilation cache -----------------------------------------------------------------------------


def test_compile_cache_second_call_compiles_less(tiny_path, tmp_path):
    """Two identical CLI calls with one fresh cache: the second loads its programs (timings.compile_s drops);
    --no-compile-cache writes nothing."""
    env = dict(os.environ, LLAVA_JAX_COMPILE_CACHE=str(tmp_path / "jax_cache"))
    argv = [sys.executable, "-m", "llava_jax.run", "-m", str(tiny_path), "-p", "hello", "-n", "24", "--temp", "0",
            "--json"]

    def compile_s(*extra: str) -> float:
        proc = subprocess.run([*argv, *extra], cwd=REPO, capture_output=True, text=True, env=env, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return json.loads(proc.stdout)["timings"]["compile_s"]

    first = compile_s()
    assert any((tmp_path / "jax_cache").iterdir()), "nothing was cached"
    second = compile_s()
    print(f"compile_s: first {first:.3f} s, second (cached) {second:.3f} s")
    assert second < first
    env["LLAVA_JAX_COMPILE_CACHE"] = str(tmp_path / "off")
    compile_s("--no-compile-cache")
    assert not (tmp_path / "off").exists() or not any((tmp_path / "off").iterdir())
