"""The notebook API: `llava_jax.load(model, mmproj=None, ...)` → `Llava`.

    llm = llava_jax.load("ggml-model-f16.gguf", mmproj="mmproj-model-f16.gguf")
    ids = llm.tokenize("Hello")                 # list[int]
    logits = llm.logits(ids)                    # f32 [len(ids), vocab], teacher forcing
    emb = llm.embed_image("cat.jpg")            # f32 [n_image_tokens, dim]
    out = llm.generate("What is in the image?", images=["cat.jpg"], max_new_tokens=64, temperature=0)
    out.text, out.token_ids, out.prompt_ids, out.timings
    stream = llm.stream("Once upon a time", max_new_tokens=32)   # its own handle: safe across threads
    for piece in stream: print(piece, end="")
    stream.result                               # GenerationResult (so far, after a `break`)
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace

import jax
import jax.numpy as jnp
import numpy as np

from llava_jax.config import TextConfig
from llava_jax.errors import LlavaError
from llava_jax.generate import IMAGE_PLACEHOLDER, Buckets, Request, TextEngine, Timings
from llava_jax.gguf_io import open_gguf
from llava_jax.params import load_text_params
from llava_jax.qtensor import WEIGHT_MODES
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
    stop_reason: str  # "eos", "length", "stop_string", "context", or "interrupted" (a stream left early)

    def as_dict(self) -> dict:
        return {"text": self.text, "token_ids": self.token_ids, "prompt_ids": self.prompt_ids,
                "stop_reason": self.stop_reason, "timings": self.timings.as_dict()}


class Llava:
    """A loaded language model (+ optional image encoder) on a mesh. Build it with `load`."""

    def __init__(self, path: str, metadata: dict, tensor_names: set[str], tokenizer: Tokenizer, engine: TextEngine,
                 n_ctx: int, image_encoder=None, load_s: float = 0.0):
        self.path, self.metadata, self.tensor_names = path, metadata, set(tensor_names)
        self.tokenizer, self.engine = tokenizer, engine
        self.cfg: TextConfig = engine.cfg
        self.n_ctx, self.image_encoder, self.load_s = n_ctx, image_encoder, load_s

    # ---- text ---------------------------------------------------------------------------------------
    def tokenize(self, text: str, add_bos: bool | None = None, parse_special: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_bos=self.tokenizer.add_bos if add_bos is None else add_bos,
                                     parse_special=parse_special)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode([i for i in ids if i >= 0])

    def logits(self, ids: Sequence[int], images: Sequence = (), image_embeds: Sequence[np.ndarray] = ()) -> np.ndarray:
        """f32 [len(ids), vocab]: teacher-forced logits of a token sequence.

        Image rows go where ids hold IMAGE_PLACEHOLDER (-1), in order: the embeddings of `images` (PIL
        images or paths, encoded here) or given `image_embeds` arrays [N_i, D], one per image.
        (`build_request(prompt, images).tokens` is such a sequence for a prompt with images.)
        """
        ids = list(ids)
        if not ids:
            raise LlavaError("logits() needs at least one token")
        if len(ids) > self.n_ctx:
            raise LlavaError(f"{len(ids)} tokens do not fit the context of {self.n_ctx}")
        embeds = list(image_embeds) + (self.embed_images(list(images)) if images else [])
        rows = np.concatenate([np.asarray(e, np.float32) for e in embeds]) if embeds else None
        return self.engine.logits(ids, rows)

    # ---- images -------------------------------------------------------------------------------------
    def _require_vision(self):
        if self.image_encoder is None:
            raise LlavaError("this model was loaded without an mmproj file: pass mmproj= (CLI: --mmproj) to use images")
        return self.image_encoder

    def embed_image(self, image) -> np.ndarray:
        """A PIL image or a path → f32 [n_image_tokens, dim], the rows that stand in the prompt for it."""
        return np.asarray(self._require_vision().embed([image])[0])

    # ---- prompts ------------------------------------------------------------------------------------
    def embed_images(self, images: Sequence, timings: Timings | None = None) -> list[np.ndarray]:
        """All tiles of all images through the ViT in one batched call → one [n_tokens_i, dim] array each."""
        if not images:
            return []
        t0 = time.perf_counter()
        embeds = [np.asarray(e) for e in self._require_vision().embed(list(images))]
        if timings is not None:
            timings.image_s += time.perf_counter() - t0
        return embeds

    def request_from_embeds(self, prompt: str, embeds: Sequence[np.ndarray], template: str | None = None,
                            max_new_tokens: int = 128, system: str | None = None) -> Request:
        """Prompt text + image embeddings → token ids with image placeholders and the rows to put there.

        Without images the prompt is used as is (special tokens parsed, BOS per the model's flag; the CLI
        templates a text-only prompt itself when a template is named). With images, a prompt containing
        `<image>` is the whole prompt; otherwise the chat template wraps it (with `system`, default the
        template's), images first. Text pieces are tokenized separately, as llama.cpp's mtmd does. An
        unknown template name is a LlavaError in both cases.
        """
        from llava_jax.prompts import ImageSlot, build_prompt, template_from_metadata

        if not embeds:
            if template is not None:
                build_prompt("", 0, template)  # the name is checked even where it is not applied
            return Request(self.tokenize(prompt), None, max_new_tokens)
        name = template or template_from_metadata(self.metadata)
        bos = [self.tokenizer.bos_id] if self.tokenizer.add_bos and self.tokenizer.bos_id is not None else []
        tokens: list[int] = list(bos)
        for seg in build_prompt(prompt, len(embeds), name, system):
            if isinstance(seg, ImageSlot):
                tokens += [IMAGE_PLACEHOLDER] * len(embeds[seg.index])
            else:
                tokens += self.tokenizer.encode(seg, add_bos=False, parse_special=True)
        return Request(tokens, np.concatenate(list(embeds), axis=0), max_new_tokens)

    def prompt_length(self, prompt: str, images: Sequence = (), template: str | None = None) -> int:
        """Tokens the prompt will take, images included, without running the ViT (from image sizes)."""
        from llava_jax.images import as_rgb

        encoder = self._require_vision() if images else None
        sizes = [as_rgb(img).size for img in images]
        shapes = [np.empty((encoder.n_tokens(size), 0), np.float32) for size in sizes]
        return len(self.request_from_embeds(prompt, shapes, template).tokens)

    def build_request(self, prompt: str, images: Sequence = (), template: str | None = None,
                      max_new_tokens: int = 128, timings: Timings | None = None, system: str | None = None) -> Request:
        """`request_from_embeds` with the images encoded here (their ViT time added to `timings`)."""
        return self.request_from_embeds(prompt, self.embed_images(images, timings), template, max_new_tokens, system)

    # ---- generation ---------------------------------------------------------------------------------
    def _sampling(self, temperature, top_k, top_p, min_p, repeat_penalty, repeat_last_n, seed) -> SamplingParams:
        """The sampler settings (validated by `SamplingParams`); repeat_last_n -1 is the whole context."""
        if repeat_last_n < -1:
            raise LlavaError(f"sampling: repeat_last_n must be >= -1 (-1 = the whole context), got {repeat_last_n}")
        if repeat_last_n == -1:  # llama.cpp's -1: the whole context
            repeat_last_n = self.n_ctx
        return SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                              repeat_penalty=repeat_penalty, repeat_last_n=repeat_last_n, seed=seed)

    def stream(self, prompt: str, images: Sequence = (), *, max_new_tokens: int = 128, temperature: float = 0.8,
               top_k: int = 40, top_p: float = 0.95, min_p: float = 0.05, repeat_penalty: float = 1.0,
               repeat_last_n: int = 64, seed: int | None = None, stop: Sequence[str] = (),
               template: str | None = None, system: str | None = None, ignore_eos: bool = False) -> GenerationStream:
        """Start a generation and return its handle: iterate it for the text as it is generated (one host
        sync per decode chunk); `handle.result` is the GenerationResult (partial after a `break`).

        The prompt is built (images encoded) and checked against the context here, before the first
        piece. Each call has its own handle, so threads streaming at once never see each other's results
        (`self.last_result`, the last finished stream's result, is kept for old code: it is shared).
        max_new_tokens < 0 (llama.cpp's -n -1): until EOS or the context is full.
        """
        sampling = self._sampling(temperature, top_k, top_p, min_p, repeat_penalty, repeat_last_n, seed)
        timings = Timings()
        if max_new_tokens < 0:
            max_new_tokens = self.n_ctx
        request = self.build_request(prompt, images, template, max_new_tokens, timings, system)
        _check_fits(request, self.n_ctx, self.cfg.context_length)
        stop_ids = frozenset() if ignore_eos else self.tokenizer.stop_ids
        steps = self.engine.generate([request], sampling, initial_key(sampling), self.n_ctx, stop_ids)
        return GenerationStream(self, request, _RowText(self.tokenizer, stop), steps, timings.image_s)

    def generate(self, prompt: str, images: Sequence = (), **kwargs) -> GenerationResult:
        """Run `stream` to the end and return text, token ids, prompt ids and timings."""
        stream = self.stream(prompt, images, **kwargs)
        for _ in stream:
            pass
        return stream.result

    def generate_batch(self, prompts: Sequence[str], images: Sequence[Sequence] | None = None, *,
                       max_new_tokens: int | Sequence[int] = 128, temperature: float = 0.8, top_k: int = 40,
                       top_p: float = 0.95, min_p: float = 0.05, repeat_penalty: float = 1.0, repeat_last_n: int = 64,
                       seed: int | None = None, stop: Sequence[str] = (), template: str | None = None,
                       ignore_eos: bool = False,
                       system: str | None = None) -> list[GenerationResult]:
        """Several prompts (each with 0, 1 or more images) in one ragged batch.

        All images of the batch go through the ViT in one call; the rows are left-padded to one bucketed
        length and decoded together, each stopping on its own EOS / stop string / limit. With greedy
        sampling each row's result equals running that row alone. Each row gets its own `Timings`
        (a copy of the batch's: the times and token counts are the whole batch's).
        """
        images = [list(x) for x in images] if images is not None else [[] for _ in prompts]
        if len(images) != len(prompts):
            raise LlavaError(f"{len(prompts)} prompts but {len(images)} image lists")
        limits = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
        limits = [self.n_ctx if n < 0 else n for n in limits]
        sampling = self._sampling(temperature, top_k, top_p, min_p, repeat_penalty, repeat_last_n, seed)
        timings = Timings()
        flat = self.embed_images([img for row in images for img in row], timings)
        requests, start = [], 0
        for prompt, row_images, limit in zip(prompts, images, limits, strict=True):
            requests.append(self.request_from_embeds(prompt, flat[start:start + len(row_images)], template, limit,
                                                     system))
            _check_fits(requests[-1], self.n_ctx, self.cfg.context_length)
            start += len(row_images)
        rows = [_RowText(self.tokenizer, stop) for _ in prompts]
        image_s = timings.image_s
        for step in self.engine.generate(requests, sampling, initial_key(sampling), self.n_ctx,
                                         frozenset() if ignore_eos else self.tokenizer.stop_ids):
            timings = step.timings
            for i, row in enumerate(rows):
                row.add(step.tokens[i], step.finished[i])
                if row.stopped:
                    step.finished[i] = True
        timings.image_s = image_s
        return [row.result(req, replace(timings), self._stop_reason(req, len(row.ids), req.max_new_tokens))
                for row, req in zip(rows, requests, strict=True)]

    def _stop_reason(self, request: Request, n_generated: int, max_new_tokens: int) -> str:
        if n_generated >= max_new_tokens:
            return "length"
        if len(request.tokens) + n_generated >= self.n_ctx:
            return "context"
        return "eos"

    # ---- weight cache -------------------------------------------------------------------------------
    def save_orbax(self, directory: str | os.PathLike) -> None:
        """Write the params as loaded (plain arrays in the compute dtype; quantized matrices as their blocks)
        plus metadata as an Orbax checkpoint; `load(directory)` restores them."""
        from llava_jax import checkpoint

        text, quantized = checkpoint.split_qtensors(self.engine.canonical_params())
        params = {"text": text}
        meta = {"text_metadata": self.metadata, "text_tensors": sorted(self.tensor_names),
                "dtype": jnp.dtype(self.engine.dtype).name, "scan_layers": self.engine.model.scan_layers,
                "quantized": quantized}
        enc = self.image_encoder
        if enc is not None:
            params["vision"] = {"params": enc.params} | ({"newline": enc.newline} if enc.newline is not None else {})
            meta["vision"] = {"metadata": enc.source_metadata, "tensor_shapes": enc.source_shapes, "name": enc.name,
                              "f16_weights": sorted(enc.f16_weights), "compat": enc.compat}
        checkpoint.save(directory, params, meta)


class _RowText:
    """Host-side text of one generated row: streaming detokenization and stop strings."""

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str]):
        self.decoder = StreamDecoder(tokenizer)
        self.stop = [s for s in stop if s]
        self.holdback = max((len(s) for s in self.stop), default=1) - 1
        self.ids: list[int] = []
        self.text = ""
        self.emitted = 0
        self.stopped = False  # a stop string was found

    def add(self, ids: list[int], finished: bool) -> str:
        """Take new ids; return the text that is now safe to show (held back: a possible stop-string prefix)."""
        if self.stopped:
            return ""
        self.ids += ids
        self.text += self.decoder.feed_many(ids)
        if finished:
            self.text += self.decoder.flush()
        hits = [self.text.find(s) for s in self.stop if s in self.text]
        if hits:
            self.text, self.stopped = self.text[: min(hits)], True
        done = finished or self.stopped
        upto = len(self.text) if done else max(self.emitted, len(self.text) - self.holdback)
        piece, self.emitted = self.text[self.emitted:upto], max(self.emitted, upto)
        return piece

    def result(self, request: Request, timings: Timings, reason: str) -> GenerationResult:
        return GenerationResult(self.text, self.ids, request.tokens, timings, "stop_string" if self.stopped else reason)

    def partial(self, request: Request, timings: Timings) -> GenerationResult:
        """The result of a row left before it finished: the text shown so far and every id received."""
        return GenerationResult(self.text[:self.emitted], list(self.ids), request.tokens, timings, "interrupted")


class GenerationStream:
    """The handle `Llava.stream` returns: an iterator of text pieces, plus `result` at any time.

    `result` is a GenerationResult: the whole result once the iteration has ended, and after a `break`
    (or before the first piece) the text yielded so far with stop_reason "interrupted". `close()` (or
    dropping the handle) ends the generation early. One handle per call, so nothing is shared between
    threads that stream at once.
    """

    def __init__(self, llm: Llava, request: Request, row: _RowText, steps: Iterator, image_s: float):
        self.request, self._llm, self._row, self._steps = request, llm, row, steps
        self._timings, self._image_s = Timings(), image_s
        self.finished = False
        self._pieces = self._run()

    def __iter__(self) -> GenerationStream:
        return self

    def __next__(self) -> str:
        return next(self._pieces)

    def close(self) -> None:
        self._pieces.close()

    def _run(self) -> Iterator[str]:
        for step in self._steps:
            self._timings = step.timings
            piece = self._row.add(step.tokens[0], step.finished[0])
            if self._row.stopped:
                step.finished[0] = True  # ends the engine's loop
            if piece:
                yield piece
        self.finished = True
        self._llm.last_result = self.result

    @property
    def result(self) -> GenerationResult:
        timings = replace(self._timings, image_s=self._image_s)
        if not self.finished:
            return self._row.partial(self.request, timings)
        reason = self._llm._stop_reason(self.request, len(self._row.ids), self.request.max_new_tokens)
        return self._row.result(self.request, timings, reason)


def _check_fits(request: Request, n_ctx: int, n_train: int) -> None:
    """A LlavaError (one line, both limits named truthfully) when the prompt leaves no room in the context."""
    n = len(request.tokens)
    if n < n_ctx:
        return
    n_img = sum(t == IMAGE_PLACEHOLDER for t in request.tokens)
    if n < n_train:
        hint = f"pass a larger -c (the model was trained on {n_train} tokens)"
    else:
        hint = f"shorten the prompt (the model was trained on {n_train} tokens; a -c above that runs past its training)"
    raise LlavaError(f"prompt is {n} tokens ({n - n_img} text + {n_img} image), context is {n_ctx}: {hint}")


def default_weights(platform: str | None = None) -> str:
    """"quantized" where a product reads blocks without an f32 copy of the model (XLA:CPU: the native
    kernels, and dequantize-in-program for prefill), "dequantized" elsewhere (GPU/TPU: unmeasured here)."""
    platform = platform or jax.default_backend()
    return "quantized" if platform == "cpu" else "dequantized"


def load(model: str | os.PathLike | None = None, mmproj: str | os.PathLike | None = None, dtype=None, mesh=None,
         n_ctx: int | None = None, scan_layers: bool | None = None, clip_compat: str = "llava",
         buckets: Buckets | None = None, decode_chunk: int = 16, weights: str | None = None, kv_dtype=None,
         notice=None) -> Llava:
    """Load a GGUF language model (default: the embedded SmolLM2) and optionally an mmproj file.

    model: a GGUF file, or a directory written by `Llava.save_orbax` (restored straight into the mesh's
        shardings; its dtype, layer layout and image encoder come from the checkpoint: a different
        `dtype` or `scan_layers` asked for is an error).
    dtype: compute dtype ("f32", "bf16", "f16" or a jnp dtype; default f32 on CPU, bf16 on GPU/TPU).
    mesh: a `jax.sharding.Mesh` with axes ("data", "model") (default: one device).
    n_ctx: context length (default min(4096, the model's); 0 = the model's).
    scan_layers: scan over stacked layers (default: unrolled on CPU, scanned elsewhere).
    clip_compat: "llava" (LLaVA's own image semantics) or "llama.cpp" (its mtmd graph).
    buckets: the compiled prompt / cache length buckets (`generate.Buckets`; default 32..256 by powers
        of two, then multiples of 256).
    decode_chunk: decode steps per jitted `lax.scan` call (one host sync each: text streams this often).
    weights: "quantized" (default on CPU) keeps each matrix in the file's block format in memory, read by
        the products directly (`qtensor.QTensor`); "dequantized" (default elsewhere) stores `dtype` arrays.
    kv_dtype: the KV cache's dtype (default: the compute dtype; "f16" halves it, llama.cpp's -ctk/-ctv f16).
    notice: called with one-line notes (e.g. a matrix kept dequantized: its type has no quantized product).

    Before any tensor is read, the memory the load needs (weights + KV cache at n_ctx + working set) is
    compared with what the device has (`memory.check_fits`): too little is one LlavaError line.
    """
    from llava_jax import checkpoint
    from llava_jax.defaults import smollm2_path

    t0 = time.perf_counter()
    mesh = mesh if mesh is not None else make_mesh()
    path = os.fspath(model) if model is not None else os.fspath(smollm2_path())
    if checkpoint.is_checkpoint(path):
        params, meta = checkpoint.restore(path, mesh)
        params["text"] = checkpoint.join_qtensors(params["text"], meta.get("quantized", {}))
        metadata, tensor_names = meta["text_metadata"], set(meta["text_tensors"])
        compute = jnp.dtype(meta["dtype"])
        if dtype is not None and resolve_dtype(dtype) != compute:
            raise LlavaError(f"{path} holds {compute.name} params, not {resolve_dtype(dtype).name}: "
                             "write the cache again with that --dtype (or drop --dtype)")
        if scan_layers is not None and scan_layers != meta["scan_layers"]:
            raise LlavaError(f"{path} holds {'scanned' if meta['scan_layers'] else 'unrolled'} layers: "
                             "write the cache again with that --scan-layers (or leave it on auto)")
        scan_layers = meta["scan_layers"]
    else:
        gguf = open_gguf(path)
        metadata, tensor_names = gguf.metadata, set(gguf.tensors)
        compute = resolve_dtype(dtype)
    weights = weights or default_weights(mesh.devices.flat[0].platform)
    if weights not in WEIGHT_MODES:
        raise LlavaError(f"unknown weights mode {weights!r} (choose from {', '.join(WEIGHT_MODES)})")
    kv = resolve_dtype(kv_dtype) if kv_dtype is not None else compute
    name = os.path.basename(path.rstrip("/"))
    cfg = TextConfig.from_metadata(metadata, tensor_names, name)
    tokenizer = Tokenizer.from_metadata(metadata)
    if tokenizer.vocab_size != cfg.vocab_size:
        raise LlavaError(f"{name}: tokenizer has {tokenizer.vocab_size} tokens, the model {cfg.vocab_size}")
    if n_ctx is None:
        n_ctx = min(DEFAULT_CTX, cfg.context_length)
    elif n_ctx == 0:
        n_ctx = cfg.context_length
    if n_ctx < 1:
        raise LlavaError(f"context length must be positive, got {n_ctx}")
    if scan_layers is None:
        scan_layers = jax.default_backend() != "cpu"
    if not checkpoint.is_checkpoint(path):
        _check_memory(gguf, cfg, n_ctx, compute, weights, kv, mmproj, mesh)

    image_encoder = None
    if checkpoint.is_checkpoint(path):
        if "vision" in meta and mmproj is None:
            image_encoder = _encoder_from_checkpoint(params["vision"], meta["vision"], mesh, compute)
        text_params = params["text"]
    else:
        text_params = None
    if mmproj is not None:
        from llava_jax.vision import ImageEncoder

        image_encoder = ImageEncoder.from_gguf(mmproj, mesh=mesh, dtype=compute, compat=clip_compat, text_dim=cfg.dim)
    if decode_chunk < 1:
        raise LlavaError(f"decode chunk must be >= 1, got {decode_chunk}")
    if text_params is None:
        text_params = load_text_params(gguf, cfg, mesh, compute, scan_layers=scan_layers, weights=weights,
                                       fuse=mesh.shape["model"] == 1, notice=notice)
    jax.block_until_ready(text_params)
    engine = TextEngine(cfg, text_params, mesh, compute, scan_layers, chunk=decode_chunk, buckets=buckets or Buckets(),
                        kv_dtype=kv)
    return Llava(path, metadata, tensor_names, tokenizer, engine, n_ctx, image_encoder, time.perf_counter() - t0)


def _check_memory(gguf, cfg: TextConfig, n_ctx: int, dtype, weights: str, kv_dtype, mmproj, mesh) -> None:
    """One LlavaError line, before any tensor is read, when the load cannot fit the device."""
    from llava_jax import memory

    mm = open_gguf(mmproj) if mmproj is not None else None
    platform = mesh.devices.flat[0].platform
    est = memory.estimate(gguf, cfg, n_ctx, dtype, weights, kv_dtype, mm)
    per_device = mesh.size if platform != "cpu" else 1  # CPU "devices" share one host's RAM
    if per_device > 1:
        est = memory.MemoryEstimate(est.weights // per_device, est.vision, est.kv_cache // per_device, est.working,
                                    est.kv_per_token // per_device, est.n_ctx)
    quantized = memory.estimate(gguf, cfg, n_ctx, dtype, "quantized", kv_dtype, mm) if weights != "quantized" else None
    memory.check_fits(est, platform, weights, quantized)


def _encoder_from_checkpoint(params: dict, meta: dict, mesh, dtype):
    from llava_jax.config import VisionConfig
    from llava_jax.mmproj import MMProj
    from llava_jax.vision import ImageEncoder

    shapes = {k: tuple(v) for k, v in meta["tensor_shapes"].items()}
    cfg = VisionConfig.from_metadata(meta["metadata"], shapes, meta["name"])
    mmproj = MMProj(cfg, params["params"], params.get("newline"), frozenset(meta["f16_weights"]), meta["name"],
                    meta["metadata"], shapes)
    return ImageEncoder(mmproj, meta["compat"], dtype, mesh)
