"""F32 rewrite of a GGUF file: every tensor dequantized exactly, written back as F32, metadata unchanged.

    python -m llava_jax.rewrite IN.gguf OUT.gguf

The rewrite computes the same function as the quantized file for an f32 implementation that
dequantizes exactly (as llava_jax does), so llama.cpp run on it is the exact reference — and the
fair f32-vs-f32 benchmark partner. Dequantization is `gguf.quants.dequantize` (the gguf package's
reference numpy code); key/values are copied field by field as `gguf`'s own `gguf_new_metadata`
script does (only the header fields the writer regenerates are skipped), so tokenizer, rope and
hyper-parameters — and even `general.file_type` — are identical.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import gguf
import numpy as np


def write_f32_rewrite(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Write the F32 rewrite of `src` to `dst` (atomically, via `dst.partial`). Returns `dst`."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    reader = gguf.GGUFReader(src)
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    partial = dst.with_name(dst.name + ".partial")
    writer = gguf.GGUFWriter(partial, arch)
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue  # written by GGUFWriter itself
        val_type = field.types[0]
        sub_type = field.types[-1] if val_type == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), val_type, sub_type=sub_type)
    for t in reader.tensors:
        data = gguf.quants.dequantize(t.data, t.tensor_type)  # numpy order [..., n_in], exact
        writer.add_tensor(t.name, np.ascontiguousarray(data, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    partial.replace(dst)
    return dst


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python -m llava_jax.rewrite IN.gguf OUT.gguf")
    print(write_f32_rewrite(sys.argv[1], sys.argv[2]))
