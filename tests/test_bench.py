"""Smoke test of scripts/bench.py: a tiny run of both engines yields JSON whose figures are the token counts asked
for and rates / ratios consistent with the reported times (speed itself is not asserted)."""

from __future__ import annotations

import json
import math

import pytest
from bench_script import assert_summary, load_bench
from prerequisites import importorskip

pytestmark = [pytest.mark.slow, pytest.mark.llamacpp]


def test_bench_text_smoke(smollm2_path, tmp_path, capsys):
    importorskip("llama_cpp")
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
        assert math.isfinite(r["load_s"]) and r["load_s"] > 0
        assert_summary(r["prefill"], 48, 1)
        assert_summary(r["decode"], 16, 1)
        assert len(r["greedy_ids_head"]) == 16
    jx, lc = row["llava_jax"], row["llama_cpp"]
    assert math.isfinite(jx["compile_s"]) and jx["compile_s"] > 0
    assert set(row["ratio"]) == {"prefill", "decode", "load"}
    for kind in ("prefill", "decode"):  # llava_jax / llama.cpp, from the rates above
        assert row["ratio"][kind] == pytest.approx(jx[kind]["tps"] / lc[kind]["tps"], rel=0.01, abs=1e-3)
    assert row["ratio"]["load"] == pytest.approx(jx["load_s"] / lc["load_s"], rel=0.01, abs=1e-3)
    # same prompt, same greedy function (f32 vs llama.cpp's 8-bit activations on Q4_1): the first token agrees
    assert row["llava_jax"]["greedy_ids_head"][0] == row["llama_cpp"]["greedy_ids_head"][0]

