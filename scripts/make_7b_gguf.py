"""Write llava-v1.5-7b-shaped GGUF files with random weights, for benchmarks (never commit them).

    python scripts/make_7b_gguf.py                    # Q4_K_M text model + CLIP-L-336 f16 mmproj
    python scripts/make_7b_gguf.py --type f16         # the F16 text model
    python scripts/make_7b_gguf.py --out-dir DIR --layers 4   # a shallower file (same widths)

The text model takes its metadata (LLaMA-7B hyper-parameters and the 32,000-token SentencePiece
vocabulary of Vicuna) from llama.cpp's `ggml-vocab-llama-spm.gguf` in `../shared/reference/vocab/`, and
gets random block bytes in the layout llama.cpp's quantizer gives `Q4_K_M`: Q4_K matrices, Q6_K for
`output` and for `attn_v` / `ffn_down` in the layers its `use_more_bits` rule picks, F32 norms. Every
f16 scale of a block is set to a small finite value so activations stay finite. The mmproj is
`random_mmproj`'s `clip-l-336` preset (CLIP ViT-L/14-336, 23 stored blocks, f16, projector
1024 → 4096 → 4096). Files are written into the cache (`~/.cache/llava_jax/bench/`) unless `--out-dir`.
Tensor data is streamed to disk one tensor at a time (the F16 file is 13.5 GB).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import gguf
import numpy as np

REPO = Path(__file__).resolve().parents[1]
VOCAB = REPO.parent / "shared" / "reference" / "vocab" / "ggml-vocab-llama-spm.gguf"
Q = gguf.GGMLQuantizationType
# Byte offsets of the f16 scales in one block (everything else is random quants / sub-scales).
SCALE_OFFSETS = {Q.Q4_K: (0, 2), Q.Q6_K: (208,)}
SCALE_RANGE = (2e-5, 1e-4)


def use_more_bits(i: int, n: int) -> bool:
    """llama.cpp's Q4_K_M rule for attn_v / ffn_down: the first and last eighth, and every third between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def tensor_plan(md: dict, kind: str) -> list[tuple[str, tuple[int, ...], Q]]:
    """(name, numpy-order shape, type) of every tensor of the 7B-shaped model, in llama.cpp's order."""
    d, f = md["llama.embedding_length"], md["llama.feed_forward_length"]
    n_layers, vocab = md["llama.block_count"], md["llama.vocab_size"]
    q4 = Q.Q4_K if kind == "q4_k_m" else Q.F16
    q6 = Q.Q6_K if kind == "q4_k_m" else Q.F16
    plan = [("token_embd.weight", (vocab, d), q4)]
    for i in range(n_layers):
        more = q6 if use_more_bits(i, n_layers) else q4
        p = f"blk.{i}."
        plan += [(p + "attn_norm.weight", (d,), Q.F32), (p + "attn_q.weight", (d, d), q4),
                 (p + "attn_k.weight", (d, d), q4), (p + "attn_v.weight", (d, d), more),
                 (p + "attn_output.weight", (d, d), q4), (p + "ffn_norm.weight", (d,), Q.F32),
                 (p + "ffn_gate.weight", (f, d), q4), (p + "ffn_up.weight", (f, d), q4),
                 (p + "ffn_down.weight", (d, f), more)]
    plan += [("output_norm.weight", (d,), Q.F32), ("output.weight", (vocab, d), q6)]
    return plan


def random_tensor(shape: tuple[int, ...], qtype: Q, rng: np.random.Generator) -> np.ndarray:
    """Bytes of one tensor (uint8 [rows, row_bytes]) or f32 values (norms near 1)."""
    if qtype == Q.F32:
        return (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
    if qtype == Q.F16:
        return (0.02 * rng.standard_normal(shape, dtype=np.float32)).astype(np.float16)
    bs, ts = gguf.GGML_QUANT_SIZES[qtype]
    rows, n_blocks = shape[0], shape[1] // bs
    raw = rng.integers(0, 256, (rows, n_blocks, ts), dtype=np.uint8)
    for off in SCALE_OFFSETS[qtype]:
        scale = rng.uniform(*SCALE_RANGE, (rows, n_blocks)).astype(np.float16)
        raw[..., off:off + 2] = scale.view(np.uint8).reshape(rows, n_blocks, 2)
    return raw.reshape(rows, n_blocks * ts)


def copy_metadata(reader: gguf.GGUFReader, writer: gguf.GGUFWriter, layers: int | None, kind: str) -> dict:
    """All key/values of the vocab file (but the writer's own and the file type) → writer; returns them."""
    md = {}
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name in ("general.architecture", "general.file_type"):
            continue
        value = field.contents()
        if name == "llama.block_count" and layers:
            value = layers
        md[name] = value
        sub = field.types[1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(name, value, field.types[0], sub_type=sub)
    writer.add_key_value("general.file_type", 15 if kind == "q4_k_m" else 1, gguf.GGUFValueType.UINT32)  # MOSTLY_Q4_K_M / F16
    return md


def write_text_model(path: Path, kind: str, layers: int | None, seed: int) -> Path:
    reader = gguf.GGUFReader(str(VOCAB))
    partial = path.with_name(path.name + ".partial")
    writer = gguf.GGUFWriter(str(partial), arch="llama")
    md = copy_metadata(reader, writer, layers, kind)
    plan = tensor_plan(md, kind)
    for name, shape, qtype in plan:
        if qtype in (Q.F32, Q.F16):
            dtype = np.dtype(np.float32 if qtype == Q.F32 else np.float16)
            writer.add_tensor_info(name, shape, dtype, int(np.prod(shape)) * dtype.itemsize)
        else:
            bs, ts = gguf.GGML_QUANT_SIZES[qtype]
            nbytes = shape[0] * shape[1] // bs * ts
            writer.add_tensor_info(name, (shape[0], shape[1] // bs * ts), np.dtype(np.uint8), nbytes, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    rng = np.random.default_rng(seed)
    for i, (_, shape, qtype) in enumerate(plan):
        writer.write_tensor_data(random_tensor(shape, qtype, rng))
        if i % 45 == 0:
            print(f"  {i + 1}/{len(plan)} tensors", file=sys.stderr, flush=True)
    writer.close()
    partial.replace(path)
    return path


def main(argv: list[str] | None = None) -> None:
    from llava_jax.defaults import cache_dir
    from llava_jax.random_mmproj import PRESETS, write_random_mmproj

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--type", choices=["q4_k_m", "f16"], default="q4_k_m")
    ap.add_argument("--layers", type=int, help="block count (default 32, LLaMA-7B's)")
    ap.add_argument("--out-dir", type=Path, help="default ~/.cache/llava_jax/bench")
    ap.add_argument("--no-mmproj", action="store_true", help="only the text model")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    out = args.out_dir or cache_dir() / "bench"
    out.mkdir(parents=True, exist_ok=True)
    suffix = f"-{args.layers}l" if args.layers else ""
    text = out / f"llava-v1.5-7b-shaped-{args.type}{suffix}.gguf"
    if not text.exists():
        write_text_model(text, args.type, args.layers, args.seed)
    print(text)
    if not args.no_mmproj:
        mm = out / "mmproj-clip-l-336-f16.gguf"
        if not mm.exists():
            write_random_mmproj(mm, PRESETS["clip-l-336"])
        print(mm)


if __name__ == "__main__":
    main()
