"""How tests skip for a missing prerequisite: locally a skip, under `CI=true` (`.ci/run`) a failure."""

from __future__ import annotations

import importlib
import os

import pytest


def in_ci() -> bool:
    """True under CI (`CI=true`, as `.ci/run` and the usual CI services set it)."""
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def skip_or_fail(reason: str) -> None:
    """Skip the test locally; fail it under CI, where every prerequisite must be there."""
    if in_ci():
        pytest.fail(f"CI=true: {reason}", pytrace=False)
    pytest.skip(reason)


def importorskip(name: str):
    """`pytest.importorskip`, but a missing module fails the test under CI (`.ci/run` installs them all)."""
    try:
        return importlib.import_module(name)
    except ImportError as e:
        skip_or_fail(f"cannot import {name}: {e}")
