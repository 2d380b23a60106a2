"""Under `CI=true` (`.ci/run`) every prerequisite that tests would otherwise skip for must be there: the
shared llama.cpp references, llama-cpp-python (with mtmd), the test extras and the native decode kernels
(a kernel that fails to build fails the run). Outside CI those checks skip."""

from __future__ import annotations

import importlib

import pytest
from conftest import SHARED
from prerequisites import importorskip, in_ci, skip_or_fail

ci_only = pytest.mark.skipif(not in_ci(), reason="checks CI's prerequisites (set CI=true)")


@ci_only
def test_shared_references_present():
    for sub in ("smollm2/f32.json", "mm"):
        assert (SHARED / sub).exists(), f"{SHARED / sub} is missing: the parity tests would not run"


@ci_only
@pytest.mark.parametrize("module", ["llama_cpp", "llama_cpp.mtmd_cpp", "nbclient", "nbformat", "sentencepiece",
                                    "transformers", "torch", "safetensors", "matplotlib"])
def test_test_dependencies_import(module):
    importlib.import_module(module)


@ci_only
def test_native_decode_kernels_build():
    from llava_jax import cpu_kernels

    assert cpu_kernels.kernels_available(), f"decode kernels not available: {cpu_kernels.kernel_status()}"


@pytest.mark.parametrize("ci, outcome", [("true", pytest.fail.Exception), ("", pytest.skip.Exception)])
def test_skip_or_fail(ci, outcome, monkeypatch):
    """What the shared_reference fixture and `importorskip` do when something is missing: fail under CI."""
    monkeypatch.setenv("CI", ci)
    with pytest.raises(outcome):
        skip_or_fail("a prerequisite is missing")
    with pytest.raises(outcome):
        importorskip("llava_jax_no_such_module")
