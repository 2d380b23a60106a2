"""llava_jax: LLaVA 1.5 / 1.6 (LLaVA-NeXT) inference from GGUF files in JAX/XLA."""

from llava_jax.errors import LlavaError
from llava_jax.model import GenerationResult, Llava, load
from llava_jax.tokenizer import Tokenizer

__all__ = ["GenerationResult", "Llava", "LlavaError", "Tokenizer", "load"]
