"""The slot scheduler: continuous batching over one batched KV cache, in one thread that owns JAX.

`-np` slots are the rows of one KV cache (`TextEngine`'s layout: every row writes the same column C at
each step, row r's text sits in [kv_start[r], C)). Each loop iteration admits waiting jobs into free rows,
then decodes one chunk (`TextEngine.chunk` steps, one host sync) for every busy row:

* admit: the job's images go through the embedding cache (encoded alone on a miss, so an image's rows
  never depend on what it was batched with), its prompt is prefilled alone (batch 1, left-padded to its
  bucket: `TextEngine.generate`'s own prefill program) and the first token sampled; the prefilled K/V
  are copied into columns [C - n, C) of the row (`slot_ops.join_row`), so the row joins the next chunk.
* decode: rows whose job finished (EOS, stop string, max_tokens, context) or was cancelled (a client
  gone) are freed at once; free rows decode garbage that nobody reads. When C would pass the cache's
  end, every row shifts left by C - (longest busy span) (`slot_ops.shift_columns`).

Greedy rows get the argmax of the same logits they would get alone, so each row's greedy answer equals
`Llava.generate(..., temperature=0)` on it. Jobs come in through `submit` (any thread); results go out
through each job's `emit` callback, called from the engine thread (the HTTP layer hands them to its
event loop with `call_soon_threadsafe`).
"""

from __future__ import annotations

import secrets
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache

import numpy as np

from llava_jax.errors import LlavaError
from llava_jax.serving.slot_ops import RECENT, TOP_LOGPROBS, SampleMode


@dataclass
class RowSampling:
    """One request's sampler settings (validated by the HTTP layer). temperature 0 = greedy."""

    temperature: float = 1.0
    top_k: int = 40
    top_p: float = 1.0
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    seed: int | None = None


@dataclass
class ImageInput:
    key: str  # `image_cache.image_key` of its bytes
    image: object  # a decoded RGB PIL image


@dataclass
class Job:
    """One generation request. `tokens` hold IMAGE_PLACEHOLDER (-1) rows where `images`' embeddings go.

    `emit(event)` gets dicts: {"type": "delta", "text", "tokens", "logprobs"}, then one {"type": "done",
    "finish_reason", "prompt_tokens", "completion_tokens"} or {"type": "error", "status", "message"}."""

    id: str
    tokens: list[int]
    images: list[ImageInput]
    max_tokens: int
    sampling: RowSampling
    emit: Callable[[dict], None]
    stop: list[str] = field(default_factory=list)
    logprobs: bool = False
    ignore_eos: bool = False
    timeout_s: float | None = None
    endpoint: str = "chat"
    arrived: float = field(default_factory=time.monotonic)
    cancelled: bool = False  # set by the HTTP layer (client gone); the engine frees the row at the next sync

    def cancel(self) -> None:
        self.cancelled = True


@cache
def _decode_program(model):
    """The jitted chunk decode of one decoder (shared by the engines of a process: compiled once per shape)."""
    import jax

    from llava_jax.serving import slot_ops

    def decode(params, cache, *args, n_steps, kv_window, mode):
        return slot_ops.decode_rows(model, params, cache, *args, n_steps=n_steps, kv_window=kv_window, mode=mode)

    return jax.jit(decode, static_argnames=("n_steps", "kv_window", "mode"), donate_argnums=(1,))


@cache
def _small_programs():
    """The jitted first-token sampler, row join and column shift (one set per process)."""
    import jax

    from llava_jax.serving import slot_ops

    return (jax.jit(slot_ops.first_token, static_argnames=("mode",)),
            jax.jit(slot_ops.join_row, static_argnames=("batch",), donate_argnums=(0,)),
            jax.jit(slot_ops.shift_columns, donate_argnums=(0,)))


class QueueFull(Exception):
    """The waiting queue is at its cap (HTTP 429)."""


@dataclass
class _Slot:
    job: Job
    text: object  # model._RowText
    n_prompt: int
    limit: int
    started: float
    n_image: int = 0
    produced: int = 0
    finish: str | None = None


class SlotEngine:
    def __init__(self, llm, n_slots: int = 4, queue_size: int = 64, image_cache=None, metrics=None,
                 log: Callable[[str], None] | None = None):


        self.llm, self.eng = llm, llm.engine
        self.n_slots, self.queue_size = n_slots, queue_size
        self.image_cache, self.metrics = image_cache, metrics
        self.log = log or (lambda m: print(m, file=sys.stderr, flush=True))
        self.chunk = self.eng.chunk
        # Each slot holds up to n_ctx columns; the slack past it is what a shift frees at least.
        need = llm.n_ctx + max(llm.n_ctx // 4, 2 * self.chunk)
        self.length = -(-need // 256) * 256
        self.native = self.eng.decode_kernels == "native"
        self.stop_ids = llm.tokenizer.stop_ids
        b = n_slots
        self.cache = self.eng.new_cache(b, self.length, per_layer=self.eng.per_layer_cache)
        self.column = 0
        self.shifts = 0  # how often the rows were moved (tests look)
        self.token = np.zeros(b, np.int32)
        self.kv_start = np.zeros(b, np.int32)
        self.keys = np.zeros((b, 2), np.uint32)
        self.recent = np.full((b, RECENT), -1, np.int32)
        self.temperature = np.zeros(b, np.float32)
        self.top_k = np.zeros(b, np.int32)
        self.top_p = np.ones(b, np.float32)
        self.min_p = np.zeros(b, np.float32)
        self.penalty = np.ones(b, np.float32)
        self.slots: list[_Slot | None] = [None] * b
        self.waiting: deque[Job] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._decode = _decode_program(self.eng.model)
        self._first, self._join, self._shift = _small_programs()

    # ---- the public side (any thread) -----------------------------------------------------------------
    def submit(self, job: Job) -> None:
        with self._cond:
            free = sum(slot is None for slot in self.slots)  # jobs a free slot takes at the next loop do not wait
            if len(self.waiting) >= self.queue_size + free:
                raise QueueFull(f"{len(self.waiting)} requests are waiting (--queue-size {self.queue_size})")
            self.waiting.append(job)
            self._update_load()
            self._cond.notify()

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run_forever, name="llava-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()

    def wake(self) -> None:
        """Let the loop look at cancellations now (a client went away)."""
        with self._cond:
            self._cond.notify()

    # ---- the engine thread ----------------------------------------------------------------------------
    def run_forever(self) -> None:
        while True:
            with self._cond:
                if self._stopping:
                    return
                if not self.waiting and not any(self.slots):
                    self._cond.wait(timeout=0.5)
                    continue
            try:
                self._admit()
                if any(self.slots):
                    self._decode_chunk()
            except Exception as e:  # a bug or a device failure: fail the busy rows, keep serving
                self.log(f"engine error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
                traceback.print_exc(file=sys.stderr)
                for r, slot in enumerate(self.slots):
                    if slot is not None:
                        slot.job.emit({"type": "error", "status": 500, "message": "internal error during generation"})
                        self._free(r, "error")
                self.cache = self.eng.new_cache(self.n_slots, self.length, per_layer=self.eng.per_layer_cache)
                self.column = 0

    def _update_load(self) -> None:
        if self.metrics is not None:
            self.metrics.set_load(sum(s is not None for s in self.slots), len(self.waiting))

    def _admit(self) -> None:
        while None in self.slots:
            with self._cond:
                if not self.waiting:
                    return
                job = self.waiting.popleft()
            if job.cancelled:
                self._count(job, "cancelled")
                continue
            if job.timeout_s is not None and time.monotonic() - job.arrived > job.timeout_s:
                job.emit({"type": "error", "status": 503, "message": f"timed out after {job.timeout_s:g} s waiting for a slot"})
                self._count(job, "timeout")
                continue
            row = self.slots.index(None)
            try:
                self._start(job, row)
            except LlavaError as e:
                job.emit({"type": "error", "status": 400, "message": str(e)})
                self._count(job, "error")
            except Exception as e:  # a bug or a device failure while starting it: this job fails, the rest go on
                self.log(f"request {job.id}: engine error: {type(e).__name__}: {(str(e).splitlines() or [''])[0]}")
                traceback.print_exc(file=sys.stderr)
                job.emit({"type": "error", "status": 500, "message": "internal error while starting the request"})
                self._count(job, "error")
            self._update_load()

    def _embed(self, job: Job) -> np.ndarray | None:
        encoder = self.llm.image_encoder
        rows = []
        for img in job.images:
            def encode(img=img):
                return np.asarray(encoder.embed([img.image])[0])
            rows.append(self.image_cache.get_or_encode(img.key, encode) if self.image_cache is not None else encode())
        return np.concatenate(rows) if rows else None

    def _start(self, job: Job, row: int) -> None:
        import jax

        from llava_jax.generate import IMAGE_PLACEHOLDER, Request, pad_image_rows
        from llava_jax.model import _RowText
        from llava_jax.sampling import init_recent

        eng = self.eng
        request = Request(list(job.tokens), self._embed(job), job.max_tokens)
        n = len(request.tokens)
        if n >= self.llm.n_ctx:
            raise LlavaError(f"prompt is {n} tokens, the context is {self.llm.n_ctx}")
        tb = eng.buckets.prompt(n)
        tokens = np.zeros((1, tb), np.int32)
        tokens[0, tb - n:] = request.tokens
        kv_start = np.array([tb - n], np.int32)
        positions = np.maximum(np.arange(tb, dtype=np.int32)[None] - kv_start[:, None], 0)
        embeds = pad_image_rows([request.image_embeds], eng.cfg.dim)
        small = eng.new_cache(1, tb, per_layer=eng.per_layer_cache)
        args = (eng.params, eng._batch_array(tokens), eng._batch_array(positions), small, np.int32(0),
                eng._batch_array(kv_start), None if embeds is None else eng._batch_array(embeds),
                np.full(1, tb - 1, np.int32))
        logits, small = eng._compile(eng._forward, "prefill", None, *args, kv_window=tb)(*args)

        s = job.sampling
        seed = s.seed if s.seed is not None else secrets.randbits(32)
        key = np.asarray(jax.random.key_data(jax.random.key(seed)), np.uint32)[None]
        recent = init_recent([[t for t in request.tokens if t >= 0]], RECENT)
        params = self._row_params(s)
        mode = self._mode([job])
        tok, key, lp, top_lp, top_ids, recent = self._first(logits, key, recent, *(p[None] for p in params), mode=mode)

        # Place the row: C must leave room for its n columns before it.
        busy = [r for r, sl in enumerate(self.slots) if sl is not None]
        if not busy:
            self.column = n
        elif self.column < n:
            self._shift_all(n - self.column, busy)
        c = self.column
        self.cache = self._join(self.cache, small, np.int32(row), np.int32(c - tb), np.int32(c - n), np.int32(c),
                                batch=self.n_slots)
        self.kv_start[row] = c - n
        self.token[row] = int(np.asarray(tok)[0])
        self.keys[row] = np.asarray(key)[0]
        self.recent[row] = np.asarray(recent)[0]
        (self.temperature[row], self.top_k[row], self.top_p[row], self.min_p[row], self.penalty[row]) = params
        n_img = sum(t == IMAGE_PLACEHOLDER for t in request.tokens)
        slot = _Slot(job, _RowText(self.llm.tokenizer, job.stop), n, min(job.max_tokens, self.llm.n_ctx - n),
                     time.monotonic(), n_img)
        self.slots[row] = slot
        if self.metrics is not None:
            self.metrics.add_tokens(prompt=n)
            self.metrics.observe_ttft(time.monotonic() - job.arrived)
        lps = (np.asarray(lp), np.asarray(top_lp), np.asarray(top_ids)) if job.logprobs else None
        self._accept(row, [self.token[row]], None if lps is None else (lps[0][0:1], lps[1][0:1], lps[2][0:1]))

    @staticmethod
    def _row_params(s: RowSampling):
        return (np.float32(s.temperature), np.int32(s.top_k), np.float32(s.top_p), np.float32(s.min_p),
                np.float32(s.repeat_penalty))

    def _mode(self, jobs: list[Job]) -> SampleMode:
        vocab = self.eng.cfg.vocab_size
        drawn = [j.sampling for j in jobs if j.sampling.temperature > 0]
        if drawn:
            want = max(s.top_k if 0 < s.top_k < vocab else vocab for s in drawn)
            k = min(vocab, 1 << max(want - 1, 0).bit_length()) if want < vocab else vocab
        else:
            k = 0
        return SampleMode(greedy=not drawn, candidates=k, penalize=any(j.sampling.repeat_penalty != 1.0 for j in jobs),
                          logprobs=any(j.logprobs for j in jobs))

    def _shift_all(self, delta: int, busy: list[int]) -> None:
        self.cache = self._shift(self.cache, np.int32(delta))
        self.shifts += 1
        self.kv_start[busy] += delta
        self.column += delta

    def _decode_chunk(self) -> None:
        for r, slot in enumerate(self.slots):
            if slot is not None and slot.job.cancelled:
                self._free(r, "cancelled")
        busy = [r for r, sl in enumerate(self.slots) if sl is not None]
        if not busy:
            return
        if self.column + self.chunk > self.length:
            span = self.column - int(self.kv_start[busy].min())
            self._shift_all(span - self.column, busy)
        kv_start = self.kv_start.copy()
        free = [r for r in range(self.n_slots) if self.slots[r] is None]
        kv_start[free] = self.column  # a free row sees only what it writes itself
        mode = self._mode([self.slots[r].job for r in busy])
        window = self.length if self.native else min(self.length, self.eng.buckets(self.column + self.chunk, minimum=256))
        tokens, lps, top_lps, top_ids, self.cache, keys, recent = self._decode(
            self.eng.params, self.cache, self.token, np.int32(self.column), kv_start, self.keys, self.recent,
            self.temperature, self.top_k, self.top_p, self.min_p, self.penalty,
            n_steps=self.chunk, kv_window=window, mode=mode)
        tokens = np.asarray(tokens)
        if mode.logprobs:
            lps, top_lps, top_ids = np.asarray(lps), np.asarray(top_lps), np.asarray(top_ids)
        self.keys, self.recent = np.array(keys), np.array(recent)
        self.token = tokens[:, -1].copy()
        self.column += self.chunk
        for r in busy:
            slot = self.slots[r]
            extra = (lps[r], top_lps[r], top_ids[r]) if slot.job.logprobs else None
            self._accept(r, tokens[r].tolist(), extra)

    def _accept(self, row: int, ids: list[int], extra) -> None:
        """Host-side bookkeeping of one sync for one row: EOS, limits, stop strings, the event out."""
        slot = self.slots[row]
        job = slot.job
        kept: list[int] = []
        for tok in ids:
            tok = int(tok)
            if tok in self.stop_ids and not job.ignore_eos:
                slot.finish = "stop"
                break
            kept.append(tok)
            slot.produced += 1
            if slot.produced >= slot.limit:
                slot.finish = "length"
                break
        if slot.finish is None and job.timeout_s is not None and time.monotonic() - job.arrived > job.timeout_s:
            slot.finish = "length"
        piece = slot.text.add(kept, slot.finish is not None)
        if slot.text.stopped:
            slot.finish = "stop"
        logprobs = None
        if extra is not None:
            lp, top_lp, top_ids = extra
            logprobs = [(t, float(lp[j]), [(int(i), float(v)) for i, v in zip(top_ids[j][:TOP_LOGPROBS],
                                                                              top_lp[j][:TOP_LOGPROBS], strict=True)])
                        for j, t in enumerate(kept)]
        if self.metrics is not None:
            self.metrics.add_tokens(generated=len(kept))
        if piece or kept:
            job.emit({"type": "delta", "text": piece, "tokens": kept, "logprobs": logprobs})
        if slot.finish is not None:
            job.emit({"type": "done", "finish_reason": slot.finish, "prompt_tokens": slot.n_prompt,
                      "completion_tokens": slot.produced})
            self._free(row, "ok")

    def _free(self, row: int, outcome: str) -> None:
        slot = self.slots[row]
        self.slots[row] = None
        self._count(slot.job, outcome)
        ms = (time.monotonic() - slot.job.arrived) * 1e3
        self.log(f"request {slot.job.id}: {slot.n_prompt} tokens in ({slot.n_image} image), "
                 f"{slot.produced} out, {len(slot.job.images)} images, {ms:.0f} ms, {slot.finish or outcome}")
        self._update_load()

    def _count(self, job: Job, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.count_request(job.endpoint, outcome)
