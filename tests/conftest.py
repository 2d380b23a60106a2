"""Shared fixtures: the real SmolLM2 GGUF (fetched once into the cache) and the shared references.

Under `CI=true` (set by `.ci/run`) a missing prerequisite that would skip tests (the shared llama.cpp
references, llama-cpp-python, the native decode kernels) fails them instead, so CI cannot pass by
checking less (`prerequisites.skip_or_fail` / `prerequisites.importorskip`; test_prerequisites checks
the rest).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from prerequisites import importorskip, skip_or_fail

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "reference"


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    from llava_jax.defaults import smollm2_path

    return smollm2_path()


@pytest.fixture(scope="session")
def shared_reference() -> Path:
    if not SHARED.exists():
        skip_or_fail(f"reference directory {SHARED} is missing")
    return SHARED


@pytest.fixture(scope="session")
def smollm2_reference(shared_reference) -> dict:
    """llama.cpp's outputs on the F32 rewrite of the SmolLM2 file: a list of per-prompt dicts."""
    return json.loads((shared_reference / "smollm2" / "f32.json").read_text())


@pytest.fixture(scope="module")
def llama_cpp_mod():
    """llama_cpp with models loaded with use_extra_bufts=False (its AMX / repacked CPU buffers crash in these VMs)."""
    llama_cpp = importorskip("llama_cpp")
    import llama_cpp.llama as llama_module

    orig = llama_cpp.llama_model_default_params

    def params():  # the AMX / repacked CPU buffers crash in these VMs
        p = orig()
        p.use_extra_bufts = False
        return p

    llama_cpp.llama_model_default_params = params
    llama_module.llama_cpp.llama_model_default_params = params
    yield llama_cpp
    llama_cpp.llama_model_default_params = orig
    llama_module.llama_cpp.llama_model_default_params = orig
