"""Smoke test of scripts/bench.py: a tiny run of both engines yields well-formed JSON (speed is not asserted)."""

from __future__ import annotations

import json

import pytest
from bench_script import load_bench

pytestmark = [pytest.mark.slow, pytest.mark.llamacpp]


def test_bench_text_smoke(smollm2_path, tmp_path, capsys):
    pytest.importorskip("llama_cpp")
    bench = load_bench()
    out = tmp_path / "bench.json"
    argv = ["-m", str(smollm2_path), "--llama-cpp", "--prompt-tokens", "48", "--gen-tokens", "16", "--repeats", "1",
            "--quiet-wait", "0", "-o", str(out)]
    assert bench.main(argv) == 0
    result = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out) == result
    assert result["mode"] == "text" and result["machine"]["cores"] >= 1
    (row,) = result["results"]
    for engine in ("llava_jax", "llama_cpp"):
        r = row[engine]
        assert r["load_s"] > 0
        assert r["prefill"]["tokens"] == 48 and r["prefill"]["tps"] > 0
        assert r["decode"]["tokens"] == 16 and r["decode"]["tps"] > 0
        assert len(r["greedy_ids_head"]) == 16
    assert row["llava_jax"]["compile_s"] > 0
    assert set(row["ratio"]) == {"prefill", "decode", "load"}
    # same prompt, same greedy function (f32 vs llama.cpp's 8-bit activations on Q4_1): the first token agrees
    assert row["llava_jax"]["greedy_ids_head"][0] == row["llama_cpp"]["greedy_ids_head"][0]

