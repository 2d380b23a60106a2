"""`bench.py --mode image`: image-encode time of an mmproj in llava_jax, next to llama.cpp's mtmd (`--llama-cpp`).

    python scripts/bench.py --mode image --llama-cpp              # random CLIP ViT-L/14-336-sized f16 mmproj
    python scripts/bench.py --mode image --llama-cpp --mmproj MMPROJ.gguf -m MODEL.gguf   # a real pair

The default mmproj is a deterministic, randomly initialised file the size of LLaVA's CLIP ViT-L/14-336
(`llava_jax.random_mmproj` preset `clip-l-336`: 1024 wide, 23 stored blocks, f16 matmul weights), generated
once into the cache (`~/.cache/llava_jax`, never into the repository). Its projector outputs the text model's
width (SmolLM2: 576, instead of the preset's 4096 = LLaVA-7B's) because both engines refuse an mmproj whose
width differs from the language model's; the ViT is unchanged, only the projector's last matrix is narrower.
The file also carries LLaVA-1.6's standard grid pinpoints (`--no-anyres`: none, the LLaVA-1.5 layout).

Images (the package's sample drawing, resized): "single", one tile (336×336: 576 tokens), and, when the file
has grid pinpoints, "anyres", the largest pinpoint (672×672: a 2×2 grid + the overview, 5 tiles).

Per image and engine, each the best of `--repeats` warm runs (median too); the first run (compilation,
graph allocation) is reported apart:
- encode: the ViT + projector on already preprocessed tiles. llava_jax: `ImageEncoder.encode_tiles`, blocked
  until ready (all tiles in one batched call); llama.cpp: `mtmd_encode_chunk` on every image chunk (what
  `mtmd_helper_eval_chunks` calls, one tile at a time).
- embed: from decoded RGB pixels to the image's token embeddings. llava_jax: `Llava.embed_image` (preprocess,
  encode, pack; returns host numpy); llama.cpp: `mtmd_tokenize` (its preprocessing) + the encode.
Model loading is never timed in these figures (`load_s` apart). llava_jax runs in `--clip-compat llama.cpp`
mode by default (the same graph as llama.cpp's: 22 of the 23 blocks, its CLS placement, tanh-GELU, fp16
roundings), so both compute the same embeddings; their largest difference is reported (`agreement`).
llama.cpp: llama-cpp-python's `mtmd_cpp`, `--threads` (2) threads, CPU, no flash attention, no warm-up at
init, the text model loaded with `use_extra_bufts=False`.
"""

from __future__ import annotations

import ctypes
import gc
import hashlib
import time
from pathlib import Path

import numpy as np
from bench_common import Quiet, llama_cpp_without_extra_bufts, load_average, log, silence_mtmd_logs, summarize

MODE = "image"


def add_arguments(group) -> None:
    group.add_argument("--mmproj", metavar="PATH",
                       help="image mode: mmproj GGUF to encode with (default: a random file of --mmproj-preset)")
    group.add_argument("--mmproj-preset", default="clip-l-336", metavar="NAME",
                       help="image mode: size of the generated random mmproj: clip-l-336 (CLIP ViT-L/14-336, "
                            "626 MB) or default (tiny, for tests)")
    group.add_argument("--no-anyres", action="store_true",
                       help="image mode: only the one-tile image; the generated mmproj gets no grid pinpoints")
    group.add_argument("--clip-compat", choices=("llama.cpp", "llava"), default="llama.cpp",
                       help="image mode: llava_jax's image graph (llama.cpp: the same function as llama.cpp's)")


# ---- inputs ---------------------------------------------------------------------------------------
def text_width(model: str) -> int:
    from llava_jax.config import TextConfig
    from llava_jax.gguf_io import open_gguf

    g = open_gguf(model)
    return TextConfig.from_metadata(g.metadata, set(g.tensors), Path(model).name).dim


def generated_mmproj(preset: str, out_dim: int, anyres: bool) -> tuple[Path, dict]:
    """The random mmproj of `preset`, projecting to `out_dim`, generated into the cache once."""
    from dataclasses import asdict, replace

    from llava_jax.defaults import cache_dir
    from llava_jax.random_mmproj import PRESETS, STANDARD_PINPOINTS, write_random_mmproj

    if preset not in PRESETS:
        raise SystemExit(f"--mmproj-preset {preset}: choose from {', '.join(sorted(PRESETS))}")
    spec = replace(PRESETS[preset], out_dim=out_dim, pinpoints=STANDARD_PINPOINTS if anyres else ())
    digest = hashlib.sha1(repr(spec).encode()).hexdigest()[:10]  # a changed generator makes a new file
    target = cache_dir() / f"bench-{spec.name}-out{out_dim}{'-anyres' if anyres else ''}-{digest}.gguf"
    if not target.exists():
        t0 = time.perf_counter()
        write_random_mmproj(target, spec)
        log(f"wrote the random {preset} mmproj to {target} in {time.perf_counter() - t0:.1f} s")
    info = {k: v for k, v in asdict(spec).items() if k not in ("omit", "name")}
    info["pinpoints"] = bool(spec.pinpoints)
    return target, {"preset": preset, **info}


def bench_images(cfg, anyres: bool) -> dict:
    """name → PIL RGB image: "single" (one tile) and, for anyres files, "anyres" (the largest pinpoint)."""
    from PIL import Image

    from llava_jax.defaults import sample_image_path

    base = Image.open(sample_image_path()).convert("RGB")
    s = cfg.image_size
    images = {"single": base.resize((s, s), Image.Resampling.BICUBIC)}
    if anyres and cfg.grid_pinpoints:
        w, h = max(cfg.grid_pinpoints, key=lambda wh: (wh[0] // s) * (wh[1] // s))
        images["anyres"] = base.resize((w, h), Image.Resampling.BICUBIC)
    return images


def timing(seconds: list[float], n_tokens: int) -> dict:
    out = summarize(seconds, n_tokens)
    return out | {"images_per_s": round(1 / out["best_s"], 3),
                  "median_images_per_s": round(1 / out["median_s"], 3)}


class CompileTimer:
    """Seconds JAX spends tracing, lowering and compiling while active (its monitoring events)."""

    def __enter__(self):
        import jax.monitoring

        self.seconds = 0.0

        def listener(event: str, duration: float, **_):
            if event.startswith("/jax/core/compile/"):
                self.seconds += duration

        self._listener = listener
        jax.monitoring.register_event_duration_secs_listener(listener)
        return self

    def __exit__(self, *exc):
        import jax.monitoring

        jax.monitoring.unregister_event_duration_listener(self._listener)


# ---- llava_jax ------------------------------------------------------------------------------------
def bench_llava_jax(model: str, mmproj: Path, compat: str, anyres: bool, repeats: int, quiet: Quiet):
    """(result dict, {image name: the first run's embeddings}, {image name: PIL image})."""
    import jax

    import llava_jax

    llm = llava_jax.load(model, mmproj=mmproj, clip_compat=compat)
    enc = llm.image_encoder
    images = bench_images(enc.cfg, anyres)
    out: dict = {"load_s": round(llm.load_s, 3), "clip_compat": compat, "dtype": str(enc.dtype),
                 "blocks_run": enc.cfg.blocks_to_run(compat), "backend": jax.default_backend(), "images": {}}
    firsts = {}
    for name, img in images.items():
        quiet.wait()
        with CompileTimer() as ct:
            t0 = time.perf_counter()
            first = llm.embed_image(img)  # compiles the ViT for this tile count
            first_s = time.perf_counter() - t0
        firsts[name] = first
        n_tiles = enc.layout(img.size).n_tiles
        embeds, encodes, preps = [], [], []
        for _ in range(repeats):
            quiet.wait()
            t0 = time.perf_counter()
            emb = llm.embed_image(img)  # numpy on the host: ready
            embeds.append(time.perf_counter() - t0)
            quiet.wait()
            t0 = time.perf_counter()
            prepared = enc.preprocess(img)
            preps.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            jax.block_until_ready(enc.encode_tiles(prepared.pixels))
            encodes.append(time.perf_counter() - t0)
        assert emb.shape == first.shape
        r = {"size": list(img.size), "tiles": n_tiles, "tokens": int(first.shape[0]), "compile_s": round(ct.seconds, 3),
             "first_s": round(first_s, 3), "encode": timing(encodes, first.shape[0]),
             "embed": timing(embeds, first.shape[0]), "preprocess_best_s": round(min(preps), 4)}
        out["images"][name] = r
        log(f"   llava_jax  {name}: {r['tiles']} tiles, {r['tokens']} tokens | encode {r['encode']['best_s']:.3f} s "
            f"(median {r['encode']['median_s']:.3f}) | embed_image {r['embed']['best_s']:.3f} s | "
            f"first call {first_s:.2f} s (compile {ct.seconds:.2f} s)")
    llm = enc = None  # free the weights before llama.cpp loads its copy
    gc.collect()
    jax.clear_caches()
    return out, firsts, images


# ---- llama.cpp ------------------------------------------------------------------------------------


def bench_llama_cpp(model: str, mmproj: Path, images: dict, repeats: int, threads: int, quiet: Quiet):
    """(result dict, {image name: the first run's embeddings, chunks concatenated})."""
    with llama_cpp_without_extra_bufts() as llama_cpp:
        import llama_cpp.mtmd_cpp as mtmd

        silence_mtmd_logs()
        t0 = time.perf_counter()
        llm = llama_cpp.Llama(model, n_ctx=256, n_threads=threads, n_threads_batch=threads, verbose=False)
        params = mtmd.mtmd_context_params_default()
        params.use_gpu, params.n_threads, params.warmup, params.flash_attn_type = False, threads, False, 0
        params.print_timings = False
        ctx = mtmd.mtmd_init_from_file(str(mmproj).encode(), llm._model.model, params)
        load_s = time.perf_counter() - t0
    if not ctx:
        raise SystemExit(f"llama.cpp could not load {mmproj}")
    assert not llm.model_params.use_extra_bufts
    n_embd = llm.n_embd()
    marker = mtmd.mtmd_default_marker()
    out: dict = {"load_s": round(load_s, 3), "threads": threads, "images": {}}
    firsts = {}

    def run_once(bitmap, keep: bool) -> tuple[float, float, int, int, np.ndarray | None]:
        """(tokenize s, encode s, image tokens, image chunks, embeddings if `keep`)."""
        chunks = mtmd.mtmd_input_chunks_init()
        try:
            inp = mtmd.mtmd_input_text(text=marker, text_len=len(marker), add_special=False, parse_special=True)
            t0 = time.perf_counter()
            rc = mtmd.mtmd_tokenize(ctx, chunks, ctypes.byref(inp), (mtmd.mtmd_bitmap_p_ctypes * 1)(bitmap), 1)
            tokenize_s = time.perf_counter() - t0
            if rc != 0:
                raise SystemExit(f"mtmd_tokenize failed ({rc})")
            image_chunks = [c for c in (mtmd.mtmd_input_chunks_get(chunks, i) for i in range(mtmd.mtmd_input_chunks_size(chunks)))
                            if mtmd.mtmd_input_chunk_get_type(c) == mtmd.MTMD_INPUT_CHUNK_TYPE_IMAGE]
            counts = [int(mtmd.mtmd_input_chunk_get_n_tokens(c)) for c in image_chunks]
            kept = []
            t0 = time.perf_counter()
            for chunk, n in zip(image_chunks, counts, strict=True):
                if mtmd.mtmd_encode_chunk(ctx, chunk) != 0:
                    raise SystemExit("mtmd_encode_chunk failed")
                if keep:  # the first run only (the warm runs time the encode alone)
                    kept.append(np.ctypeslib.as_array(mtmd.mtmd_get_output_embd(ctx), shape=(n * n_embd,)).copy())
            encode_s = time.perf_counter() - t0
            emb = np.concatenate(kept).reshape(-1, n_embd) if keep else None
            return tokenize_s, encode_s, sum(counts), len(image_chunks), emb
        finally:
            mtmd.mtmd_input_chunks_free(chunks)

    try:
        for name, img in images.items():
            pixels = np.ascontiguousarray(np.asarray(img.convert("RGB"), dtype=np.uint8))
            h, w = pixels.shape[:2]
            bitmap = mtmd.mtmd_bitmap_init(w, h, (ctypes.c_uint8 * pixels.size).from_buffer_copy(pixels.tobytes()))
            try:
                quiet.wait()
                tok0, enc0, n_tokens, n_chunks, firsts[name] = run_once(bitmap, keep=True)
                toks, encs = [], []
                for _ in range(repeats):
                    quiet.wait()
                    tok, enc, _, _, _ = run_once(bitmap, keep=False)
                    toks.append(tok)
                    encs.append(enc)
            finally:
                mtmd.mtmd_bitmap_free(bitmap)
            r = {"size": [w, h], "chunks": n_chunks, "tokens": n_tokens, "first_s": round(tok0 + enc0, 3),
                 "encode": timing(encs, n_tokens), "embed": timing([a + b for a, b in zip(toks, encs, strict=True)], n_tokens),
                 "tokenize_best_s": round(min(toks), 4)}
            out["images"][name] = r
            log(f"   llama.cpp  {name}: {n_chunks} image chunks, {n_tokens} tokens | encode {r['encode']['best_s']:.3f} s "
                f"(median {r['encode']['median_s']:.3f}) | tokenize + encode {r['embed']['best_s']:.3f} s | "
                f"first run {r['first_s']:.2f} s")
    finally:
        mtmd.mtmd_free(ctx)
        llm.close()
    gc.collect()
    return out, firsts


# ---- the mode -------------------------------------------------------------------------------------
def run(args) -> dict:
    from llava_jax.defaults import smollm2_path

    model = str(Path(args.model).expanduser()) if args.model else str(smollm2_path())
    anyres = not args.no_anyres
    if args.mmproj:
        mmproj, generated = Path(args.mmproj).expanduser(), None
    else:
        mmproj, generated = generated_mmproj(args.mmproj_preset, text_width(model), anyres)
    result: dict = {
        "text_model": model,
        "mmproj": {"path": str(mmproj), "mb": round(mmproj.stat().st_size / 2**20, 1), "generated": generated},
        "repeats": args.repeats, "load_avg_before": load_average(),
    }
    log(f"== image encode: {mmproj.name} ({result['mmproj']['mb']} MB) with {Path(model).name}, "
        f"clip compat {args.clip_compat}, load avg {load_average()}")
    quiet = Quiet(args.quiet_wait)
    result["llava_jax"], ours, images = bench_llava_jax(model, mmproj, args.clip_compat, anyres, args.repeats, quiet)
    if args.llama_cpp:
        result["llama_cpp"], theirs = bench_llama_cpp(model, mmproj, images, args.repeats, args.threads, quiet)
        result["ratio"], result["agreement"] = {}, {}
        for name in images:
            jx, lc = result["llava_jax"]["images"][name], result["llama_cpp"]["images"][name]
            # llava_jax / llama.cpp images/s: > 1 means llava_jax is faster
            result["ratio"][name] = {k: round(jx[k]["images_per_s"] / lc[k]["images_per_s"], 3) for k in ("encode", "embed")}
            a, b = ours[name], theirs[name]
            result["agreement"][name] = (
                {"max_abs_diff": float(np.abs(a - b).max()), "max_abs": float(np.abs(b).max())} if a.shape == b.shape
                else {"shapes": [list(a.shape), list(b.shape)]})
            log(f"   ratio llava_jax/llama.cpp {name}: encode {result['ratio'][name]['encode']:.2f}x, "
                f"embed {result['ratio'][name]['embed']:.2f}x | embeddings {result['agreement'][name]}")
    result["load_avg_after"] = load_average()
    result["quiet"] = quiet.summary()
    return result
