"""`python -m llava_jax.serve`: an OpenAI-compatible server (chat with images, streaming, continuous batching).

    python -m llava_jax.serve -m MODEL.gguf --mmproj MMPROJ.gguf -np 4 -c 4096 --api-key KEY
    python -m llava_jax.serve --default-mmproj            # the embedded SmolLM2 + the random mmproj

Endpoints: POST /v1/chat/completions, /v1/completions, /tokenize, /detokenize; GET /v1/models, /health,
/metrics and the chat page at /. Binds 127.0.0.1 unless --host says otherwise. `-c` is each slot's
context (prompt + answer of one request), as `run`'s; the KV cache holds `-np` rows of it. The HTTP
socket opens at once (/health is 503 while the model loads); `listening on http://HOST:PORT` goes to
stderr when the model is loaded and the socket is open, then one line per request.
"""

from __future__ import annotations

import argparse
import sys
import threading
from pathlib import Path

from llava_jax.cli_config import add_engine_flags, buckets_from_args, memory_kwargs
from llava_jax.errors import LlavaError, run_cli
from llava_jax.run import _HelpFormatter, _template_names, check_template


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m llava_jax.serve", description=__doc__.split("\n\n")[0],
                                formatter_class=_HelpFormatter)
    p.add_argument("--config", action="append", default=[],
                   help="TOML file of flag values ([model] and [mesh] tables, as run reads them); flags override it")
    # the model flags of `run`
    p.add_argument("-m", "--model", help="language model GGUF (default: the embedded SmolLM2-135M-Instruct Q4_1)")
    p.add_argument("--mmproj", help="mmproj GGUF (CLIP vision tower + projector)")
    p.add_argument("--default-mmproj", action="store_true",
                   help="use the project's deterministic random mmproj (answers do not describe the image)")
    p.add_argument("-c", "--ctx-size", type=int, default=None,
                   help="context of each slot (default: min(4096, model's); 0 = model's)")
    p.add_argument("--chat-template", help=f"{_template_names()} (default: from the GGUF metadata)")
    add_engine_flags(p)
    # the server's own
    p.add_argument("--host", default="127.0.0.1", help="address to bind")
    p.add_argument("--port", type=int, default=8080, help="port to bind (0: any free port, printed)")
    p.add_argument("--api-key", help="require this key (Authorization: Bearer KEY or X-Api-Key) on all but /health and /")
    p.add_argument("--api-key-file", help="read the API key from this file (first line)")
    p.add_argument("-np", "--parallel", type=int, default=4, help="slots: requests decoded together")
    p.add_argument("--alias", default=None, help="model id in /v1/models and responses (default: the file name)")
    p.add_argument("--media-path", help="directory file:// image URLs may read from (default: file:// refused)")
    p.add_argument("--allow-remote-media", action="store_true", help="fetch http(s) image URLs (size cap, timeout)")
    p.add_argument("--image-cache-mb", type=float, default=512, help="image-embedding cache size in MB (0: off)")
    p.add_argument("--max-body-mb", type=float, default=20, help="request body cap in MB")
    p.add_argument("--max-images", type=int, default=8, help="images per request")
    p.add_argument("--max-pixels", type=int, default=4096 * 4096, help="pixels (width x height) per image")
    p.add_argument("--queue-size", type=int, default=64, help="requests waiting for a slot before 429")
    p.add_argument("--timeout", type=float, default=600, help="seconds a request may take (waiting + generating)")
    p.add_argument("--remote-timeout", type=float, default=10, help="seconds a remote image fetch may take")
    return p


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _settings(args):
    from llava_jax.serving.app import Settings
    from llava_jax.serving.media import MediaPolicy

    key = args.api_key
    if args.api_key_file:
        if key:
            raise LlavaError("give --api-key or --api-key-file, not both")
        try:
            key = Path(args.api_key_file).read_text(encoding="utf-8").splitlines()[0].strip()
        except (OSError, IndexError, UnicodeDecodeError):
            raise LlavaError(f"cannot read an API key from {args.api_key_file}") from None
        if not key:
            raise LlavaError(f"{args.api_key_file}: the first line is empty")
    media = None
    if args.media_path:
        media = Path(args.media_path)
        if not media.is_dir():
            raise LlavaError(f"--media-path {args.media_path} is not a directory")
    for flag, value, low in (("-np", args.parallel, 1), ("--max-images", args.max_images, 0),
                             ("--queue-size", args.queue_size, 0), ("--max-pixels", args.max_pixels, 1)):
        if value < low:
            raise LlavaError(f"{flag} must be >= {low}, got {value}")
    if args.max_body_mb <= 0 or args.timeout <= 0 or args.image_cache_mb < 0:
        raise LlavaError("--max-body-mb and --timeout must be > 0, --image-cache-mb >= 0")
    body = int(args.max_body_mb * (1 << 20))
    policy = MediaPolicy(media, args.allow_remote_media, body, args.remote_timeout, args.max_pixels)
    return Settings(model_id=args.alias or "llava_jax", api_key=key, chat_template=args.chat_template, media=policy,
                    max_body_bytes=body, max_images=args.max_images, timeout_s=args.timeout)


def main(argv: list[str] | None = None) -> int:
    from llava_jax.cli_config import parse_with_config

    args = parse_with_config(build_parser(), argv, sections=("model", "mesh"))
    return run_cli(lambda: _serve(args))


def _serve(args) -> int:
    check_template(args.chat_template)
    settings = _settings(args)
    buckets = buckets_from_args(args)
    memory = memory_kwargs(args)
    mmproj = args.mmproj
    if args.default_mmproj and mmproj is None:
        from llava_jax.defaults import default_mmproj_path

        mmproj = default_mmproj_path()
    import uvicorn

    from llava_jax.serving.app import ServerState, create_app
    from llava_jax.serving.image_cache import ImageCache
    from llava_jax.serving.metrics import Metrics

    state = ServerState(settings, Metrics(args.parallel), ImageCache(int(args.image_cache_mb * (1 << 20))))
    server = uvicorn.Server(uvicorn.Config(create_app(state), host=args.host, port=args.port, log_level="warning",
                                           access_log=False, lifespan="off"))

    def engine_thread():
        """Loads the model, then runs the engine: every JAX call of the server happens on this thread."""
        try:
            import llava_jax
            from llava_jax.serving.engine import SlotEngine
            from llava_jax.sharding import parse_mesh

            scan = {"auto": None, "on": True, "off": False}[args.scan_layers]
            llm = llava_jax.load(args.model, mmproj=mmproj, dtype=args.dtype, mesh=parse_mesh(args.mesh),
                                 n_ctx=args.ctx_size, scan_layers=scan, clip_compat=args.clip_compat, buckets=buckets,
                                 notice=lambda m: _log(f"llava_jax: note: {m}"), **memory)
            if settings.model_id == "llava_jax":
                settings.model_id = Path(llm.path).name
            engine = SlotEngine(llm, args.parallel, args.queue_size, state.image_cache, state.metrics, _log)
            state.llm, state.engine = llm, engine
        except Exception as e:  # LlavaError and the rest: one line, the server exits with status 1
            state.load_error = str(e).splitlines()[0] if str(e) else type(e).__name__
            _log(f"error: {state.load_error}")
            server.should_exit = True
            return
        while not server.started and not server.should_exit:
            threading.Event().wait(0.05)
        if server.started:
            host, port = server.servers[0].sockets[0].getsockname()[:2]
            _log(f"llava_jax: model {settings.model_id}, {args.parallel} slots of {llm.n_ctx} tokens, "
                 f"decode kernels {llm.engine.decode_kernels}")
            _log(f"listening on http://{host}:{port}")
        engine.run_forever()

    thread = threading.Thread(target=engine_thread, name="llava-engine", daemon=True)
    thread.start()
    server.run()
    if state.engine is not None:
        state.engine.stop()
    return 1 if state.load_error else 0


if __name__ == "__main__":
    sys.exit(main())
