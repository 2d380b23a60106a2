"""Requests/s and latency of the OpenAI-compatible servers under concurrent image questions.

    python scripts/bench_serve.py                              # llava_jax's server, then llama_cpp.server
    python scripts/bench_serve.py --engines llava_jax --concurrency 1,4 --requests 8 -o serve.json

Each engine's server runs in its own subprocess on a free 127.0.0.1 port, one after the other (never both at
once), with the same files: SmolLM2-135M-Instruct (`llava_jax.defaults.smollm2_path()`, or `-m`) + the project's
deterministic random LLaVA-1.6 mmproj (`llava_jax.random_mmproj.default_mmproj_path()`, or `--mmproj`):
- llava_jax: `python -m llava_jax.serve -m MODEL --mmproj MMPROJ -np SLOTS -c CTX --chat-template vicuna
  --clip-compat llama.cpp` (continuous batching over `--slots` slots, CTX tokens each; llama.cpp's image graph,
  so both engines encode the same tiles into the same number of tokens; extra flags with `--llava-jax-args`);
- llama_cpp: llama-cpp-python's own server, `python -m llama_cpp.server --model MODEL --clip_model_path MMPROJ
  --chat_format llava-1-5 --n_threads 2 --n_threads_batch 2` (`--threads`; its llava-1-5 handler runs llama.cpp's
  mtmd, which reads the mmproj's LLaVA-1.6 grid itself; its prompt is LLaVA's vicuna layout, hence llava_jax's
  `--chat-template vicuna`; its `mtmd` format needs a template that knows content parts, SmolLM2's does not),
  started through this script so that models load with `use_extra_bufts=False` (llama.cpp's repacked CPU buffers
  crash in these VMs). It answers one request at a time. Needs `pip install sse-starlette starlette-context
  pydantic-settings` (llama-cpp-python's `[server]` extra).

The clients: `--images` different pictures (the package's sample drawing, mirrored / colour-permuted / shifted,
all 320x240) cycled over the requests with a few questions, sent as base64 `data:image/png` URIs in non-streamed
`/v1/chat/completions` requests (`max_tokens` `--max-tokens`, temperature 0), the way lmms-eval's
`openai_compatible` backend sends them. Before the measurements each server answers every image once and a burst
of max-concurrency requests (compilation, caches: reported as warm-up, not measured). Then, per concurrency level
C (`--concurrency`, default 1,4,16), `--requests` requests (default max(8, 2*C)) go out from C client threads,
each sending its next request as soon as its previous one is answered. Reported per level: requests/s (answered
requests / wall time of the level), p50 / p95 / mean latency, completion tokens and their rate, errors.
llava_jax's image-embedding cache hits repeated images (`--unique-images`: every request gets its own image,
so no cache hits anywhere); its `/metrics` after each level are kept in the JSON.

Output: the JSON (`-o`, default bench_serve.json) and a markdown table (`--markdown`, default next to the JSON,
.md), which is also printed to stdout. Before each engine start and each level the script waits (`--quiet-wait`,
default up to 60 s) for the machine to go idle, and records how busy it was.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
import json
import os
import platform
import shlex
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from importlib import metadata
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import Quiet, load_average, log  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ENGINES = ("llava_jax", "llama_cpp")
QUESTIONS = ("What is in the image?", "Describe the image briefly.", "What colours do you see?",
             "How many shapes are there?")
LLAMA_CPP_CHILD = "llama-cpp-server"  # argv[1] of the llama_cpp.server wrapper subprocess


# ---- inputs -------------------------------------------------------------------------------------------------------
def make_images(n: int, unique: int = 0) -> list[str]:
    """`n` different 320x240 PNG pictures as data: URIs (variants of the sample drawing). With `unique` > 0,
    `unique` pictures, each made distinct by a stamped 8x8 corner pattern of its index."""
    from PIL import Image, ImageOps

    from llava_jax.defaults import sample_image_path

    base = Image.open(sample_image_path()).convert("RGB").resize((320, 240))
    variants = [base, ImageOps.mirror(base), Image.merge("RGB", base.split()[::-1]), ImageOps.flip(base),
                Image.merge("RGB", [base.split()[i] for i in (1, 2, 0)]), base.rotate(180)]
    count = unique or n
    out = []
    for i in range(count):
        img = variants[i % len(variants)].copy()
        if i >= len(variants) or unique:
            px = np.asarray(img).copy()
            bits = np.array([(i >> b) & 1 for b in range(16)], dtype=np.uint8).reshape(4, 4) * 255
            px[:8, :8] = np.kron(bits, np.ones((2, 2), np.uint8))[:, :, None]
            img = Image.fromarray(px)
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        out.append("data:image/png;base64," + base64.b64encode(buf.getvalue()).decode())
    return out


def request_body(i: int, images: list[str], max_tokens: int, model: str | None) -> dict:
    body = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": images[i % len(images)]}},
                                                      {"type": "text", "text": QUESTIONS[i % len(QUESTIONS)]}]}],
            "max_tokens": max_tokens, "temperature": 0}
    if model:
        body["model"] = model
    return body


# ---- HTTP ---------------------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(url: str, body: dict | None = None, timeout: float = 600) -> tuple[int, bytes]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as e:
        return 0, str(e).encode()


def chat(base: str, body: dict, timeout: float) -> dict:
    """One request: latency, token counts, or the error."""
    t0 = time.perf_counter()
    status, raw = http(base + "/v1/chat/completions", body, timeout)
    latency = time.perf_counter() - t0
    if status != 200:
        return {"ok": False, "latency_s": latency, "error": f"HTTP {status}: {raw[:300].decode(errors='replace')}"}
    try:
        reply = json.loads(raw)
        usage = reply["usage"]
        return {"ok": True, "latency_s": latency, "prompt_tokens": usage["prompt_tokens"],
                "completion_tokens": usage["completion_tokens"], "text": reply["choices"][0]["message"]["content"]}
    except (ValueError, KeyError, IndexError, TypeError) as e:
        return {"ok": False, "latency_s": latency, "error": f"bad reply ({e}): {raw[:300].decode(errors='replace')}"}


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {'name{labels}': value}, histogram buckets left out."""
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        if "_bucket{" in name:
            continue
        with contextlib.suppress(ValueError):
            out[name] = float(value)
    return out


# ---- servers ------------------------------------------------------------------------------------------------------
class Server:
    """A server subprocess, its log file and its readiness probe."""

    def __init__(self, engine: str, cmd: list[str], port: int, log_path: Path, ready_path: str):
        self.engine, self.cmd, self.port, self.log_path, self.ready_path = engine, cmd, port, log_path, ready_path
        self.base = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float) -> float:
        t0 = time.perf_counter()
        with open(self.log_path, "wb") as f:
            self.proc = subprocess.Popen(self.cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.engine} server exited with {self.proc.returncode}:\n{self.log_tail()}")
            if http(self.base + self.ready_path, timeout=5)[0] == 200:
                return time.perf_counter() - t0
            if time.perf_counter() - t0 > timeout:
                raise RuntimeError(f"{self.engine} server not ready after {timeout:.0f} s:\n{self.log_tail()}")
            time.sleep(0.25)

    def log_tail(self, n: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def server_for(engine: str, args, model: Path, mmproj: Path, log_dir: Path) -> Server:
    port = free_port()
    if engine == "llava_jax":
        cmd = [sys.executable, "-m", "llava_jax.serve", "-m", str(model), "--mmproj", str(mmproj), "--host", "127.0.0.1",
               "--port", str(port), "-np", str(args.slots), "-c", str(args.ctx),
               "--chat-template", args.chat_template, "--clip-compat", args.clip_compat, *shlex.split(args.llava_jax_args)]
        return Server(engine, cmd, port, log_dir / "llava_jax.log", "/health")
    cmd = [sys.executable, str(Path(__file__).resolve()), LLAMA_CPP_CHILD, "--model", str(model),
           "--clip_model_path", str(mmproj), "--chat_format", args.llama_cpp_chat_format, "--n_ctx", str(args.llama_cpp_ctx),
           "--n_threads", str(args.threads), "--n_threads_batch", str(args.threads), "--host", "127.0.0.1",
           "--port", str(port), "--verbose", "False", *shlex.split(args.llama_cpp_args)]
    return Server(engine, cmd, port, log_dir / "llama_cpp.log", "/v1/models")


def llama_cpp_server_main(argv: list[str]) -> None:
    """The llama_cpp.server subprocess: its own CLI, with models loaded with use_extra_bufts=False."""
    from bench_common import llama_cpp_without_extra_bufts

    with llama_cpp_without_extra_bufts():
        import llama_cpp.server.__main__ as server_main

        sys.argv = ["llama_cpp.server", *argv]
        server_main.main()


# ---- measuring ----------------------------------------------------------------------------------------------------
def run_level(base: str, bodies: list[dict], concurrency: int, timeout: float) -> tuple[list[dict], float]:
    """Send `bodies` from `concurrency` client threads (each sends its next as soon as it has an answer)."""
    results: list[dict | None] = [None] * len(bodies)
    lock = threading.Lock()
    next_index = [0]

    def client():
        while True:
            with lock:
                i = next_index[0]
                next_index[0] += 1
            if i >= len(bodies):
                return
            results[i] = chat(base, bodies[i], timeout)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, time.perf_counter() - t0


def summarize_level(concurrency: int, results: list[dict], wall: float) -> dict:
    ok = [r for r in results if r["ok"]]
    lat = np.array([r["latency_s"] for r in ok]) if ok else np.zeros(0)
    completion = sum(r["completion_tokens"] for r in ok)
    row = {"concurrency": concurrency, "requests": len(results), "ok": len(ok), "errors": len(results) - len(ok),
           "wall_s": round(wall, 3), "requests_per_s": round(len(ok) / wall, 3) if wall > 0 else 0.0,
           "latency_p50_s": round(float(np.percentile(lat, 50)), 3) if ok else None,
           "latency_p95_s": round(float(np.percentile(lat, 95)), 3) if ok else None,
           "latency_mean_s": round(float(lat.mean()), 3) if ok else None,
           "latency_max_s": round(float(lat.max()), 3) if ok else None,
           "completion_tokens": completion, "completion_tokens_per_s": round(completion / wall, 2) if wall > 0 else 0.0,
           "prompt_tokens_mean": round(sum(r["prompt_tokens"] for r in ok) / len(ok), 1) if ok else None}
    errors = [r["error"] for r in results if not r["ok"]]
    if errors:
        row["first_errors"] = errors[:3]
    return row


def bench_engine(engine: str, args, model: Path, mmproj: Path, images: list[str], log_dir: Path, quiet: Quiet) -> dict:
    server = server_for(engine, args, model, mmproj, log_dir)
    log(f"{engine}: starting {shlex.join(server.cmd)}")
    quiet.wait()
    out: dict = {"cmd": server.cmd, "log": str(server.log_path)}
    try:
        out["startup_s"] = round(server.start(args.startup_timeout), 2)
        status, raw = http(server.base + "/v1/models", timeout=30)
        model_id = json.loads(raw)["data"][0]["id"] if status == 200 else None
        out["model_id"] = model_id
        log(f"{engine}: ready in {out['startup_s']} s (model id {model_id!r}); warming up")
        # warm-up: every image once, then a burst at the highest concurrency (compiles, caches, allocations)
        t0 = time.perf_counter()
        n_warm = min(len(images), args.warmup_images)
        warm = [chat(server.base, request_body(i, images, args.max_tokens, model_id), args.timeout) for i in range(n_warm)]
        top = max(args.concurrency)
        if top > 1 and args.warmup_burst:
            burst, _ = run_level(server.base, [request_body(i, images, args.max_tokens, model_id) for i in range(top)],
                                 top, args.timeout)
            warm += burst
        out["warmup"] = {"requests": len(warm), "errors": sum(not r["ok"] for r in warm),
                         "s": round(time.perf_counter() - t0, 2)}
        bad = [r["error"] for r in warm if not r["ok"]]
        if bad:
            log(f"{engine}: warm-up errors, e.g. {bad[0]}")
        out["sample_answer"] = next((r["text"] for r in warm if r["ok"]), None)
        levels = []
        offset = 0
        for c in args.concurrency:
            n = args.requests or max(8, 2 * c)
            bodies = [request_body(offset + i, images, args.max_tokens, model_id) for i in range(n)]
            offset += n
            quiet.wait()
            results, wall = run_level(server.base, bodies, c, args.timeout)
            row = summarize_level(c, results, wall)
            row["load_average"] = load_average()
            if engine == "llava_jax":
                status, raw = http(server.base + "/metrics", timeout=30)
                if status == 200:
                    row["metrics"] = parse_metrics(raw.decode(errors="replace"))
                    row["slots_busy_max_since_start"] = row["metrics"].get("llava_jax_slots_busy_max")
            levels.append(row)
            log(f"{engine}: {c:>2} clients, {row['ok']}/{n} ok: {row['requests_per_s']} req/s, "
                f"p50 {row['latency_p50_s']} s, p95 {row['latency_p95_s']} s")
        out["levels"] = levels
    finally:
        server.stop()
    return out


# ---- reporting ----------------------------------------------------------------------------------------------------
def markdown(result: dict) -> str:
    s = result["settings"]
    lines = [f"Image questions ({s['images']} images{' (unique)' if s['unique_images'] else ''}, max_tokens "
             f"{s['max_tokens']}, temperature 0), SmolLM2-135M + {Path(result['mmproj']).name}; "
             f"llava_jax -np {s['slots']} -c {s['ctx']}; llama_cpp.server {s['threads']} threads.", "",
             "| engine | clients | requests | errors | req/s | p50 latency (s) | p95 latency (s) | completion tok/s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for engine, r in result["engines"].items():
        if "error" in r:
            lines.append(f"| {engine} | – | – | – | failed: {r['error'].splitlines()[0][:80]} | | | |")
            continue
        for row in r.get("levels", []):
            lines.append(f"| {engine} | {row['concurrency']} | {row['requests']} | {row['errors']} | "
                         f"{row['requests_per_s']:.2f} | {row['latency_p50_s']} | {row['latency_p95_s']} | "
                         f"{row['completion_tokens_per_s']:.1f} |")
    return "\n".join(lines) + "\n"


def machine() -> dict:
    """The machine, without importing jax in the client (on an accelerator that would claim its memory)."""
    cpu, mem_kb = "unknown", 0
    with contextlib.suppress(OSError, IndexError, ValueError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        mem_kb = int(Path("/proc/meminfo").read_text().split()[1])
    versions = {}
    for pkg in ("jax", "llama_cpp_python", "fastapi", "uvicorn"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[pkg] = metadata.version(pkg)
    return {"cpu": cpu, "cores": os.cpu_count(), "mem_gib": round(mem_kb / 2**20, 1),
            "python": platform.python_version(), **versions}


def parse_args(argv: list[str] | None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engines", default="llava_jax,llama_cpp", help="comma-separated, run in this order (default: %(default)s)")
    ap.add_argument("--concurrency", default="1,4,16", help="client counts (default: %(default)s)")
    ap.add_argument("--requests", type=int, default=0, metavar="N", help="requests per level (default: max(8, 2 x clients))")
    ap.add_argument("--max-tokens", type=int, default=16, help="max_tokens of each request (default: %(default)s)")
    ap.add_argument("--images", type=int, default=4, help="different images, cycled (default: %(default)s)")
    ap.add_argument("--unique-images", action="store_true", help="every request its own image (no image-cache hits)")
    ap.add_argument("-m", "--model", help="text GGUF (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--mmproj", help="mmproj GGUF (default: the project's random LLaVA-1.6 mmproj)")
    ap.add_argument("--slots", type=int, default=16, help="llava_jax -np (default: %(default)s)")
    ap.add_argument("--ctx", type=int, default=2048, help="llava_jax -c, the context of each slot (default: %(default)s)")
    ap.add_argument("--clip-compat", choices=("llama.cpp", "llava"), default="llama.cpp",
                    help="llava_jax --clip-compat (default: %(default)s: the same image graph and tokens as llama.cpp's)")
    ap.add_argument("--chat-template", default="vicuna",
                    help="llava_jax --chat-template (default: %(default)s, the layout of llama_cpp's llava-1-5 format)")
    ap.add_argument("--llava-jax-args", default="", help="more llava_jax.serve flags (one shell-quoted string)")
    ap.add_argument("--threads", type=int, default=2,
                    help="llama_cpp.server --n_threads, --n_threads_batch (default: %(default)s)")
    ap.add_argument("--llama-cpp-ctx", type=int, default=2048, help="llama_cpp.server --n_ctx (default: %(default)s)")
    ap.add_argument("--llama-cpp-chat-format", default="llava-1-5", help="llama_cpp.server --chat_format (default: %(default)s)")
    ap.add_argument("--llama-cpp-args", default="", help="more llama_cpp.server flags (one shell-quoted string)")
    ap.add_argument("--warmup-images", type=int, default=99, metavar="N", help="warm-up: the first N images once (default: all)")
    ap.add_argument("--no-warmup-burst", dest="warmup_burst", action="store_false",
                    help="no warm-up burst at the highest concurrency")
    ap.add_argument("--timeout", type=float, default=600, help="per-request timeout, s (default: %(default)s)")
    ap.add_argument("--startup-timeout", type=float, default=600, help="server start timeout, s (default: %(default)s)")
    ap.add_argument("--quiet-wait", type=float, default=60, metavar="S",
                    help="wait up to S s for an idle machine before each start and level (default: %(default)s; 0: never)")
    ap.add_argument("--log-dir", help="server logs (default: a temporary folder, removed unless a server failed)")
    ap.add_argument("-o", "--output", default="bench_serve.json", help="JSON result (default: %(default)s)")
    ap.add_argument("--markdown", help="markdown table (default: the JSON's path with .md)")
    args = ap.parse_args(argv)
    args.engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    bad = [e for e in args.engines if e not in ENGINES]
    if bad or not args.engines:
        ap.error(f"--engines: choose from {', '.join(ENGINES)}")
    try:
        args.concurrency = [int(c) for c in args.concurrency.split(",")]
    except ValueError:
        ap.error("--concurrency: comma-separated integers")
    if min(args.concurrency) < 1 or args.max_tokens < 1 or args.images < 1 or args.requests < 0:
        ap.error("--concurrency, --max-tokens and --images must be >= 1, --requests >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == [LLAMA_CPP_CHILD]:
        llama_cpp_server_main(argv[1:])
        return 0
    args = parse_args(argv)
    from llava_jax.defaults import default_mmproj_path, smollm2_path

    model = Path(args.model) if args.model else smollm2_path()
    mmproj = Path(args.mmproj) if args.mmproj else default_mmproj_path()
    n_requests = sum(args.requests or max(8, 2 * c) for c in args.concurrency)
    images = make_images(args.images, unique=n_requests + max(args.concurrency) + args.images if args.unique_images else 0)
    quiet = Quiet(args.quiet_wait)
    result = {"bench": "serve", "machine": machine(), "model": str(model), "mmproj": str(mmproj),
              "settings": {"engines": args.engines, "concurrency": args.concurrency, "requests": args.requests or "max(8, 2C)",
                           "max_tokens": args.max_tokens, "temperature": 0, "images": args.images,
                           "unique_images": args.unique_images, "slots": args.slots, "ctx": args.ctx,
                           "threads": args.threads, "chat_template": args.chat_template, "clip_compat": args.clip_compat,
                           "llama_cpp_chat_format": args.llama_cpp_chat_format},
              "engines": {}}
    log_dir = Path(args.log_dir) if args.log_dir else Path(tempfile.mkdtemp(prefix="bench_serve_"))
    log_dir.mkdir(parents=True, exist_ok=True)
    failed = False
    for engine in args.engines:
        try:
            result["engines"][engine] = bench_engine(engine, args, model, mmproj, images, log_dir, quiet)
        except (RuntimeError, OSError, ValueError, KeyError) as e:
            log(f"{engine}: failed: {e}")
            result["engines"][engine] = {"error": str(e)}
            failed = True
    result["quiet"] = quiet.summary()
    table = markdown(result)
    out = Path(args.output)
    out.write_text(json.dumps(result, indent=1) + "\n")
    md = Path(args.markdown) if args.markdown else out.with_suffix(".md")
    md.write_text(table)
    sys.stdout.write(table)
    log(f"wrote {out} and {md}")
    if not args.log_dir and not failed:
        for f in log_dir.iterdir():
            f.unlink()
        log_dir.rmdir()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
