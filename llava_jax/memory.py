"""Memory known before it is spent: weights + KV cache + working set, from GGUF headers alone.

`estimate` reads only tensor types and shapes (no tensor data) and `check_fits` compares the total
with what the device has (host RAM on CPU: MemAvailable, or a cgroup limit; `bytes_limit` of the
first accelerator), raising one `LlavaError` line with the numbers and what would fit instead.
`LLAVA_JAX_MEMORY_LIMIT` (bytes, or e.g. "6GB" / "512MiB") overrides the available figure, e.g. to
keep a job under a quota; tests use it to ask for a refusal.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llava_jax.errors import LlavaError
from llava_jax.gguf_io import GGUFFile

GiB = 1 << 30
RUNTIME_BYTES = 600 << 20  # the JAX / XLA runtime, compiled programs, host-side buffers
ENV_LIMIT = "LLAVA_JAX_MEMORY_LIMIT"
_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "kib": 1 << 10, "m": 1e6, "mb": 1e6, "mib": 1 << 20,
          "g": 1e9, "gb": 1e9, "gib": 1 << 30}


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes a load will hold (weights, KV cache at the full context) plus the largest transient."""

    weights: int  # language model params as stored
    vision: int  # mmproj params as stored
    kv_cache: int  # K and V of every layer for n_ctx columns (batch rows)
    working: int  # largest temporaries: one dequantized weight, prefill activations, the runtime
    kv_per_token: int
    n_ctx: int

    @property
    def total(self) -> int:
        return self.weights + self.vision + self.kv_cache + self.working

    def describe(self) -> str:
        return (f"~{self.total / GiB:.1f} GiB (weights {self.weights / GiB:.1f}, mmproj {self.vision / GiB:.1f}, "
                f"KV cache {self.kv_cache / GiB:.1f} at -c {self.n_ctx}, working set {self.working / GiB:.1f})")


def parse_bytes(text: str) -> int:
    m = re.fullmatch(r"\s*([0-9.]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise LlavaError(f"{ENV_LIMIT}={text!r}: expected bytes, e.g. 6GB or 512MiB")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def _stored_bytes(view, matrix: bool, quantized: bool, itemsize: int) -> int:
    """Bytes of one tensor as the loader stores it (see `params.place_leaf`)."""
    from llava_jax.qtensor import STORABLE

    if matrix and quantized and view.qtype in STORABLE:
        return int(view.raw.nbytes)
    return int(np.prod(view.shape, dtype=np.int64)) * (itemsize if matrix else 4)


def estimate(gguf: GGUFFile, cfg, n_ctx: int, dtype, weights: str, kv_dtype=None, mmproj: GGUFFile | None = None,
             batch: int = 1, prompt_tokens: int = 1024) -> MemoryEstimate:
    """The memory a load of `gguf` (+ `mmproj`) with these settings needs; reads headers only."""
    from llava_jax.weights import BY_KIND, kind_of

    itemsize = np.dtype(dtype).itemsize
    total, largest = 0, 0
    for name in cfg.expected_tensors():
        view = gguf.tensors[name]
        matrix = BY_KIND[kind_of(name)].storage == "matrix"
        total += _stored_bytes(view, matrix, weights == "quantized", itemsize)
        if matrix:
            largest = max(largest, int(np.prod(view.shape, dtype=np.int64)) * itemsize)
    vision = 0
    if mmproj is not None:  # the vision tower is dequantized at load (f32 norms and biases, weights in dtype)
        vision = sum(int(np.prod(v.shape, dtype=np.int64)) * (itemsize if len(v.shape) > 1 else 4)
                     for v in mmproj.tensors.values())
    kv_item = np.dtype(kv_dtype if kv_dtype is not None else dtype).itemsize
    per_token = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * kv_item * batch
    t = min(n_ctx, prompt_tokens) * batch
    activations = t * (4 * cfg.dim + 3 * cfg.ffn_dim + cfg.vocab_size // 8) * 4  # a prefill chunk's largest live set
    working = 2 * largest + activations + RUNTIME_BYTES
    return MemoryEstimate(total, vision, per_token * n_ctx, working, per_token, n_ctx)


def available_bytes(platform: str) -> tuple[int, str]:
    """(bytes free for this process, where the figure comes from)."""
    env = os.environ.get(ENV_LIMIT)
    if env:
        return parse_bytes(env), ENV_LIMIT
    if platform != "cpu":
        import jax

        stats = jax.devices()[0].memory_stats() or {}
        if "bytes_limit" in stats:
            return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0)), f"{platform} memory"
        return 1 << 62, "unknown"
    avail = _meminfo_available()
    cgroup = _cgroup_free()
    if cgroup is not None and cgroup < avail:
        return cgroup, "cgroup memory limit"
    return avail, "host RAM (MemAvailable)"


def _meminfo_available() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


def _cgroup_free() -> int | None:
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit == "max":
            return None
        used = int(Path("/sys/fs/cgroup/memory.current").read_text())
        return int(limit) - used
    except (OSError, ValueError):
        return None


def check_fits(est: MemoryEstimate, platform: str, weights: str, quantized_est: MemoryEstimate | None = None) -> None:
    """Raise one LlavaError line when `est` exceeds the available memory, naming what would fit."""
    avail, source = available_bytes(platform)
    if est.total <= avail:
        return
    hints = []
    if weights != "quantized" and quantized_est is not None and quantized_est.total <= avail:
        hints.append(f"--weights quantized ({quantized_est.total / GiB:.1f} GiB)")
    room = avail - (est.total - est.kv_cache)
    if room > 0 and est.kv_per_token:
        fit = int(room // est.kv_per_token) // 256 * 256
        if fit >= 256:
            hints.append(f"-c {fit}")
    what = "; would fit: " + ", ".join(hints) if hints else "; no smaller setting fits"
    raise LlavaError(f"not enough memory: this load needs {est.describe()}, {source} has {avail / GiB:.1f} GiB{what}")
