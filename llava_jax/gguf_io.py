"""GGUF file → metadata + memory-mapped tensor views, with clear errors for bad files.

Parses the header itself and memory-maps the data (see `GGUFFile`). Nothing here copies tensor
data: `TensorView.raw` is a numpy view into the mapped file, shaped `[*outer_dims, row_bytes]`
(uint8) for quantized and float types alike, so callers can slice rows (or blocks) and place them
on devices directly.

Shapes follow numpy order (the reverse of ggml's `ne`): a ggml matrix with ne = [n_in, n_out] is
`shape == (n_out, n_in)` here; rows are output features and quant blocks run along the last axis.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from llava_jax.errors import LlavaError

GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True)
class TensorView:
    """One tensor of a GGUF file, not yet decoded.

    name:  GGUF tensor name, e.g. "blk.0.attn_q.weight".
    shape: logical shape in numpy order, e.g. (n_out, n_in).
    qtype: ggml storage type.
    raw:   uint8 view into the mapped file, shape `shape[:-1] + (row_bytes,)`.
    """

    name: str
    shape: tuple[int, ...]
    qtype: GGMLQuantizationType
    raw: np.ndarray

    @property
    def block_size(self) -> int:
        return GGML_QUANT_SIZES[self.qtype][0]

    @property
    def type_size(self) -> int:
        return GGML_QUANT_SIZES[self.qtype][1]

    def blocks(self) -> np.ndarray:
        """uint8 view `shape[:-1] + (n_blocks, type_size)`: the unit `quants.dequantize_blocks` reads."""
        n_blocks = self.shape[-1] // self.block_size
        return self.raw.reshape(*self.shape[:-1], n_blocks, self.type_size)


_SCALAR = {  # GGUF value type id → struct format
    0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d",
}
_STRING, _ARRAY = 8, 9


class _Cursor:
    """Reads the little-endian GGUF header from a memory map; raises ValueError past the end.

    `struct.unpack_from` on the `mmap` itself: ~1 µs a value, so a 280k-merge vocabulary parses in
    a fraction of a second.
    """

    def __init__(self, buf: mmap.mmap, version: int):
        self.buf, self.pos, self.size = buf, 0, len(buf)
        self.count_fmt = "<I" if version == 1 else "<Q"

    def _unpack(self, fmt: str) -> tuple:
        n = struct.calcsize(fmt)
        if self.pos + n > self.size:
            raise ValueError(f"unexpected end of header at byte {self.pos} (truncated or corrupt file)")
        out = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return out

    def scalar(self, code: str) -> Any:
        return self._unpack("<" + code)[0]

    def count(self) -> int:
        return self._unpack(self.count_fmt)[0]

    def string(self) -> str:
        n = self.count()
        if self.pos + n > self.size:
            raise ValueError(f"unexpected end of header at byte {self.pos} (truncated or corrupt file)")
        out = self.buf[self.pos:self.pos + n].decode("utf-8", errors="replace")
        self.pos += n
        return out

    def value(self, vtype: int) -> Any:
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            sub, n = self.scalar("I"), self.count()
            if sub == _STRING:
                return [self.string() for _ in range(n)]
            if sub == _ARRAY:
                return [self.value(_ARRAY) for _ in range(n)]
            return list(self._unpack(f"<{n}{_code(sub)}"))
        return self.scalar(_code(vtype))


def _code(vtype: int) -> str:
    if vtype not in _SCALAR:
        raise ValueError(f"unknown GGUF value type {vtype}")
    return _SCALAR[vtype]


class GGUFFile:
    """An opened GGUF file: `metadata` (key → Python value) and `tensors` (name → TensorView).

    A small header parser of our own over `np.memmap`: the `gguf` package's reader builds a Python
    object per string and takes ~30 s on a 128k-token vocabulary; this takes well under a second.
    Tensor data is only mapped, never read, here.
    """

    def __init__(self, path: str | os.PathLike[str]):
        self.path = os.fspath(path)
        self.name = os.path.basename(self.path)
        if not os.path.exists(self.path):
            raise LlavaError(f"file not found: {self.path}")
        if os.path.isdir(self.path):
            raise LlavaError(f"expected a GGUF file, got a directory: {self.path}")
        size = os.path.getsize(self.path)
        if size < 24:
            raise LlavaError(f"not a GGUF file ({size} bytes): {self.path}")
        self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
        if bytes(self._map[:4]) != GGUF_MAGIC:
            raise LlavaError(f"not a GGUF file (bad magic {bytes(self._map[:4])!r}): {self.path}")
        self.version = int(self._map[4:8].view(np.uint32)[0])
        if self.version not in (1, 2, 3):
            raise LlavaError(f"unsupported GGUF version {self.version} (big-endian or corrupt?): {self.path}")
        try:
            self.metadata, infos, data_start = self._parse_header()
        except (ValueError, struct.error) as e:  # struct.error: an absurd array length
            raise LlavaError(f"cannot read GGUF file {self.path}: {_one_line(e)}") from None
        self.tensors = self._map_tensors(infos, data_start)

    def _parse_header(self) -> tuple[dict[str, Any], list, int]:
        with open(self.path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            cur = _Cursor(buf, self.version)
            cur.pos = 8
            n_tensors, n_kv = cur.count(), cur.count()
            metadata: dict[str, Any] = {"GGUF.version": self.version}
            for _ in range(n_kv):
                key = cur.string()
                metadata[key] = cur.value(cur.scalar("I"))
            infos = []
            for _ in range(n_tensors):
                tname = cur.string()
                ne = [cur.count() for _ in range(cur.scalar("I"))]
                infos.append((tname, ne, cur.scalar("I"), cur.scalar("Q")))
        alignment = int(metadata.get("general.alignment", 32))
        return metadata, infos, -(-cur.pos // alignment) * alignment

    def _map_tensors(self, infos: list, data_start: int) -> dict[str, TensorView]:
        out = {}
        for tname, ne, type_id, offset in infos:
            try:
                qtype = GGMLQuantizationType(type_id)
            except ValueError:
                raise LlavaError(f"tensor {tname}: unknown ggml type id {type_id} in {self.path}") from None
            shape = tuple(int(d) for d in reversed(ne)) or (1,)
            block, type_size = GGML_QUANT_SIZES[qtype]
            if shape[-1] % block:
                raise LlavaError(f"tensor {tname}: last dim {shape[-1]} is not a multiple of the {qtype.name} block size {block}")
            row_bytes = shape[-1] // block * type_size
            n_bytes = int(np.prod(shape[:-1], dtype=object)) * row_bytes  # Python ints: corrupt dims must not wrap
            start = data_start + offset
            if start + n_bytes > self._map.size:
                raise LlavaError(f"tensor {tname}: data runs past the end of the file (truncated?): {self.path}")
            raw = self._map[start:start + n_bytes].reshape(*shape[:-1], row_bytes)
            out[tname] = TensorView(tname, shape, qtype, raw)
        return out

    def release(self, view: TensorView) -> None:
        """Drop the mapped pages of `view` from this process (after its data was copied to the devices):
        otherwise the file's pages stay resident beside the copies and count twice in the RSS. Harmless
        if the data is read again (the pages come back from the file)."""
        mm = getattr(self._map, "_mmap", None)
        if mm is None or not hasattr(mm, "madvise") or not hasattr(mmap, "MADV_DONTNEED"):
            return
        start = view.raw.ctypes.data - self._map.ctypes.data
        page = mmap.PAGESIZE
        lo = start // page * page
        hi = min(-(-(start + view.raw.nbytes) // page) * page, len(mm))
        if hi > lo:
            mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)

    @property
    def architecture(self) -> str | None:
        return self.metadata.get("general.architecture")

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    def require(self, key: str) -> Any:
        if key not in self.metadata:
            raise LlavaError(f"{self.name}: missing required metadata key {key!r}")
        return self.metadata[key]


def _one_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return (lines[0] if lines else type(e).__name__)[:300]


def open_gguf(path: str | os.PathLike[str]) -> GGUFFile:
    """Open and validate a GGUF file; raises LlavaError (one line) on any problem."""
    return GGUFFile(path)
