"""Every preprocessor branch of the native kernels compiles, whatever CPU runs the tests.

`-march=native` compiles only the branches of this machine's CPU (AMX, AVX-512 VNNI, AVX2...), so a
branch for another CPU could fail to compile unseen and leave that CPU's users with no kernels at all
(as happened to the no-AMX branch once: every AMD machine lost the decode kernels). Each case swaps
`-march=native` for a named target and asks the compiler to check the sources (`-fsyntax-only`:
parsing and template instantiation, ~3 s a target, no code generated).
"""

from __future__ import annotations

import platform
import subprocess

import pytest

from llava_jax import cpu_kernels

TARGETS = {
    "amx + avx512-vnni": ("-march=sapphirerapids",),
    "avx512-vnni, no amx (AMD Zen 4/5)": ("-march=sapphirerapids", "-mno-amx-tile", "-mno-amx-bf16", "-mno-amx-int8"),
    "avx512, no vnni": ("-march=skylake-avx512",),
    "avx2 + fma": ("-march=x86-64-v3",),
    "sse4 only": ("-march=x86-64-v2",),
}

compiler = cpu_kernels._compiler()
pytestmark = [pytest.mark.skipif(compiler is None, reason="no C++ compiler"),
              pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 targets")]


@pytest.mark.parametrize("target", TARGETS)
def test_the_kernels_compile_for(target, tmp_path):
    flags = tuple(f for f in cpu_kernels.FLAGS if f != "-march=native") + TARGETS[target] + ("-fsyntax-only",)
    proc = subprocess.run(cpu_kernels.compile_command(compiler, tmp_path / "k.so", flags),
                          capture_output=True, text=True, timeout=300)
    errors = [ln for ln in proc.stderr.splitlines() if "error" in ln]
    assert proc.returncode == 0, "\n".join(errors[:10]) or proc.stderr[-2000:]
