"""The notebook API: `llava_jax.load(model, mmproj=None, ...)` → `Llava`.

    llm = llava_jax.load("ggml-model-f16.gguf", mmproj="mmproj-model-f16.gguf")
    ids = llm.tokenize("Hello")                 # list[int]
    logits = llm.logits(ids)                    # f32 [len(ids), vocab], teacher forcing
    emb = llm.embed_image("cat.jpg")            # f32 [n_image_tokens, dim]
    out = llm.generate("What is in the image?", images=["cat.jpg"], max_new_tokens=64, temperature=0)
    out.text, out.token_ids, out.prompt_ids, out.timings
    for piece in llm.stream("Once upon a time", max_new_tokens=32): print(piece, end="")
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from llava_jax.config import TextConfig
from llava_jax.errors import LlavaError
from llava_jax.generate import IMAGE_PLACEHOLDER, Request, TextEngine, Timings
from llava_jax.gguf_io import open_gguf
from llava_jax.params import load_text_params
from llava_jax.sampling import SamplingParams, initial_key
from llava_jax.sharding import make_mesh
from llava_jax.tokenizer import StreamDecoder, Tokenizer

DTYPES = {"f32": jnp.float32, "float32": jnp.float32, "bf16": jnp.bfloat16, "bfloat16": jnp.bfloat16,
          "f16": jnp.float16, "float16": jnp.float16}
DEFAULT_CTX = 4096


def default_dtype(platform: str | None = None):
    """f32 on CPU (XLA:CPU runs bf16/f16 dots ~30x slower than f32), bf16 on GPU/TPU."""
    platform = platform or jax.default_backend()
    return jnp.float32 if platform == "cpu" else jnp.bfloat16


def resolve_dtype(dtype) -> jnp.dtype:
    if dtype is None:
        return jnp.dtype(default_dtype())
    if isinstance(dtype, str):
        if dtype.lower() not in DTYPES:
            raise LlavaError(f"unknown dtype {dtype!r} (choose from f32, bf16, f16)")
        return jnp.dtype(DTYPES[dtype.lower()])
    return jnp.dtype(dtype)


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    prompt_ids: list[int]  # image positions are IMAGE_PLACEHOLDER (-1)
    timings: Timings
    stop_reason: str  # "eos", "length", "stop_string" or "context"

    def as_dict(self) -> dict:
        return {"text": self.text, "token_ids": self.token_ids, "prompt_ids": self.prompt_ids,
                "stop_reason": self.stop_reason, "timings": self.timings.as_dict()}


class Llava:
    """A loaded language model (+ optional image encoder) on a mesh. Build it with `load`."""

    def __init__(self, path: str, metadata: dict, tokenizer: Tokenizer, engine: TextEngine, n_ctx: int,
                 image_encoder=None, load_s: float = 0.0):
        self.path, self.metadata, self.tokenizer, self.engine = path, metadata, tokenizer, engine
        self.cfg: TextConfig = engine.cfg
        self.n_ctx, self.image_encoder, self.load_s = n_ctx, image_encoder, load_s

    # ---- text ---------------------------------------------------------------------------------------
    def tokenize(self, text: str, add_bos: bool | None = None, parse_special: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_bos=self.tokenizer.add_bos if add_bos is None else add_bos,
                                     parse_special=parse_special)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode([i for i in ids if i >= 0])

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        """f32 [len(ids), vocab]: teacher-forced logits of a token sequence."""
        ids = list(ids)
        if not ids:
            raise LlavaError("logits() needs at least one token")
        if len(ids) > self.n_ctx:
            raise LlavaError(f"{len(ids)} tokens do not fit the context of {self.n_ctx}")
        return self.engine.logits(ids)

    # ---- images -------------------------------------------------------------------------------------
    def _require_vision(self):
        if self.image_encoder is None:
            raise LlavaError("this model was loaded without an mmproj file: pass mmproj= (CLI: --mmproj) to use images")
        return self.image_encoder

    def embed_image(self, image) -> np.ndarray:
        """A PIL image or a path → f32 [n_image_tokens, dim], the rows that stand in the prompt for it."""
        return np.asarray(self._require_vision().embed([image])[0])

    # ---- prompts ------------------------------------------------------------------------------------
    def build_request(self, prompt: str, images: Sequence = (), template: str | None = None,
                      max_new_tokens: int = 128, timings: Timings | None = None) -> Request:
        """Prompt text (+ images) → token ids with image placeholders and the image rows to put there.

        Without images the prompt is used as is (special tokens parsed, BOS per the model's flag). With
        images, a prompt containing `<image>` is the whole prompt; otherwise the chat template wraps it.
        """
        if not images:
            return Request(self.tokenize(prompt), None, max_new_tokens)
        from llava_jax.prompts import ImageSlot, build_prompt, template_from_metadata

        encoder = self._require_vision()
        t0 = time.perf_counter()
        embeds = [np.asarray(e) for e in encoder.embed(list(images))]
        if timings is not None:
            timings.image_s += time.perf_counter() - t0
        name = template or template_from_metadata(self.metadata)
        tokens: list[int] = []
        for i, seg in enumerate(build_prompt(prompt, len(images), name)):
            if isinstance(seg, ImageSlot):
                tokens += [IMAGE_PLACEHOLDER] * len(embeds[seg.index])
            else:
                tokens += self.tokenizer.encode(seg, add_bos=self.tokenizer.add_bos and i == 0, parse_special=True)
        if self.tokenizer.add_bos and tokens and tokens[0] == IMAGE_PLACEHOLDER and self.tokenizer.bos_id is not None:
            tokens.insert(0, self.tokenizer.bos_id)
        return Request(tokens, np.concatenate(embeds, axis=0), max_new_tokens)

    # ---- generation ---------------------------------------------------------------------------------
    def stream(self, prompt: str, images: Sequence = (), *, max_new_tokens: int = 128, temperature: float = 0.8,
               top_k: int = 40, top_p: float = 0.95, min_p: float = 0.05, repeat_penalty: float = 1.0,
               repeat_last_n: int = 64, seed: int | None = None, stop: Sequence[str] = (),
               template: str | None = None) -> Iterator[str]:
        """Yield text as it is generated (one host sync per decode chunk); `self.last_result` holds the result."""
        sampling = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                                  repeat_penalty=repeat_penalty, repeat_last_n=repeat_last_n, seed=seed)
        timings = Timings()
        if max_new_tokens < 0:  # llama.cpp's -n -1: until EOS or the context is full
            max_new_tokens = self.n_ctx
        request = self.build_request(prompt, images, template, max_new_tokens, timings)
        image_s = timings.image_s
        decoder = StreamDecoder(self.tokenizer)
        ids: list[int] = []
        text = ""
        emitted = 0
        holdback = max((len(s) for s in stop), default=1) - 1
        reason = "length"
        for step in self.engine.generate([request], sampling, initial_key(sampling), self.n_ctx,
                                         self.tokenizer.stop_ids):
            timings = step.timings
            ids += step.tokens[0]
            text += decoder.feed_many(step.tokens[0])
            if step.finished[0]:
                text += decoder.flush()
            hit = min((text.find(s) for s in stop if s and s in text), default=-1)
            if hit >= 0:
                text, reason = text[:hit], "stop_string"
            done = step.finished[0] or hit >= 0
            upto = len(text) if done else max(emitted, len(text) - holdback)
            if upto > emitted:
                yield text[emitted:upto]
                emitted = upto
            if done:
                if hit < 0:
                    reason = self._stop_reason(request, len(ids), max_new_tokens)
                break
        timings.image_s = image_s
        self.last_result = GenerationResult(text, ids, request.tokens, timings, reason)

    def _stop_reason(self, request: Request, n_generated: int, max_new_tokens: int) -> str:
        if n_generated >= max_new_tokens:
            return "length"
        if len(request.tokens) + n_generated >= self.n_ctx:
            return "context"
        return "eos"

    def generate(self, prompt: str, images: Sequence = (), **kwargs) -> GenerationResult:
        """Run `stream` to the end and return text, token ids, prompt ids and timings."""
        for _ in self.stream(prompt, images, **kwargs):
            pass
        return self.last_result


def load(model: str | os.PathLike | None = None, mmproj: str | os.PathLike | None = None, dtype=None, mesh=None,
         n_ctx: int | None = None, scan_layers: bool | None = None, clip_compat: str = "llava") -> Llava:
    """Load a GGUF language model (default: the embedded SmolLM2) and optionally an mmproj file.

    dtype: compute dtype ("f32", "bf16", "f16" or a jnp dtype; default f32 on CPU, bf16 on GPU/TPU).
    mesh: a `jax.sharding.Mesh` with axes ("data", "model") (default: one device).
    n_ctx: context length (default min(4096, the model's); 0 = the model's).
    scan_layers: scan over stacked layers (default: unrolled on CPU, scanned elsewhere).
    """
    from llava_jax.defaults import smollm2_path

    t0 = time.perf_counter()
    path = os.fspath(model) if model is not None else os.fspath(smollm2_path())
    gguf = open_gguf(path)
    cfg = TextConfig.from_metadata(gguf.metadata, set(gguf.tensors), gguf.name)
    tokenizer = Tokenizer.from_metadata(gguf.metadata)
    if tokenizer.vocab_size != cfg.vocab_size:
        raise LlavaError(f"{gguf.name}: tokenizer has {tokenizer.vocab_size} tokens, the model {cfg.vocab_size}")
    if n_ctx is None:
        n_ctx = min(DEFAULT_CTX, cfg.context_length)
    elif n_ctx == 0:
        n_ctx = cfg.context_length
    if n_ctx < 1:
        raise LlavaError(f"context length must be positive, got {n_ctx}")
    mesh = mesh if mesh is not None else make_mesh()
    compute = resolve_dtype(dtype)
    if scan_layers is None:
        scan_layers = jax.default_backend() != "cpu"
    image_encoder = None
    if mmproj is not None:
        from llava_jax.vision import ImageEncoder

        image_encoder = ImageEncoder.from_gguf(mmproj, mesh=mesh, dtype=compute, compat=clip_compat, text_dim=cfg.dim)
    params = load_text_params(gguf, cfg, mesh, compute, scan_layers=scan_layers)
    jax.block_until_ready(params)
    engine = TextEngine(cfg, params, mesh, compute, scan_layers)
    return Llava(path, gguf.metadata, tokenizer, engine, n_ctx, image_encoder, time.perf_counter() - t0)
