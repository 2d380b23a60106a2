"""The image-embedding cache: an LRU of encoded images, keyed by the image bytes' hash and the encoder's
preprocessing settings, bounded in bytes. The same image asked about again (multi-turn chat, many
questions per image) is not encoded again.

Only the engine thread calls `get_or_encode`; the counters are read by `/metrics` from other threads.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable

import numpy as np


def encoder_settings(encoder) -> str:
    """What, besides the bytes, decides an image's embedding: the tower and projector config (tile size,
    grid pinpoints, merge, ...), the pipeline semantics (clip-compat), the dtype and the file's name."""
    return f"{encoder.name}|{encoder.compat}|{encoder.dtype}|{encoder.cfg!r}"


def image_key(data: bytes, settings: str) -> str:
    return hashlib.sha256(hashlib.sha256(data).digest() + settings.encode()).hexdigest()


class ImageCache:
    def __init__(self, capacity_bytes: int):
        self.capacity = max(0, int(capacity_bytes))
        self._items: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()
        self.bytes = 0
        self.hits = self.misses = self.encodes = 0

    def get_or_encode(self, key: str, encode: Callable[[], np.ndarray]) -> np.ndarray:
        with self._lock:
            hit = self._items.get(key)
            if hit is not None:
                self._items.move_to_end(key)
                self.hits += 1
                return hit
            self.misses += 1
        value = np.asarray(encode(), np.float32)
        with self._lock:
            self.encodes += 1
            if value.nbytes <= self.capacity and key not in self._items:
                self._items[key] = value
                self.bytes += value.nbytes
                while self.bytes > self.capacity:
                    _, old = self._items.popitem(last=False)
                    self.bytes -= old.nbytes
        return value

    def __len__(self) -> int:
        return len(self._items)
