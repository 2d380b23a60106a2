"""LLaVA checkpoint → GGUF conversion (`python scripts/convert_llava.py MODEL_DIR --outdir OUT`).

`write_mmproj` (image encoder + projector → `mmproj-model-<type>.gguf`) and `write_language_model`
(LLaMA half + vocabulary → `ggml-model-<type>.gguf`) each take a checkpoint directory in any supported
layout (see `layouts`); `convert` writes both with one progress bar.
"""

from llava_jax.convert.cli import convert, main
from llava_jax.convert.language import write_language_model
from llava_jax.convert.mmproj import write_mmproj
from llava_jax.convert.writer import OUTTYPES

__all__ = ["OUTTYPES", "convert", "main", "write_language_model", "write_mmproj"]
