"""Smoke test of `scripts/bench.py --mode image` (scripts/bench_image.py) on a tiny random mmproj: both engines
encode the same images, the embeddings agree, and every rate / ratio follows from the reported times (speed is not
asserted)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from bench_script import assert_rate, assert_summary, load_bench
from prerequisites import importorskip

pytestmark = [pytest.mark.slow, pytest.mark.llamacpp]


def test_bench_image_smoke(smollm2_path, tmp_path, monkeypatch, capsys):
    importorskip("llama_cpp")
    monkeypatch.setenv("LLAVA_JAX_CACHE", str(tmp_path / "cache"))  # the generated mmproj goes here
    bench = load_bench()
    out = tmp_path / "bench_image.json"
    argv = ["--mode", "image", "-m", str(smollm2_path), "--llama-cpp", "--mmproj-preset", "default", "--repeats", "1",
            "--quiet-wait", "0", "-o", str(out)]
    assert bench.main(argv) == 0
    result = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out) == result
    assert result["mode"] == "image" and result["machine"]["cores"] >= 1
    mmproj = Path(result["mmproj"]["path"])
    assert mmproj.parent == tmp_path / "cache" and mmproj.exists()
    assert result["mmproj"]["generated"]["preset"] == "default" and result["mmproj"]["generated"]["out_dim"] == 576
    assert result["llava_jax"]["clip_compat"] == "llama.cpp"
    jx, lc = result["llava_jax"], result["llama_cpp"]
    assert jx["load_s"] > 0 and lc["load_s"] > 0 and lc["threads"] == 2
    assert set(jx["images"]) == set(lc["images"]) == {"single", "anyres"}  # the tiny file has grid pinpoints
    for name, want_tiles in (("single", 1), ("anyres", 5)):
        a, b = jx["images"][name], lc["images"][name]
        assert a["tiles"] == b["chunks"] == want_tiles
        assert a["tokens"] == b["tokens"] == 576 * want_tiles
        assert a["size"] == b["size"]
        assert a["compile_s"] > 0 and a["first_s"] > 0 and b["first_s"] > 0
        assert all(math.isfinite(x) for x in (a["compile_s"], a["first_s"], b["first_s"]))
        for r in (a, b):
            for kind in ("encode", "embed"):
                t = r[kind]
                assert_summary(t, r["tokens"], 1)
                assert_rate(t["images_per_s"], 1, t["best_s"])
        assert set(result["ratio"][name]) == {"encode", "embed"}
        for kind, ratio in result["ratio"][name].items():  # llava_jax / llama.cpp, from the rates above
            assert ratio == pytest.approx(a[kind]["images_per_s"] / b[kind]["images_per_s"], rel=0.01, abs=1e-3), kind
        # compat mode computes llama.cpp's function: the embeddings agree (measured ~3e-4 of values up to ~0.6)
        agree = result["agreement"][name]
        assert agree["max_abs_diff"] < 1e-2 * max(1.0, agree["max_abs"]), agree
    assert result["quiet"]["runs"] == 0  # --quiet-wait 0: no waiting
