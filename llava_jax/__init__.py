"""llava_jax: LLaVA 1.5 / 1.6 (LLaVA-NeXT) inference from GGUF files in JAX/XLA.

`import llava_jax` is cheap: the names that need JAX (`load`, `Llava`, `Tokenizer`, ...) are imported on
first use (module `__getattr__`), so the CLIs' `--help` and argument errors never pay the JAX import.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from llava_jax.errors import LlavaError

if TYPE_CHECKING:
    from llava_jax.model import GenerationResult, GenerationStream, Llava, load
    from llava_jax.tokenizer import Tokenizer

_LAZY = {"GenerationResult": "llava_jax.model", "GenerationStream": "llava_jax.model", "Llava": "llava_jax.model",
         "load": "llava_jax.model", "Tokenizer": "llava_jax.tokenizer"}

__all__ = ["GenerationResult", "GenerationStream", "Llava", "LlavaError", "Tokenizer", "load"]


def __getattr__(name: str):
    """The JAX-dependent names, imported when first asked for."""
    if name not in _LAZY:
        raise AttributeError(f"module 'llava_jax' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
