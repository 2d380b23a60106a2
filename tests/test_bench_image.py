"""Smoke test of `scripts/bench.py --mode image` (scripts/bench_image.py) on a tiny random mmproj: both engines
encode the same images and the JSON is well-formed (speed is not asserted)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from bench_script import load_bench

pytestmark = [pytest.mark.slow, pytest.mark.llamacpp]


def test_bench_image_smoke(smollm2_path, tmp_path, monkeypatch, capsys):
    pytest.importorskip("llama_cpp")
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
        for r in (a, b):
            for kind in ("encode", "embed"):
                t = r[kind]
                assert t["tokens"] == r["tokens"] and len(t["runs_s"]) == 1
                assert t["best_s"] > 0 and t["median_s"] > 0 and t["images_per_s"] > 0 and t["tps"] > 0
        assert set(result["ratio"][name]) == {"encode", "embed"}
        assert all(v > 0 for v in result["ratio"][name].values())
        # compat mode computes llama.cpp's function: the embeddings agree (measured ~3e-4 of values up to ~0.6)
        agree = result["agreement"][name]
        assert agree["max_abs_diff"] < 1e-2 * max(1.0, agree["max_abs"]), agree
    assert result["quiet"]["runs"] == 0  # --quiet-wait 0: no waiting
