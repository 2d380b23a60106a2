"""Reading checkpoint shards: safetensors without torch, PyTorch `.bin` with torch (only then).

`Checkpoint(directory)` indexes every tensor name of a model directory (one file or sharded with an
`*.index.json`) without reading data; `get(name)` returns a float32 numpy array (bf16/f16 widened
exactly). Safetensors files are parsed here (8-byte header length, JSON header, raw little-endian data)
and memory-mapped, so no tensor is read until asked for.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np

from llava_jax.errors import LlavaError

_ST_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


def bf16_to_f32(raw: np.ndarray) -> np.ndarray:
    """uint16 bfloat16 bit patterns → float32 (exact)."""
    return (raw.astype(np.uint32) << 16).view(np.float32)


class SafetensorsFile:
    """One .safetensors file: `shapes` (name → shape) from the header, `get(name)` → float32 array."""

    def __init__(self, path: Path):
        self.path = path
        try:
            with open(path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                if n > 100_000_000:
                    raise ValueError("header length is implausible")
                header = json.loads(f.read(n))
        except (OSError, ValueError, struct.error) as e:
            raise LlavaError(f"cannot read safetensors file {path}: {e}") from None
        header.pop("__metadata__", None)
        self._info = header
        self._data_start = 8 + n
        self._map: np.memmap | None = None
        self.shapes = {name: tuple(info["shape"]) for name, info in header.items()}

    def get(self, name: str) -> np.ndarray:
        info = self._info[name]
        dtype = _ST_DTYPES.get(info["dtype"])
        if dtype is None:
            raise LlavaError(f"tensor {name} in {self.path.name}: unsupported safetensors dtype {info['dtype']}")
        if self._map is None:
            self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
        begin, end = info["data_offsets"]
        raw = self._map[self._data_start + begin:self._data_start + end]
        if raw.size != end - begin:
            raise LlavaError(f"tensor {name}: data runs past the end of {self.path} (truncated?)")
        arr = raw.view(dtype).reshape(info["shape"])
        if info["dtype"] == "BF16":
            return bf16_to_f32(arr)
        return arr.astype(np.float32)


class TorchBinFile:
    """One PyTorch .bin state dict, loaded lazily with torch (memory-mapped where torch can)."""

    def __init__(self, path: Path):
        self.path = path
        try:
            import torch
        except ImportError:
            raise LlavaError(f"{path.name} is a PyTorch .bin checkpoint: reading it needs torch "
                             "(pip install torch), or convert the shards to safetensors") from None
        try:
            try:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # old (non-zip) serialization cannot be memory-mapped
                state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises many types for a bad file
            raise LlavaError(f"cannot read PyTorch checkpoint {path}: {_one_line(e)}") from None
        if not isinstance(state, dict):
            raise LlavaError(f"{path} does not hold a state dict")
        if "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        self._state = {k: v for k, v in state.items() if hasattr(v, "shape")}
        self.shapes = {k: tuple(v.shape) for k, v in self._state.items()}

    def get(self, name: str) -> np.ndarray:
        import torch

        t = self._state[name]
        return t.detach().to(torch.float32).contiguous().numpy()


def _one_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return (lines[0] if lines else type(e).__name__)[:300]


class Checkpoint:
    """All tensors of a model directory: `name in ckpt`, `shape(name)`, `get(name)` → float32 ndarray.

    With a shard index the tensor names come from its `weight_map` and a shard is opened only when one of
    its tensors is first asked for (so `.bin` shards, and torch, are only touched when needed); every shard
    the index names must exist.
    """

    def __init__(self, directory: str | os.PathLike[str]):
        self.dir = Path(directory)
        self._files: dict[str, SafetensorsFile | TorchBinFile] = {}
        self._where: dict[str, str] = {}
        weight_map = self._index()
        if weight_map is not None:
            for fname in sorted(set(weight_map.values())):
                if not (self.dir / fname).is_file():
                    raise LlavaError(f"missing shard {fname} in {self.dir} (listed in its index)")
            self._where = dict(weight_map)
            return
        for fname in self._files_without_index():
            for tname in self._open(fname).shapes:
                self._where.setdefault(tname, fname)

    def _index(self) -> dict[str, str] | None:
        for name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            index = self.dir / name
            if index.is_file():
                try:
                    weight_map = json.loads(index.read_text())["weight_map"]
                except (ValueError, KeyError, TypeError) as e:
                    raise LlavaError(f"cannot read shard index {index}: {_one_line(e)}") from None
                return {str(k): str(v) for k, v in weight_map.items()}
        return None

    def _files_without_index(self) -> list[str]:
        d = self.dir
        for single in ("model.safetensors", "pytorch_model.bin"):
            if (d / single).is_file():
                return [single]
        found = sorted(p.name for p in d.glob("*.safetensors")) or sorted(
            p.name for p in d.glob("*.bin") if p.name != "training_args.bin")
        if not found:
            raise LlavaError(f"no weights in {d}: expected model.safetensors, model-*.safetensors or pytorch_model*.bin")
        return found

    def _open(self, fname: str) -> SafetensorsFile | TorchBinFile:
        if fname not in self._files:
            path = self.dir / fname
            self._files[fname] = SafetensorsFile(path) if fname.endswith(".safetensors") else TorchBinFile(path)
        return self._files[fname]

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def names(self) -> list[str]:
        return list(self._where)

    def _file_of(self, name: str) -> SafetensorsFile | TorchBinFile:
        if name not in self._where:
            raise LlavaError(f"missing tensor {name} in {self.dir}")
        f = self._open(self._where[name])
        if name not in f.shapes:
            raise LlavaError(f"missing tensor {name} in shard {f.path.name} (its index lists it there)")
        return f

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._file_of(name).shapes[name])

    def get(self, name: str) -> np.ndarray:
        return self._file_of(name).get(name)
