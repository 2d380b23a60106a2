"""One `python -m llava_jax.serve` for the server test modules (test_serve_*.py), started once per session.

The real SmolLM2 + a small LLaVA-1.6-style random mmproj (112-px base tile: ~120 image tokens per
image, the code paths of real files), -np 4, -c 1024, an API key and a --media-path directory holding
an image, a symlink out of it and a file next to it. The server runs in its own process on a free port
of 127.0.0.1 (`--port 0`; the port comes from its `listening on` line); its stderr lines are kept.
"""

from __future__ import annotations

import atexit
import base64
import io
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from tiny_mmproj import drawing, tiny_spec

from llava_jax.random_mmproj import write_random_mmproj

API_KEY = "test-key-123"
SLOTS = 4
N_CTX = 1024
MAX_IMAGES = 3


@dataclass
class Server:
    url: str
    proc: subprocess.Popen
    mmproj: Path
    media: Path
    outside: Path
    log: list[str] = field(default_factory=list)

    def client(self, **kwargs):
        from openai import OpenAI

        return OpenAI(**({"base_url": f"{self.url}/v1", "api_key": API_KEY, "max_retries": 0, "timeout": 300} | kwargs))


_server: Server | None = None


def png_bytes(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def data_url(img) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(img)).decode()


def image_message(text: str, *images) -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": data_url(im)}} for im in images]
    return [{"role": "user", "content": parts + [{"type": "text", "text": text}]}]


def server() -> Server:
    """The shared server of the test modules (started on first use)."""
    global _server
    if _server is None:
        _server = start()
    return _server


def start(slots: int = SLOTS, extra: tuple[str, ...] = ()) -> Server:
    """A new server process (killed at exit): `slots` slots, the defaults above, plus `extra` flags."""
    root = Path(tempfile.mkdtemp(prefix="llava_serve_"))
    mmproj = write_random_mmproj(root / "tiny16.gguf", tiny_spec(112, True, seed=1))
    media = root / "media"
    media.mkdir()
    drawing(90, 60, 1).save(media / "a.png")
    outside = root / "outside.png"
    drawing(50, 50, 9).save(outside)
    (media / "link.png").symlink_to(outside)
    cmd = [sys.executable, "-m", "llava_jax.serve", "--mmproj", str(mmproj), "--port", "0", "-np", str(slots),
           "-c", str(N_CTX), "--api-key", API_KEY, "--media-path", str(media), "--max-images", str(MAX_IMAGES), *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    log: list[str] = []
    ready = threading.Event()
    url: list[str] = []

    def read():
        for line in proc.stderr:
            log.append(line.rstrip("\n"))
            if line.startswith("listening on "):
                url.append(line.split()[-1])
                ready.set()
        ready.set()

    threading.Thread(target=read, daemon=True).start()
    ready.wait(600)
    if not url:
        proc.kill()
        raise RuntimeError("the server did not start:\n" + "\n".join(log[-30:]))
    atexit.register(proc.kill)
    return Server(url[0], proc, mmproj, media, outside, log)


def metric(text: str, name: str) -> float:
    """The value of an unlabelled metric line in Prometheus text (llava_jax_ prefix added)."""
    for line in text.splitlines():
        if line.startswith(f"llava_jax_{name} "):
            return float(line.split()[-1])
    raise KeyError(name)


def get(srv: Server, path: str, key: str | None = API_KEY):
    import httpx

    return httpx.get(srv.url + path, headers={"X-Api-Key": key} if key else {}, timeout=60)


def wait_until(cond, timeout: float = 60.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.2)
    return False
