"""Smoke test of scripts/bench_serve.py on a tiny setting: llava_jax's server only (llama_cpp.server answers an
image question in 5-25 s on the 2-core machine, too slow for CI), one client count, 2 requests. The script starts
the server, warms it up, measures, stops it, and writes its JSON + markdown summary; every rate follows from the
reported counts and times (speed is not asserted)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from bench_script import assert_rate

REPO = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.slow]


def load_bench_serve():
    spec = importlib.util.spec_from_file_location("bench_serve", REPO / "scripts" / "bench_serve.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_serve_smoke(tmp_path, capsys):
    bench = load_bench_serve()
    out, md = tmp_path / "serve.json", tmp_path / "serve.md"
    argv = ["--engines", "llava_jax", "--concurrency", "2", "--requests", "2", "--max-tokens", "4", "--images", "2",
            "--slots", "2", "--ctx", "2048", "--no-warmup-burst", "--quiet-wait", "0", "--startup-timeout", "300",
            "-o", str(out), "--markdown", str(md), "--log-dir", str(tmp_path / "logs")]
    assert bench.main(argv) == 0, (tmp_path / "logs" / "llava_jax.log").read_text()[-3000:]
    result = json.loads(out.read_text())
    table = md.read_text()
    assert capsys.readouterr().out == table
    assert result["bench"] == "serve" and result["machine"]["cores"] >= 1
    assert result["settings"]["max_tokens"] == 4 and result["settings"]["concurrency"] == [2]
    assert list(result["engines"]) == ["llava_jax"]
    r = result["engines"]["llava_jax"]
    assert r["startup_s"] > 0 and r["model_id"]
    assert "-np" in r["cmd"] and r["cmd"][r["cmd"].index("-np") + 1] == "2"
    assert r["warmup"] == {"requests": 2, "errors": 0, "s": r["warmup"]["s"]} and r["warmup"]["s"] > 0
    (level,) = r["levels"]
    assert level["concurrency"] == 2 and level["requests"] == level["ok"] == 2 and level["errors"] == 0, level
    assert_rate(level["requests_per_s"], level["ok"], level["wall_s"])
    assert 0 < level["latency_p50_s"] <= level["latency_p95_s"] <= level["latency_max_s"] <= level["wall_s"] + 0.01
    assert 1 <= level["completion_tokens"] <= 2 * 4
    assert level["completion_tokens_per_s"] == pytest.approx(level["completion_tokens"] / level["wall_s"], rel=0.02, abs=0.02)
    assert level["prompt_tokens_mean"] > 576  # an image question: at least one tile's tokens
    assert level["metrics"]["llava_jax_slots_total"] == 2, sorted(level["metrics"])  # /metrics parsed
    assert 1 <= level["slots_busy_max_since_start"] <= 2
    # the markdown row says the same
    row = next(line for line in table.splitlines() if line.startswith("| llava_jax | 2 |"))
    assert f"| {level['requests_per_s']:.2f} | {level['latency_p50_s']} | {level['latency_p95_s']} |" in row


def test_make_images_are_different_pngs():
    bench = load_bench_serve()
    images = bench.make_images(4)
    assert len(set(images)) == 4 and all(u.startswith("data:image/png;base64,") for u in images)
    unique = bench.make_images(4, unique=10)
    assert len(set(unique)) == 10
