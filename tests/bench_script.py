"""scripts/bench.py imported as a module, and the checks the bench smoke tests share."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def load_bench():
    spec = importlib.util.spec_from_file_location("bench", REPO / "scripts" / "bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def assert_rate(rate: float, count: float, seconds: float) -> None:
    """A reported rate is finite, positive and equals count / seconds (up to the JSON's rounding)."""
    assert math.isfinite(rate) and seconds > 0 and rate > 0, (rate, count, seconds)
    assert rate == pytest.approx(count / seconds, rel=0.02, abs=0.02), (rate, count, seconds)


def assert_summary(s: dict, tokens: int, runs: int) -> None:
    """`bench_common.summarize` output: the asked-for token count, one time per run, rates from the times."""
    assert s["tokens"] == tokens and len(s["runs_s"]) == runs
    assert s["best_s"] == min(s["runs_s"]) and min(s["runs_s"]) <= s["median_s"] <= max(s["runs_s"])
    assert_rate(s["tps"], tokens, s["best_s"])
    assert_rate(s["median_tps"], tokens, s["median_s"])
