"""`python -m llava_jax.run` as a user runs it (a subprocess): streamed text + llama.cpp-style timing lines,
`--json`, and exactly one `error: ...` stderr line with exit status 1 (never a traceback) for bad input."""

from __future__ import annotations

import json
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
