"""Smoke test of `scripts/bench.py --mode batch` (scripts/bench_batch.py): a tiny run of both engines yields
JSON whose counts are what was asked for and whose rates / ratios follow from its times (speed is not asserted)."""

from __future__ import annotations

import json
import math

import pytest
from bench_script import assert_rate, load_bench
from prerequisites import importorskip

pytestmark = [pytest.mark.slow, pytest.mark.llamacpp]



def test_bench_batch_smoke(smollm2_path, tmp_path, capsys):
    importorskip("llama_cpp.mtmd_cpp")
    bench = load_bench()
    out = tmp_path / "bench_batch.json"
    # 3 items in batches of 1 and 2: batch size 2 ends with a ragged batch of one (its own warm-up shape)
    argv = ["--mode", "batch", "-m", str(smollm2_path), "--llama-cpp", "--batch-items", "3", "--batch-sizes", "1,2",
            "--batch-new-tokens", "4", "--batch-image-sizes", "64x48,40x56", "--batch-repeats", "1", "--repeats", "1",
            "--quiet-wait", "0", "-o", str(out)]
    assert bench.main(argv) == 0
    result = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out) == result
    assert result["mode"] == "batch" and result["machine"]["cores"] >= 1
    assert result["items"] == 3 and result["new_tokens_per_item"] == 4 and result["batch_sizes"] == [1, 2]
    assert result["clip_compat"] == "llama.cpp" and result["template"]

    jx, lc = result["llava_jax"], result["llama_cpp"]
    assert jx["load_s"] > 0 and lc["load_s"] > 0
    rows = jx["batch"]
    assert [r["batch_size"] for r in rows] == [1, 2] and [r["batches"] for r in rows] == [3, 2]
    for r in [*rows, lc]:
        assert r["items"] == 3
        assert_rate(r["images_per_s"], 3, r["wall_s"])  # one image per item
        assert r["generated"]["tokens"] == 3 * 4 and r["generated"]["tps"] == r["tokens_per_s"]
        assert_rate(r["tokens_per_s"], 3 * 4, r["wall_s"])
        assert math.isfinite(r["warmup"]["wall_s"]) and r["warmup"]["wall_s"] > 0
        assert [len(x) for x in r["ids_head"]] == [4, 4, 4]
    for r in rows:
        assert r["warmup"]["compile_s"] > 0 and r["compile_in_timed_s"] == 0  # compilation stays out of the timing
        assert r["warmup"]["compile_s"] <= r["warmup"]["wall_s"]
        assert r["padded_prompt_tokens"] >= r["prompt_tokens"] > 3 * 576  # one 576-token image per item
        assert set(r["ratio_vs_llama_cpp"]) == {"images_per_s", "tokens_per_s"}
        for key, ratio in r["ratio_vs_llama_cpp"].items():  # llava_jax / llama.cpp, from the rates above
            assert ratio == pytest.approx(r[key] / lc[key], rel=0.01, abs=1e-3), key
        assert 0 <= r["answers_equal_to_llama_cpp"] <= 3
    assert lc["threads"] == 2 and lc["prompt_tokens"] == rows[0]["prompt_tokens"]
    assert lc["same_prompt_tokens_as_llava_jax"]  # the same text pieces and image tokens in both engines
    # batching does not change greedy answers: batch size 2 (ragged rows) equals batch size 1
    assert rows[1]["answers_equal_to_first_batch_size"] == 3
    assert rows[1]["ids_head"] == rows[0]["ids_head"]
