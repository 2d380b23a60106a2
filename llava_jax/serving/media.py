"""`image_url` parts → image bytes → a decoded RGB image, with the server's limits.

* `data:image/...;base64,...`: decoded strictly (bad base64 is a 400).
* `file://PATH`: only with `--media-path DIR`; the path is resolved (symlinks followed) and must stay
  under DIR (`..` in the path is refused outright, a symlink out of DIR fails the resolved check).
* `http(s)://`: refused unless `--allow-remote-media`; then fetched with a size cap and a timeout.

Every refusal is a `MediaError` (a LlavaError) with the request parameter it concerns; the HTTP layer
answers it with 400.
"""

from __future__ import annotations

import base64
import binascii
import io
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from llava_jax.errors import LlavaError


class MediaError(LlavaError):
    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class MediaPolicy:
    media_path: Path | None = None  # file:// allowed under this directory only
    allow_remote: bool = False  # http(s) URLs fetched
    max_bytes: int = 20 << 20  # one image's bytes
    timeout_s: float = 10.0  # a remote fetch
    max_pixels: int = 4096 * 4096  # width x height after decoding the header


def image_bytes(url: str, policy: MediaPolicy, param: str) -> bytes:
    """The bytes an image_url names (see the module docstring for what is allowed)."""
    if not isinstance(url, str) or not url:
        raise MediaError("image_url.url must be a non-empty string", param)
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        header, sep, payload = url.partition(",")
        if not sep or ";base64" not in header.lower():
            raise MediaError("a data: image URL must be data:image/...;base64,<data>", param)
        try:
            data = base64.b64decode("".join(payload.split()), validate=True)
        except (binascii.Error, ValueError):
            raise MediaError("the data: image URL is not valid base64", param) from None
        if not data:
            raise MediaError("the data: image URL holds no bytes", param)
        return data
    if scheme == "file":
        return _file_bytes(url, policy, param)
    if scheme in ("http", "https"):
        if not policy.allow_remote:
            raise MediaError("remote image URLs (http/https) are refused: send the image as a data: URL, or start the "
                             "server with --allow-remote-media", param)
        return _fetch(url, policy, param)
    raise MediaError(f"unsupported image URL scheme {scheme or url[:16]!r} (data:, file:// under --media-path, "
                     "or http(s) with --allow-remote-media)", param)


def _file_bytes(url: str, policy: MediaPolicy, param: str) -> bytes:
    if policy.media_path is None:
        raise MediaError("file:// image URLs need the server started with --media-path DIR", param)
    parsed = urllib.parse.urlparse(url)
    if parsed.netloc not in ("", "localhost"):
        raise MediaError("file:// URLs must name a local path (file:///...)", param)
    raw = urllib.parse.unquote(parsed.path)
    if ".." in Path(raw).parts:
        raise MediaError("file:// paths may not contain '..'", param)
    root = policy.media_path.resolve()
    path = (root / raw.lstrip("/")) if not Path(raw).is_absolute() else Path(raw)
    resolved = path.resolve()
    if not resolved.is_relative_to(root):
        raise MediaError("file:// path is outside --media-path", param)
    if not resolved.is_file():
        raise MediaError("file:// path is not a file under --media-path", param)
    if resolved.stat().st_size > policy.max_bytes:
        raise MediaError(f"image file is larger than {policy.max_bytes} bytes", param)
    return resolved.read_bytes()


def _fetch(url: str, policy: MediaPolicy, param: str) -> bytes:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers={"User-Agent": "llava_jax"}),
                                    timeout=policy.timeout_s) as r:
            data = r.read(policy.max_bytes + 1)
    except Exception as e:  # network errors of every kind: one line, no traceback
        raise MediaError(f"could not fetch the image URL: {type(e).__name__}: {str(e)[:200]}", param) from None
    if len(data) > policy.max_bytes:
        raise MediaError(f"remote image is larger than {policy.max_bytes} bytes", param)
    return data


def decode_image(data: bytes, policy: MediaPolicy, param: str):
    """Bytes → an RGB PIL image; not an image, or more pixels than the cap, is a MediaError."""
    from PIL import Image

    try:
        img = Image.open(io.BytesIO(data))
        w, h = img.size
        if w * h > policy.max_pixels:
            raise MediaError(f"image is {w}x{h} = {w * h} pixels, the limit is {policy.max_pixels} (--max-pixels)", param)
        img.load()
        return img.convert("RGB")
    except MediaError:
        raise
    except Exception:  # PIL raises many kinds (UnidentifiedImageError, OSError, DecompressionBombError, ...)
        raise MediaError("the image bytes are not an image this server can read", param) from None
