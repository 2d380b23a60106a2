"""One prepared GPU benchmark: a llava-v1.5-7b-shaped model, batch-1 decode, quantized vs dequantized bf16.

    python scripts/bench_gpu.py [--out-dir /tmp/b7] [--gen 64] [--layers 32] -o gpu.json

Builds (on the GPU machine, never committed) the 7B-shaped Q4_K_M and F16 text files with
`make_7b_gguf.py`, then for each file and weight mode (`quantized`: blocks in HBM, dequantized inside
the compiled program; `dequantized`: bf16 arrays) loads the model with bf16 compute, decodes `--gen`
tokens greedily after a short prompt (EOS ignored), and reports decode tok/s, the weight bytes a
decode step reads, the HBM bandwidth that implies (bytes / step time), and whether the compiled decode
step materializes any full-size weight (an f32 / bf16 array of a matrix's shape outside a fusion): the
check that XLA fused the dequantization into the product. Prints one JSON object (and writes `-o`).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def materialized_weights(hlo: str, shapes: set[tuple[int, int]]) -> list[str]:
    """Top-level (ENTRY / while-body) instructions producing a full f32 / bf16 weight-shaped array."""
    out = []
    for line in hlo.splitlines():
        m = re.match(r"\s*%?(\S+) = (f32|bf16)\[(\d+),(\d+)\]", line)
        if m and (int(m.group(3)), int(m.group(4))) in shapes and "parameter(" not in line:
            out.append(line.strip()[:160])
    return out


def bench(path: str, weights: str, gen: int) -> dict:
    import jax

    import llava_jax
    from llava_jax.qtensor import param_bytes

    t0 = time.perf_counter()
    llm = llava_jax.load(path, dtype="bf16", weights=weights, n_ctx=1024)
    load_s = time.perf_counter() - t0
    prompt = "USER: Describe a cat in detail. ASSISTANT:"
    llm.generate(prompt, max_new_tokens=gen, temperature=0, ignore_eos=True)  # compile + warm
    res = llm.generate(prompt, max_new_tokens=gen, temperature=0, ignore_eos=True)
    t = res.timings
    step_s = t.generate_s / max(1, t.generated_tokens - 1)
    read = param_bytes(llm.engine.params) - param_bytes(llm.engine.params["token_embd"])
    cfg = llm.cfg
    shapes = {(cfg.n_heads * cfg.head_dim, cfg.dim), (cfg.ffn_dim, cfg.dim), (cfg.dim, cfg.ffn_dim), (cfg.vocab_size, cfg.dim)}
    hlo = "\n".join(c.as_text() for k, c in llm.engine._compiled.items() if k[0] == "decode")
    found = materialized_weights(hlo, shapes)
    return {"file": Path(path).name, "weights": weights, "device": str(jax.devices()[0]), "load_s": round(load_s, 2),
            "decode_tps": round((t.generated_tokens - 1) / t.generate_s, 2), "step_ms": round(step_s * 1e3, 3),
            "bytes_per_step_gb": round(read / 1e9, 3), "hbm_gb_s": round(read / step_s / 1e9, 1),
            "prefill_tps": round(t.prompt_tps, 1), "materialized_weights_in_decode": len(found),
            "materialized_examples": found[:3]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out-dir", default="/tmp/b7")
    ap.add_argument("--gen", type=int, default=64)
    ap.add_argument("--layers", type=int, default=None, help="shallower files (same widths), for a quick run")
    ap.add_argument("-o", "--output")
    args = ap.parse_args()
    files = []
    for kind in ("q4_k_m", "f16"):
        cmd = [sys.executable, str(HERE / "make_7b_gguf.py"), "--type", kind, "--no-mmproj", "--out-dir", args.out_dir]
        if args.layers:
            cmd += ["--layers", str(args.layers)]
        files.append(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[0])
    rows = []
    for path in files:
        for weights in ("quantized", "dequantized"):
            try:
                rows.append(bench(path, weights, args.gen))
            except Exception as e:  # one failed row (e.g. out of memory) must not lose the others
                rows.append({"file": Path(path).name, "weights": weights, "error": f"{type(e).__name__}: {str(e)[:300]}"})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    text = json.dumps({"rows": rows}, indent=1)
    print(text)
    if args.output:
        Path(args.output).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
