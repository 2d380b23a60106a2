"""Out types and the streaming GGUF writer shared by both halves.

A `Plan` is the whole output described before any byte is written: metadata calls on a `gguf.GGUFWriter`
and a list of `PlannedTensor`s (name, source shape, storage type, a loader). Planning resolves every
tensor, so a missing tensor or shard is refused before an output file exists. `write_plans` then streams
tensor by tensor (header, key/values, tensor infos, then data), so memory stays at one tensor at a time.

Storage types follow llama.cpp's converter: 1-D tensors, norms, biases and anything not named `*.weight`
(class embedding, image_newline) and position embeddings are F32; the CLIP patch kernel is F16 for the
f16 out type and F32 otherwise; other weights take the out type. q8_0 goes through `gguf.quants.quantize`
(bit-exact with llama.cpp's quantizer) and falls back to F16 where a row is not a multiple of 32.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as QT

from llava_jax.errors import LlavaError

OUTTYPES: dict[str, tuple[QT, gguf.LlamaFileType]] = {
    "f32": (QT.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (QT.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (QT.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "q8_0": (QT.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
}


def check_outtype(outtype: str) -> str:
    if outtype not in OUTTYPES:
        raise LlavaError(f"unsupported out type {outtype!r}: choose one of {', '.join(OUTTYPES)}")
    return outtype


def storage_type(name: str, shape: tuple[int, ...], outtype: str) -> QT:
    """The ggml type a tensor named `name` (GGUF name) of `shape` is stored in for `outtype`."""
    qtype = OUTTYPES[check_outtype(outtype)][0]
    if len(shape) <= 1 or name.endswith("_norm.weight") or not name.endswith(".weight"):
        return QT.F32
    if "position_embd" in name:
        return QT.F32
    if name.startswith("v.patch_embd"):
        return QT.F16 if qtype == QT.F16 else QT.F32
    if qtype == QT.Q8_0 and shape[-1] % gguf.GGML_QUANT_SIZES[QT.Q8_0][0]:
        return QT.F16
    return qtype


def encode(data: np.ndarray, qtype: QT) -> np.ndarray:
    """float32 array → the bytes (or f16/f32 array) to store for `qtype`."""
    data = np.ascontiguousarray(data, dtype=np.float32)
    if qtype == QT.F32:
        return data
    if qtype == QT.F16:
        return data.astype(np.float16)
    return gguf.quants.quantize(data, qtype)


def stored_nbytes(shape: tuple[int, ...], qtype: QT) -> int:
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    return int(np.prod(shape[:-1], dtype=np.int64)) * (shape[-1] // block) * type_size


@dataclass
class PlannedTensor:
    name: str
    shape: tuple[int, ...]  # numpy order
    qtype: QT
    load: Callable[[], np.ndarray]  # → float32 array of `shape`

    @property
    def nbytes(self) -> int:
        return stored_nbytes(self.shape, self.qtype)


@dataclass
class Plan:
    arch: str
    metadata: Callable[[gguf.GGUFWriter], None]
    tensors: list[PlannedTensor] = field(default_factory=list)

    def add(self, name: str, shape: tuple[int, ...], load: Callable[[], np.ndarray], outtype: str,
            qtype: QT | None = None) -> None:
        shape = tuple(int(x) for x in shape)
        self.tensors.append(PlannedTensor(name, shape, qtype or storage_type(name, shape, outtype), load))

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


def write_plans(items: list[tuple[Plan, Path]], progress: bool = True) -> None:
    """Write each plan to its path (via a `.partial` file, renamed at the end) with one progress bar."""
    from tqdm import tqdm

    total = sum(plan.nbytes for plan, _ in items)
    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="converting", disable=not progress,
              dynamic_ncols=True) as bar:
        for plan, path in items:
            _write_one(plan, Path(path), bar)


def _write_one(plan: Plan, path: Path, bar) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    writer = gguf.GGUFWriter(partial, arch=plan.arch)
    try:
        plan.metadata(writer)
        for t in plan.tensors:
            if t.qtype in (QT.F32, QT.F16):
                writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32 if t.qtype == QT.F32 else np.float16),
                                       t.nbytes)
            else:
                byte_shape = gguf.quant_shape_to_byte_shape(t.shape, t.qtype)
                writer.add_tensor_info(t.name, byte_shape, np.dtype(np.uint8), t.nbytes, raw_dtype=t.qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for t in plan.tensors:
            bar.set_postfix_str(t.name, refresh=False)
            data = t.load()
            if tuple(data.shape) != t.shape:
                raise LlavaError(f"tensor {t.name}: expected shape {t.shape}, got {tuple(data.shape)}")
            writer.write_tensor_data(encode(data, t.qtype))
            bar.update(t.nbytes)
        writer.close()
        os.replace(partial, path)
    except BaseException:
        writer.close()
        partial.unlink(missing_ok=True)
        raise
