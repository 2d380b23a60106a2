"""`bench.py --mode 7b`: a llava-v1.5-7b-shaped model end to end, llava_jax next to llama.cpp (`--llama-cpp`).

    python scripts/make_7b_gguf.py                      # once: Q4_K_M text model + CLIP-L-336 f16 mmproj
    python scripts/bench.py --mode 7b --llama-cpp        # image prompt on the Q4_K_M file
    python scripts/make_7b_gguf.py --type f16 --no-mmproj
    python scripts/bench.py --mode 7b --llama-cpp --text-only -m ~/.cache/llava_jax/bench/llava-v1.5-7b-shaped-f16.gguf

Each engine runs in its own process (so its peak RSS is its own): load the model (+ mmproj), then twice
(the first run pays compilation / graph allocation; the second is reported): encode the image, prefill
LLaVA-1.5's prompt `USER: <image>\\n{question} ASSISTANT:` (576 image tokens + the text), decode
`--gen-tokens` tokens greedily ignoring EOS (random weights). Reported: load s, peak RSS (the process's
`ru_maxrss`), image encode s, prefill tok/s (image + text tokens), time to first token (encode + prefill),
decode tok/s. Both use the same `-c` (`--ctx`).

llama.cpp: llama-cpp-python with `--threads` threads, models loaded with `use_extra_bufts=False` (its
repacked CPU buffers crash in these VMs), its default KV cache (f16) and flash-attention setting (auto):
its fastest settings that run here. The image goes through `mtmd_encode_chunk` (timed as encode) and
`mtmd_helper_decode_image_chunk` (prefill, with the text chunks through `mtmd_helper_eval_chunk_single`).
llava_jax: its defaults (quantized weights on CPU, f32 compute and KV cache, native decode kernels);
`--kv-f16` gives it llama.cpp's f16 KV cache instead.
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from bench_common import load_average, log

MODE = "7b"
QUESTION = "Describe the image in detail."
HERE = Path(__file__).resolve().parent


def add_arguments(group) -> None:
    # --mmproj (the image mode's flag) names the mmproj; default: the cache's mmproj-clip-l-336-f16.gguf
    group.add_argument("--ctx", type=int, default=2048, help="context size of both engines")
    group.add_argument("--text-only", action="store_true", help="no image: a short text prompt (e.g. the F16 file)")
    group.add_argument("--engines", default="llava_jax,llama_cpp", help="comma list (llama_cpp needs --llama-cpp)")
    group.add_argument("--kv-f16", action="store_true",
                       help="llava_jax with an f16 KV cache (-ctk/-ctv f16: llama.cpp's default), not its f32 default")


def _image():
    from PIL import Image

    return Image.open(Path(__file__).resolve().parents[1] / "llava_jax" / "assets" / "shapes.png").convert("RGB")


def _peak_rss_gib() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)


def worker_llava_jax(spec: dict) -> dict:
    import llava_jax

    t0 = time.perf_counter()
    llm = llava_jax.load(spec["model"], mmproj=spec.get("mmproj"), n_ctx=spec["ctx"], kv_dtype=spec.get("kv_dtype"))
    out = {"load_s": round(time.perf_counter() - t0, 3), "weights": "quantized" if any(
        type(x).__name__ == "QTensor" for x in _leaves(llm.engine.params)) else "dequantized",
        "decode_kernels": llm.engine.decode_kernels, "kv_cache": str(llm.engine.kv_dtype), "runs": []}
    images = [_image()] if spec.get("mmproj") else []
    prompt = f"USER: <image>\n{QUESTION} ASSISTANT:" if images else "USER: " + QUESTION + " ASSISTANT:"
    for _ in range(2):
        res = llm.generate(prompt, images, max_new_tokens=spec["gen"], temperature=0, ignore_eos=True)
        t = res.timings
        out["runs"].append({"image_s": round(t.image_s, 3), "prompt_tokens": t.prompt_tokens, "prefill_s": round(t.prompt_s, 3),
                            "decode_tokens": t.generated_tokens - 1, "decode_s": round(t.generate_s, 3),
                            "compile_s": round(t.compile_s, 3)})
    out["peak_rss_gib"] = _peak_rss_gib()
    return out


def _leaves(tree):
    import jax

    from llava_jax.qtensor import is_qtensor

    return jax.tree_util.tree_leaves(tree, is_leaf=is_qtensor)


def worker_llama_cpp(spec: dict) -> dict:
    from bench_common import llama_cpp_without_extra_bufts, silence_mtmd_logs

    threads = spec["threads"]
    with llama_cpp_without_extra_bufts() as llama_cpp:
        import llama_cpp.mtmd_cpp as mtmd

        silence_mtmd_logs()
        t0 = time.perf_counter()
        llm = llama_cpp.Llama(spec["model"], n_ctx=spec["ctx"], n_batch=512, n_threads=threads,
                              n_threads_batch=threads, verbose=False)
        ctx = None
        if spec.get("mmproj"):
            params = mtmd.mtmd_context_params_default()
            params.use_gpu, params.n_threads, params.warmup, params.print_timings = False, threads, False, False
            ctx = mtmd.mtmd_init_from_file(spec["mmproj"].encode(), llm._model.model, params)
        load_s = time.perf_counter() - t0
    assert not llm.model_params.use_extra_bufts
    lctx, n_vocab = llm._ctx.ctx, llm.n_vocab()
    out = {"load_s": round(load_s, 3), "threads": threads, "kv_cache": "f16 (default)", "runs": []}

    def argmax() -> int:
        return int(np.argmax(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(lctx, -1), shape=(n_vocab,))))

    for _ in range(2):
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(lctx), True)
        image_s = prefill_s = 0.0
        n_past, n_tokens = 0, 0
        if ctx:
            text = f"USER: {mtmd.mtmd_default_marker().decode()}\n{QUESTION} ASSISTANT:"
            pixels = np.ascontiguousarray(np.asarray(_image(), dtype=np.uint8))
            h, w = pixels.shape[:2]
            bitmap = mtmd.mtmd_bitmap_init(w, h, (ctypes.c_uint8 * pixels.size).from_buffer_copy(pixels.tobytes()))
            chunks = mtmd.mtmd_input_chunks_init()
            inp = mtmd.mtmd_input_text(text=text.encode(), text_len=len(text.encode()), add_special=True, parse_special=True)
            if mtmd.mtmd_tokenize(ctx, chunks, ctypes.byref(inp), (mtmd.mtmd_bitmap_p_ctypes * 1)(bitmap), 1) != 0:
                raise SystemExit("mtmd_tokenize failed")
            new_past = llama_cpp.llama_pos(0)
            for i in range(mtmd.mtmd_input_chunks_size(chunks)):
                chunk = mtmd.mtmd_input_chunks_get(chunks, i)
                n = int(mtmd.mtmd_input_chunk_get_n_tokens(chunk))
                last = i == mtmd.mtmd_input_chunks_size(chunks) - 1
                if mtmd.mtmd_input_chunk_get_type(chunk) == mtmd.MTMD_INPUT_CHUNK_TYPE_IMAGE:
                    t0 = time.perf_counter()
                    if mtmd.mtmd_encode_chunk(ctx, chunk) != 0:
                        raise SystemExit("mtmd_encode_chunk failed")
                    image_s += time.perf_counter() - t0
                    t0 = time.perf_counter()
                    rc = mtmd.mtmd_helper_decode_image_chunk(ctx, lctx, chunk, mtmd.mtmd_get_output_embd(ctx), n_past, 0,
                                                             512, ctypes.byref(new_past),
                                                             mtmd.mtmd_helper_post_decode_callback(), None)
                else:
                    t0 = time.perf_counter()
                    rc = mtmd.mtmd_helper_eval_chunk_single(ctx, lctx, chunk, n_past, 0, 512, last, ctypes.byref(new_past))
                prefill_s += time.perf_counter() - t0
                if rc != 0:
                    raise SystemExit(f"mtmd chunk {i} failed ({rc})")
                n_past, n_tokens = new_past.value, n_tokens + n
            mtmd.mtmd_input_chunks_free(chunks)
            mtmd.mtmd_bitmap_free(bitmap)
            t0 = time.perf_counter()
            token = argmax()
            prefill_s += time.perf_counter() - t0
        else:
            ids = llm.tokenize(("USER: " + QUESTION + " ASSISTANT:").encode(), add_bos=True, special=True)
            t0 = time.perf_counter()
            llm.eval(ids)
            token = argmax()
            prefill_s, n_tokens = time.perf_counter() - t0, len(ids)
        t0 = time.perf_counter()
        for _ in range(spec["gen"]):
            arr = (llama_cpp.llama_token * 1)(token)
            if llama_cpp.llama_decode(lctx, llama_cpp.llama_batch_get_one(arr, 1)) != 0:
                raise SystemExit("llama_decode failed")
            token = argmax()
        out["runs"].append({"image_s": round(image_s, 3), "prompt_tokens": n_tokens, "prefill_s": round(prefill_s, 3),
                            "decode_tokens": spec["gen"], "decode_s": round(time.perf_counter() - t0, 3)})
    if ctx:
        mtmd.mtmd_free(ctx)
    out["peak_rss_gib"] = _peak_rss_gib()
    llm.close()
    return out


def _summary(r: dict) -> dict:
    run = r["runs"][-1]  # the warm run
    return {"load_s": r["load_s"], "peak_rss_gib": r["peak_rss_gib"], "image_encode_s": run["image_s"],
            "prompt_tokens": run["prompt_tokens"], "prefill_tps": round(run["prompt_tokens"] / run["prefill_s"], 2),
            "ttft_s": round(run["image_s"] + run["prefill_s"], 3),
            "decode_tps": round(run["decode_tokens"] / run["decode_s"], 3)}


def run(args) -> dict:
    from llava_jax.defaults import cache_dir

    model = str(Path(args.model or cache_dir() / "bench" / "llava-v1.5-7b-shaped-q4_k_m.gguf").expanduser())
    mmproj = None if args.text_only else str(Path(args.mmproj or cache_dir() / "bench" / "mmproj-clip-l-336-f16.gguf"))
    for path in filter(None, (model, mmproj)):
        if not Path(path).exists():
            raise SystemExit(f"{path} is missing: run python scripts/make_7b_gguf.py first")
    spec = {"model": model, "mmproj": mmproj, "ctx": args.ctx, "gen": args.gen_tokens, "threads": args.threads,
            "kv_dtype": "f16" if args.kv_f16 else None}
    engines = [e for e in args.engines.split(",") if e != "llama_cpp" or args.llama_cpp]
    result: dict = {"model": model, "mmproj": mmproj, "ctx": args.ctx, "gen_tokens": args.gen_tokens,
                    "load_avg_before": load_average()}
    for engine in engines:
        pair = Path(model).name + (f" + {Path(mmproj).name}" if mmproj else "")
        log(f"== {engine}: {pair}, -c {args.ctx}, load avg {load_average()}")
        proc = subprocess.run([sys.executable, __file__, "--worker", engine, json.dumps(spec)], capture_output=True,
                              text=True, cwd=HERE, env=dict(os.environ, PYTHONPATH=str(HERE)))
        if proc.returncode != 0:
            raise SystemExit(f"{engine} failed:\n{proc.stderr[-3000:]}")
        raw = json.loads(proc.stdout.strip().splitlines()[-1])
        result[engine] = {"raw": raw, **_summary(raw)}
        log(f"   {engine}: {json.dumps(_summary(raw))}")
    if "llava_jax" in result and "llama_cpp" in result:
        a, b = result["llava_jax"], result["llama_cpp"]
        result["ratio"] = {"peak_rss": round(a["peak_rss_gib"] / b["peak_rss_gib"], 3),  # < 1: llava_jax smaller
                           "ttft": round(b["ttft_s"] / a["ttft_s"], 3),  # > 1: llava_jax faster
                           "prefill": round(a["prefill_tps"] / b["prefill_tps"], 3),
                           "decode": round(a["decode_tps"] / b["decode_tps"], 3)}
        log(f"   ratio: {result['ratio']}")
    result["load_avg_after"] = load_average()
    return result


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "--worker":
    spec = json.loads(sys.argv[3])
    print(json.dumps(worker_llava_jax(spec) if sys.argv[2] == "llava_jax" else worker_llama_cpp(spec)))
