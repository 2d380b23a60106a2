"""Helpers shared by scripts/bench.py and its modes (bench_image.py, bench_batch.py)."""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import sys
import time
from pathlib import Path


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def cpu_busy(interval: float = 0.3) -> float:
    """Fraction of all cores busy (any process) over `interval` seconds, from /proc/stat."""
    def snap():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return sum(v), v[3] + v[4]  # total, idle + iowait

    t0, i0 = snap()
    time.sleep(interval)
    t1, i1 = snap()
    return 1.0 - (i1 - i0) / max(1, t1 - t0)


class Quiet:
    """Before each timed run, wait (up to `timeout` s) until the other processes leave the CPU idle.

    The machine is shared; a 2-thread run next to someone's test suite measures the contention, not
    the engine (llama.cpp's spinning threads suffer most: 4 tok/s instead of 40). Every wait's last
    busy reading is recorded, so a result taken on a busy machine says so.
    """

    def __init__(self, timeout: float, threshold: float = 0.1):
        self.timeout, self.threshold, self.readings = timeout, threshold, []

    def wait(self) -> None:
        if self.timeout <= 0:
            return
        t0 = time.perf_counter()
        while True:
            busy = cpu_busy()
            if busy <= self.threshold or time.perf_counter() - t0 > self.timeout:
                break
        self.readings.append(round(busy, 2))

    def summary(self) -> dict:
        r = self.readings
        return {"threshold": self.threshold, "timeout_s": self.timeout, "runs": len(r),
                "max_busy_before_run": max(r, default=None), "busy_runs": sum(b > self.threshold for b in r)}


def machine_info() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        mem_kb = int(Path("/proc/meminfo").read_text().split()[1])
    except OSError:
        mem_kb = 0
    import jax

    return {"cpu": cpu, "cores": os.cpu_count(), "mem_gib": round(mem_kb / 2**20, 1), "python": platform.python_version(),
            "jax": jax.__version__, "backend": jax.default_backend()}


def summarize(seconds: list[float], n_tokens: int) -> dict:
    best = min(seconds)
    return {"tokens": n_tokens, "best_s": round(best, 4), "median_s": round(statistics.median(seconds), 4),
            "tps": round(n_tokens / best, 2), "median_tps": round(n_tokens / statistics.median(seconds), 2),
            "runs_s": [round(s, 4) for s in seconds]}


@contextlib.contextmanager
def llama_cpp_without_extra_bufts():
    """Load llama.cpp models (llama_cpp.Llama, mtmd) with `use_extra_bufts=False` inside this block.

    Repacked (AMX / extra) CPU buffers crash on Q4_1 in these VMs. `Llama` calls the low-level module's
    function (llama_cpp.llama_cpp.llama_model_default_params), so that is the one replaced.
    """
    import llama_cpp

    low_level = llama_cpp.llama_cpp
    default_params = low_level.llama_model_default_params

    def no_extra_bufts():
        params = default_params()
        params.use_extra_bufts = False
        return params

    low_level.llama_model_default_params = no_extra_bufts
    try:
        yield llama_cpp
    finally:
        low_level.llama_model_default_params = default_params


_MTMD_LOG_SINK = None  # the ctypes callback must stay alive: llama.cpp keeps the pointer


def silence_mtmd_logs() -> None:
    """Send mtmd's (clip / image) log lines nowhere; once per process."""
    global _MTMD_LOG_SINK
    if _MTMD_LOG_SINK is None:
        import llama_cpp
        import llama_cpp.mtmd_cpp as mtmd

        _MTMD_LOG_SINK = llama_cpp.llama_log_callback(lambda level, text, user: None)
        mtmd.mtmd_helper_log_set(_MTMD_LOG_SINK, None)
        mtmd.mtmd_log_set(_MTMD_LOG_SINK, None)
