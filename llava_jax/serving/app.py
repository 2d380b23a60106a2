"""The FastAPI app: OpenAI's endpoints over the slot engine, with the server's limits and errors.

Requests are parsed and checked here (pydantic models, images fetched / decoded and the prompt
tokenized in a worker thread: no JAX), then handed to the engine thread as a `Job`; its events come
back through `loop.call_soon_threadsafe` into an asyncio queue. Every error is OpenAI's error object
`{"error": {"message", "type", "param", "code"}}` with its status; nothing answers with a traceback.
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import json
import secrets
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from llava_jax.errors import LlavaError
from llava_jax.generate import IMAGE_PLACEHOLDER
from llava_jax.prompts import IMAGE_MARKERS, ImageSlot
from llava_jax.serving.chat import Message, Part, render_messages
from llava_jax.serving.engine import ImageInput, Job, QueueFull, RowSampling
from llava_jax.serving.image_cache import encoder_settings, image_key
from llava_jax.serving.media import MediaError, MediaPolicy, decode_image, image_bytes
from llava_jax.serving.metrics import Metrics
from llava_jax.serving.schemas import ChatRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest

CHAT_PAGE = Path(__file__).resolve().parents[1] / "assets" / "chat.html"
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
               500: "server_error", 503: "unavailable_error"}
OPEN_PATHS = ("/health", "/")  # no API key needed (the page itself holds nothing; its calls send the key)


@dataclass
class Settings:
    model_id: str = "llava_jax"
    api_key: str | None = None
    chat_template: str | None = None  # None: from the GGUF metadata
    media: MediaPolicy = field(default_factory=MediaPolicy)
    max_body_bytes: int = 20 << 20
    max_images: int = 8
    timeout_s: float | None = 600.0


class ServerState:
    """What the app serves from; `llm` / `engine` are None while the model loads."""

    def __init__(self, settings: Settings, metrics: Metrics, image_cache=None):
        self.settings, self.metrics, self.image_cache = settings, metrics, image_cache
        self.llm = self.engine = None
        self.load_error: str | None = None
        self._ids = itertools.count(1)

    def next_id(self, prefix: str) -> str:
        return f"{prefix}-{next(self._ids)}{secrets.token_hex(4)}"


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None, headers=None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers


def error_response(status: int, message: str, param=None, code=None, headers=None) -> JSONResponse:
    body = {"error": {"message": message, "type": ERROR_TYPES.get(status, "invalid_request_error"), "param": param,
                      "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


class BodyLimit:
    """ASGI middleware: a body over the cap is a 413 (read and dropped first, so the client sees the answer)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            length = dict(scope.get("headers") or []).get(b"content-length")
            if length is not None and length.isdigit() and int(length) > self.limit:
                more = True
                while more:
                    message = await receive()
                    more = message.get("more_body", False) and message["type"] == "http.request"
                mb = self.limit / (1 << 20)
                await error_response(413, f"request body is {int(length)} bytes, the limit is {self.limit} "
                                          f"({mb:g} MB, --max-body-mb)", code="body_too_large")(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="llava_jax", docs_url=None, redoc_url=None, openapi_url=None)
    s = state.settings

    @app.exception_handler(ApiError)
    async def _api_error(_, e: ApiError):
        return error_response(e.status, e.message, e.param, e.code, e.headers)

    @app.exception_handler(MediaError)
    async def _media(_, e: MediaError):
        return error_response(400, str(e), e.param)

    @app.exception_handler(LlavaError)
    async def _user(_, e: LlavaError):
        return error_response(400, str(e))

    @app.exception_handler(RequestValidationError)
    async def _invalid(_, e: RequestValidationError):
        errors = e.errors()
        first = errors[0] if errors else {}
        if first.get("type") == "json_invalid":
            return error_response(400, "the request body is not valid JSON", code="invalid_json")
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        param = ".".join(loc) or None
        return error_response(400, f"{param or 'body'}: {first.get('msg', 'invalid value')}", param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_, e: StarletteHTTPException):
        message = "not found" if e.status_code == 404 else str(e.detail)
        return error_response(e.status_code, message)

    @app.exception_handler(Exception)
    async def _bug(_, e: Exception):
        return error_response(500, "internal server error")

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if s.api_key is not None and request.url.path not in OPEN_PATHS:
            given = request.headers.get("x-api-key")
            auth = request.headers.get("authorization", "")
            if given is None and auth.lower().startswith("bearer "):
                given = auth[7:].strip()
            if not given:
                return error_response(401, "no API key: send Authorization: Bearer KEY or X-Api-Key", code="missing_api_key")
            if not hmac.compare_digest(given.encode(), s.api_key.encode()):
                return error_response(401, "invalid API key", code="invalid_api_key")
        return await call_next(request)

    def ready():
        if state.engine is None:
            message = f"model failed to load: {state.load_error}" if state.load_error else "loading the model"
            raise ApiError(503, message, code="loading", headers={"Retry-After": "5"})
        return state.llm

    # ---- plain endpoints ----------------------------------------------------------------------------
    @app.get("/health")
    async def health():
        if state.engine is None:
            return error_response(503, "loading the model" if not state.load_error else state.load_error,
                                  headers={"Retry-After": "5"})
        return {"status": "ok"}

    @app.get("/")
    async def page():
        if not CHAT_PAGE.is_file():
            raise ApiError(404, "the chat page is not installed")
        return FileResponse(CHAT_PAGE, media_type="text/html")

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(state.metrics.render(state.image_cache), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    @app.get("/models")
    async def models():
        llm = ready()
        return {"object": "list", "data": [{"id": s.model_id, "object": "model", "created": int(time.time()),
                                            "owned_by": "llava_jax",
                                            "meta": {"n_ctx": llm.n_ctx, "vision": llm.image_encoder is not None,
                                                     "n_vocab": llm.cfg.vocab_size}}]}

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        llm = ready()
        ids = llm.tokenize(body.content, add_bos=body.add_special and llm.tokenizer.add_bos)
        if body.with_pieces:
            return {"tokens": [{"id": i, "piece": llm.tokenizer.decode([i])} for i in ids]}
        return {"tokens": ids}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        llm = ready()
        bad = [i for i in body.tokens if not 0 <= i < llm.cfg.vocab_size]
        if bad:
            raise ApiError(400, f"token id {bad[0]} is outside the vocabulary (0..{llm.cfg.vocab_size - 1})", "tokens")
        return {"content": llm.detokenize(body.tokens)}

    # ---- generation ---------------------------------------------------------------------------------
    @app.post("/v1/chat/completions")
    @app.post("/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        llm = ready()
        tokens, images = await run_in_threadpool(_prepare_chat, state, llm, body)
        max_tokens = body.max_completion_tokens or body.max_tokens
        job = _job(state, "chatcmpl", "chat", body, tokens, images, max_tokens, body.logprobs)
        return await _respond(state, request, job, body, chat=True, top=body.top_logprobs or 0)

    @app.post("/v1/completions")
    @app.post("/completions")
    async def completions(body: CompletionRequest, request: Request):
        llm = ready()
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if len(prompts) != 1:
            raise ApiError(400, "prompt: exactly one prompt per request is supported", "prompt")
        prompt = prompts[0]
        if any(m in prompt for m in IMAGE_MARKERS):
            raise ApiError(400, "image markers (<image>) are not supported on /v1/completions: send images as image_url "
                                "parts to /v1/chat/completions", "prompt", "images_not_supported")
        tokens = await run_in_threadpool(llm.tokenize, prompt)
        _check_context(llm, tokens, "prompt")
        job = _job(state, "cmpl", "completions", body, tokens, [], body.max_tokens, body.logprobs is not None)
        return await _respond(state, request, job, body, chat=False, top=body.logprobs or 0)

    app.state.server = state
    return BodyLimit(app, s.max_body_bytes)


# ---- request → job ----------------------------------------------------------------------------------
def _prepare_chat(state: ServerState, llm, body: ChatRequest):
    """Messages → (token ids with image placeholders, ImageInputs). Runs in a worker thread (no JAX)."""
    s = state.settings
    messages, pil, raw = [], [], []
    for i, m in enumerate(body.messages):
        role = {"developer": "system"}.get(m.role, m.role)
        if role not in ("system", "user", "assistant"):
            raise ApiError(400, f"messages[{i}].role: unsupported role {m.role!r} (system, user, assistant)",
                           f"messages[{i}].role")
        content = m.content if m.content is not None else ""
        parts = []
        for j, part in enumerate([{"type": "text", "text": content}] if isinstance(content, str) else content):
            where = f"messages[{i}].content[{j}]"
            kind = part.get("type")
            if kind == "text":
                if not isinstance(part.get("text"), str):
                    raise ApiError(400, f"{where}.text must be a string", f"{where}.text")
                parts.append(Part(text=part["text"]))
            elif kind in ("image_url", "input_image"):
                url = part.get("image_url")
                url = url.get("url") if isinstance(url, dict) else url
                if len(pil) >= s.max_images:
                    raise ApiError(400, f"too many images: at most {s.max_images} per request (--max-images)", where)
                data = image_bytes(url, s.media, f"{where}.image_url")
                pil.append(decode_image(data, s.media, f"{where}.image_url"))
                raw.append(data)
                parts.append(Part(image=len(pil) - 1))
            else:
                raise ApiError(400, f"{where}.type: unknown content part type {kind!r} (text, image_url)", f"{where}.type")
        messages.append(Message(role, parts))
    if pil and llm.image_encoder is None:
        raise ApiError(400, "this server's model has no mmproj (image encoder): start it with --mmproj", "messages")
    template = s.chat_template
    if template is None:
        from llava_jax.prompts import template_from_metadata

        template = template_from_metadata(llm.metadata)
    segments = render_messages(messages, template)
    tok = llm.tokenizer
    tokens = [tok.bos_id] if tok.add_bos and tok.bos_id is not None else []
    for seg in segments:
        if isinstance(seg, ImageSlot):
            tokens += [IMAGE_PLACEHOLDER] * llm.image_encoder.n_tokens(pil[seg.index].size)
        else:
            tokens += tok.encode(seg, add_bos=False, parse_special=True)
    _check_context(llm, tokens, "messages")
    settings = encoder_settings(llm.image_encoder) if pil else ""
    return tokens, [ImageInput(image_key(d, settings), img) for d, img in zip(raw, pil, strict=True)]


def _check_context(llm, tokens: list[int], param: str) -> None:
    n = len(tokens)
    if n >= llm.n_ctx:
        n_img = sum(t == IMAGE_PLACEHOLDER for t in tokens)
        raise ApiError(400, f"the prompt is {n} tokens ({n - n_img} text + {n_img} image), the context is {llm.n_ctx}: "
                            "shorten it, or start the server with a larger -c", param, "context_length_exceeded")
    if n == 0:
        raise ApiError(400, "the prompt is empty", param)


def _job(state: ServerState, prefix: str, endpoint: str, body, tokens, images, max_tokens, logprobs: bool) -> Job:
    llm = state.llm
    room = llm.n_ctx - len(tokens)
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    sampling = RowSampling(body.temperature, body.top_k, body.top_p, body.min_p, body.repeat_penalty, body.seed)
    return Job(state.next_id(prefix), tokens, images, min(max_tokens or room, room), sampling, emit=None,
               stop=[x for x in stop if x], logprobs=logprobs, ignore_eos=body.ignore_eos,
               timeout_s=state.settings.timeout_s, endpoint=endpoint)


@lru_cache(maxsize=65536)
def _piece(tokenizer, token: int) -> str:
    return tokenizer.decode([token])


def _chat_logprobs(tokenizer, entries, top: int) -> list[dict]:
    def one(t, lp):
        text = _piece(tokenizer, t)
        return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}
    return [one(t, lp) | {"top_logprobs": [one(i, v) for i, v in tops[:top]]} for t, lp, tops in entries]


def _legacy_logprobs(tokenizer, entries, top: int, offset: int) -> dict:
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for t, lp, tops in entries:
        text = _piece(tokenizer, t)
        out["tokens"].append(text)
        out["token_logprobs"].append(lp)
        out["top_logprobs"].append({_piece(tokenizer, i): v for i, v in tops[:top]})
        out["text_offset"].append(offset)
        offset += len(text)
    return out


async def _respond(state: ServerState, request: Request, job: Job, body, *, chat: bool, top: int):
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    job.emit = lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev)
    try:
        state.engine.submit(job)
    except QueueFull as e:
        state.metrics.count_request(job.endpoint, "rejected")
        raise ApiError(429, f"the server is busy: {e}; retry later", code="queue_full", headers={"Retry-After": "1"}) from None
    tokenizer = state.llm.tokenizer
    created, model = int(time.time()), state.settings.model_id
    kind = "chat.completion" if chat else "text_completion"

    async def next_event():
        while True:
            try:
                return await asyncio.wait_for(events.get(), timeout=1.0)
            except TimeoutError:
                if await request.is_disconnected():
                    job.cancel()
                    state.engine.wake()
                    raise asyncio.CancelledError from None

    def usage(done: dict) -> dict:
        return {"prompt_tokens": done["prompt_tokens"], "completion_tokens": done["completion_tokens"],
                "total_tokens": done["prompt_tokens"] + done["completion_tokens"]}

    try:
        first = await next_event()
    except asyncio.CancelledError:
        return error_response(400, "client went away")
    if first["type"] == "error":
        return error_response(first["status"], first["message"])

    if not body.stream:
        text, entries, ev = "", [], first
        while True:
            if ev["type"] == "delta":
                text += ev["text"]
                entries += ev["logprobs"] or []
            elif ev["type"] == "error":
                return error_response(ev["status"], ev["message"])
            else:
                break
            ev = await next_event()
        if chat:
            lp = {"content": _chat_logprobs(tokenizer, entries, top)} if job.logprobs else None
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": lp,
                      "finish_reason": ev["finish_reason"]}
        else:
            lp = _legacy_logprobs(tokenizer, entries, top, 0) if job.logprobs else None
            choice = {"index": 0, "text": text, "logprobs": lp, "finish_reason": ev["finish_reason"]}
        return {"id": job.id, "object": kind, "created": created, "model": model, "choices": [choice],
                "usage": usage(ev)}

    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    def chunk(delta_or_text, finish=None, logprobs=None) -> str:
        if chat:
            choice = {"index": 0, "delta": delta_or_text, "logprobs": logprobs, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": delta_or_text, "logprobs": logprobs, "finish_reason": finish}
        obj = {"id": job.id, "object": f"{kind}.chunk" if chat else kind, "created": created, "model": model,
               "choices": [choice]}
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    async def stream():
        ev, offset = first, 0
        try:
            if chat:
                yield chunk({"role": "assistant", "content": ""})
            while True:
                if ev["type"] == "delta":
                    lp = None
                    if job.logprobs and ev["logprobs"]:
                        lp = ({"content": _chat_logprobs(tokenizer, ev["logprobs"], top)} if chat
                              else _legacy_logprobs(tokenizer, ev["logprobs"], top, offset))
                    offset += len(ev["text"])
                    if ev["text"] or lp:
                        yield chunk({"content": ev["text"]} if chat else ev["text"], logprobs=lp)
                elif ev["type"] == "error":
                    yield f"data: {json.dumps({'error': {'message': ev['message'], 'type': 'server_error'}})}\n\n"
                    break
                else:
                    yield chunk({} if chat else "", finish=ev["finish_reason"])
                    if include_usage:
                        obj = {"id": job.id, "object": f"{kind}.chunk" if chat else kind, "created": created,
                               "model": model, "choices": [], "usage": usage(ev)}
                        yield f"data: {json.dumps(obj)}\n\n"
                    break
                ev = await next_event()
            yield "data: [DONE]\n\n"
        finally:  # the client went away (the task is cancelled) or the stream ended: free the row either way
            job.cancel()
            state.engine.wake()

    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
