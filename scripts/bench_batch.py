"""`python scripts/bench.py --mode batch`: batched generation throughput (issue 5).

    python scripts/bench.py --mode batch --llama-cpp -o bench_batch.json

N (image, question) items (`--batch-items`, 16): images drawn with Pillow at `--batch-image-sizes`,
short questions, each wrapped in the model's chat template with the image first. Every item is
answered greedily with exactly `--batch-new-tokens` (32) tokens: EOS is ignored on both engines, so
both generate the same number of tokens and every figure counts the same work.

- llava_jax, for each `--batch-sizes` value B (1,4,8,16): all N items in batches of B. Per batch the
  images go through the ViT in one call (`Llava.embed_images`), the prompts are built
  (`request_from_embeds`) and decoded as one ragged batch (`TextEngine.generate`, the path of
  `Llava.generate_batch` minus detokenization and EOS stops). A warm-up (the first batch, plus the
  last one when B does not divide N) compiles and runs each program once first; its time is
  reported apart (`warmup`), and the timed passes must compile nothing (`compile_in_timed_s`).
- llama.cpp (with `--llama-cpp`): the same N items one after another through llama-cpp-python and
  its mtmd library: the image and the prompt text as mtmd chunks (`mtmd_tokenize`,
  `mtmd_helper_eval_chunks`: image encode + prefill), then greedy decoding one token at a time
  (argmax of its logits). `--threads` (2) threads for the model and mtmd, f32 KV cache
  (type_k=type_v=0), flash attention off, models loaded with `use_extra_bufts=False`. One item is
  run first as a warm-up (reported apart).

Both engines start from decoded RGB pixels in memory; the wall time of a pass covers image
preprocessing and encoding, prompt tokenization, prefill and decoding of all N items (for llava_jax
also the host copies of each batch's tokens). Figures: images/s = N / wall, generated tokens/s =
N x new tokens / wall, the best of `--batch-repeats` (1) timed passes (medians in the JSON); ratio =
llava_jax / llama.cpp (> 1: llava_jax is faster). Models are loaded once; load time is reported apart.

The default mmproj is the project's random one (LLaVA-1.6 layout); llava_jax runs it in
`clip_compat="llama.cpp"` mode (`--batch-clip-compat`) so that both engines see the same image
tokens: llama.cpp does not tile images that fit in 336x336 (576 tokens each) and has no unpad /
newline rows, LLaVA's own 1.6 semantics would give llava_jax several times the image tokens.
"""

from __future__ import annotations

import ctypes
import gc
import statistics
import time
from dataclasses import dataclass

import numpy as np
from bench_common import Quiet, llama_cpp_without_extra_bufts, load_average, log, silence_mtmd_logs, summarize

MODE = "batch"

QUESTIONS = (
    "What is in the image?",
    "Describe the picture briefly.",
    "Which colors do you see?",
    "How many shapes are there?",
    "Is there a circle in this image?",
    "What is the largest object?",
)


# ---- options --------------------------------------------------------------------------------------
def add_arguments(group) -> None:
    group.add_argument("--batch-sizes", default="1,4,8,16", metavar="B,B,..",
                       help="llava_jax batch sizes (default 1,4,8,16)")
    group.add_argument("--batch-items", type=int, default=16, metavar="N", help="(image, question) items (16)")
    group.add_argument("--batch-new-tokens", type=int, default=32, metavar="N",
                       help="greedy tokens generated per item, EOS ignored (32)")
    group.add_argument("--batch-image-sizes", default="320x240,256x256", metavar="WxH,..",
                       help="image sizes, cycled over the items (default 320x240,256x256: one 576-token tile each)")
    group.add_argument("--batch-mmproj", metavar="PATH",
                       help="mmproj GGUF (default: the project's random mmproj, generated into the cache)")
    group.add_argument("--batch-clip-compat", choices=("llama.cpp", "llava"), default="llama.cpp",
                       help="llava_jax image semantics (default llama.cpp: the same image tokens as llama.cpp)")
    group.add_argument("--batch-repeats", type=int, default=1, metavar="R",
                       help="timed passes over all items per batch size and for llama.cpp; the best is reported (1)")


def _parse_list(text: str, what: str, convert) -> list:
    try:
        out = [convert(x) for x in text.split(",") if x.strip()]
    except ValueError:
        out = []
    if not out:
        raise SystemExit(f"bad {what}: {text!r}")
    return out


def _parse_size(text: str) -> tuple[int, int]:
    w, h = (int(x) for x in text.lower().split("x"))
    if w < 1 or h < 1:
        raise ValueError(text)
    return w, h


# ---- items ----------------------------------------------------------------------------------------
@dataclass
class Item:
    image: object  # PIL.Image (RGB)
    question: str

    @property
    def size(self) -> tuple[int, int]:
        return self.image.size


def make_items(n: int, sizes: list[tuple[int, int]], seed: int = 0) -> list[Item]:
    """n deterministic drawings (background + 3-5 filled shapes), sizes and questions cycled."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    items = []
    for i in range(n):
        w, h = sizes[i % len(sizes)]
        image = Image.new("RGB", (w, h), tuple(int(c) for c in rng.integers(150, 256, 3)))
        draw = ImageDraw.Draw(image)
        for _ in range(int(rng.integers(3, 6))):
            colour = tuple(int(c) for c in rng.integers(0, 200, 3))
            x0, y0 = int(rng.integers(0, w * 3 // 4)), int(rng.integers(0, h * 3 // 4))
            x1, y1 = x0 + int(rng.integers(w // 8, w // 3)), y0 + int(rng.integers(h // 8, h // 3))
            kind = int(rng.integers(0, 3))
            if kind == 0:
                draw.rectangle((x0, y0, x1, y1), fill=colour)
            elif kind == 1:
                draw.ellipse((x0, y0, x1, y1), fill=colour)
            else:
                draw.polygon([(x0, y1), ((x0 + x1) // 2, y0), (x1, y1)], fill=colour)
        items.append(Item(image, QUESTIONS[i % len(QUESTIONS)]))
    return items


# ---- llava_jax ------------------------------------------------------------------------------------
def llava_jax_pass(llm, items: list[Item], batch_size: int, n_new: int, template: str) -> dict:
    """Answer `items` in batches of `batch_size`: wall seconds, its parts, and each item's token ids."""
    from llava_jax.generate import Timings
    from llava_jax.sampling import SamplingParams, initial_key

    greedy = SamplingParams(temperature=0.0)
    ids: list[list[int]] = []
    parts = {"image_s": 0.0, "prefill_s": 0.0, "decode_s": 0.0, "compile_s": 0.0}
    prompt_tokens = padded_tokens = 0
    t_start = time.perf_counter()
    for start in range(0, len(items), batch_size):
        batch = items[start:start + batch_size]
        timings = Timings()
        embeds = llm.embed_images([it.image for it in batch], timings)
        requests = [llm.request_from_embeds(it.question, [e], template, n_new) for it, e in zip(batch, embeds, strict=True)]
        rows: list[list[int]] = [[] for _ in batch]
        for step in llm.engine.generate(requests, greedy, initial_key(greedy), llm.n_ctx, stop_ids=frozenset()):
            for row, new in zip(rows, step.tokens, strict=True):
                row += new
        t = step.timings
        parts["image_s"] += timings.image_s
        parts["prefill_s"] += t.prompt_s
        parts["decode_s"] += t.generate_s
        parts["compile_s"] += t.compile_s
        lengths = [len(r.tokens) for r in requests]
        prompt_tokens += sum(lengths)
        padded_tokens += len(lengths) * llm.engine.buckets(max(lengths))  # rows left-padded to the bucket
        ids += rows
    wall = time.perf_counter() - t_start
    return {"wall_s": wall, "ids": ids, "prompt_tokens": prompt_tokens, "padded_prompt_tokens": padded_tokens,
            **parts}


def bench_llava_jax(llm, items: list[Item], batch_sizes: list[int], n_new: int, template: str, repeats: int,
                    quiet: Quiet) -> list[dict]:
    rows = []
    n = len(items)
    for bs in batch_sizes:
        # warm-up: every batch shape of this batch size (the first batch, and a smaller last one)
        warm_batches = [items[:bs]] + ([items[n - n % bs:]] if n % bs else [])
        t0 = time.perf_counter()
        warm_compile = sum(llava_jax_pass(llm, b, bs, n_new, template)["compile_s"] for b in warm_batches)
        warm_wall = time.perf_counter() - t0
        warm = [it for b in warm_batches for it in b]
        passes = []
        for _ in range(repeats):
            quiet.wait()
            passes.append(llava_jax_pass(llm, items, bs, n_new, template))
        best = min(passes, key=lambda p: p["wall_s"])
        walls = [p["wall_s"] for p in passes]
        n_tokens = sum(len(x) for x in best["ids"])
        row = {
            "batch_size": bs, "items": n, "batches": -(-n // bs),
            "images_per_s": round(n / best["wall_s"], 3),
            "median_images_per_s": round(n / statistics.median(walls), 3),
            "tokens_per_s": round(n_tokens / best["wall_s"], 2),
            "wall_s": round(best["wall_s"], 3),
            "generated": summarize(walls, n_tokens),
            "parts_s": {k: round(best[k], 3) for k in ("image_s", "prefill_s", "decode_s")},
            "compile_in_timed_s": round(max(p["compile_s"] for p in passes), 3),
            "prompt_tokens": best["prompt_tokens"], "padded_prompt_tokens": best["padded_prompt_tokens"],
            "warmup": {"items": len(warm), "wall_s": round(warm_wall, 3), "compile_s": round(warm_compile, 3),
                       "first_run_extra_s": round(warm_wall - warm_compile - best["wall_s"] * len(warm) / n, 3)},
            "ids": best["ids"],
        }
        log(f"   llava_jax B={bs:<3} {row['images_per_s']:7.3f} images/s {row['tokens_per_s']:8.2f} tok/s "
            f"wall {row['wall_s']:.2f} s (image {row['parts_s']['image_s']:.2f}, prefill {row['parts_s']['prefill_s']:.2f},"
            f" decode {row['parts_s']['decode_s']:.2f}) | warm-up {warm_wall:.1f} s, compile {warm_compile:.1f} s")
        rows.append(row)
    return rows


# ---- llama.cpp ------------------------------------------------------------------------------------


class LlamaCppMtmd:
    """llama-cpp-python + mtmd, answering one (image, prompt) at a time, greedily, EOS ignored."""

    def __init__(self, model: str, mmproj: str, n_ctx: int, threads: int):
        import llama_cpp.mtmd_cpp as mtmd

        with llama_cpp_without_extra_bufts() as llama_cpp:
            silence_mtmd_logs()
            t0 = time.perf_counter()
            self.llm = llama_cpp.Llama(model, n_ctx=n_ctx, n_batch=512, n_ubatch=512, n_threads=threads,
                                       n_threads_batch=threads, type_k=0, type_v=0, flash_attn=False, verbose=False)
            params = mtmd.mtmd_context_params_default()
            params.use_gpu, params.n_threads, params.warmup, params.flash_attn_type = False, threads, False, 0
            self.ctx = mtmd.mtmd_init_from_file(str(mmproj).encode(), self.llm._model.model, params)
            self.load_s = time.perf_counter() - t0
        if not self.ctx:
            raise SystemExit(f"llama.cpp's mtmd could not load {mmproj}")
        assert not self.llm.model_params.use_extra_bufts
        self.llama_cpp, self.mtmd = llama_cpp, mtmd
        self.n_vocab = self.llm.n_vocab()

    def _argmax_last(self) -> int:
        logits = self.llama_cpp.llama_get_logits_ith(self.llm._ctx.ctx, -1)
        return int(np.argmax(np.ctypeslib.as_array(logits, shape=(self.n_vocab,))))

    def answer(self, pixels, prompt: str, n_new: int) -> tuple[list[int], int, float]:
        """(token ids, prompt tokens, prompt seconds): `pixels` = (w, h, ctypes uint8 buffer)."""
        mtmd, llm = self.mtmd, self.llm
        t0 = time.perf_counter()
        llm._ctx.kv_cache_clear()
        llm.n_tokens = 0
        w, h, buf = pixels
        bitmap = mtmd.mtmd_bitmap_init(w, h, buf)
        chunks = mtmd.mtmd_input_chunks_init()
        try:
            text = prompt.encode()
            inp = mtmd.mtmd_input_text(text=text, text_len=len(text), add_special=True, parse_special=True)
            if mtmd.mtmd_tokenize(self.ctx, chunks, ctypes.byref(inp), (mtmd.mtmd_bitmap_p_ctypes * 1)(bitmap), 1):
                raise RuntimeError("mtmd_tokenize failed")
            n_past = self.llama_cpp.llama_pos(0)
            if mtmd.mtmd_helper_eval_chunks(self.ctx, llm._ctx.ctx, chunks, 0, 0, 512, True, ctypes.byref(n_past)):
                raise RuntimeError("mtmd_helper_eval_chunks failed")
        finally:
            mtmd.mtmd_input_chunks_free(chunks)
            mtmd.mtmd_bitmap_free(bitmap)
        token = self._argmax_last()
        prompt_s = time.perf_counter() - t0
        llm.n_tokens = n_past.value
        ids = [token]
        for _ in range(n_new - 1):
            llm.eval([token])
            token = self._argmax_last()
            ids.append(token)
        return ids, n_past.value, prompt_s

    def close(self) -> None:
        if self.ctx:
            self.mtmd.mtmd_free(self.ctx)
            self.ctx = None
        self.llm.close()


def bench_llama_cpp(model: str, mmproj: str, items: list[Item], prompts: list[str], n_new: int, n_ctx: int,
                    threads: int, repeats: int, quiet: Quiet) -> dict:
    engine = LlamaCppMtmd(model, mmproj, n_ctx, threads)
    pixels = []
    for it in items:
        raw = np.asarray(it.image.convert("RGB"), np.uint8).tobytes()
        pixels.append((it.size[0], it.size[1], (ctypes.c_uint8 * len(raw)).from_buffer_copy(raw)))

    def one_pass(indices) -> dict:
        t0 = time.perf_counter()
        ids, n_prompt, prompt_s = [], [], 0.0
        for i in indices:
            a, p, s = engine.answer(pixels[i], prompts[i], n_new)
            ids.append(a)
            n_prompt.append(p)
            prompt_s += s
        wall = time.perf_counter() - t0
        return {"wall_s": wall, "ids": ids, "prompt_tokens": n_prompt, "prompt_s": prompt_s}

    try:
        warm = one_pass([0])
        passes = []
        for _ in range(repeats):
            quiet.wait()
            passes.append(one_pass(range(len(items))))
    finally:
        engine.close()
    best = min(passes, key=lambda p: p["wall_s"])
    walls = [p["wall_s"] for p in passes]
    n, n_tokens = len(items), sum(len(x) for x in best["ids"])
    out = {
        "items": n, "threads": threads, "load_s": round(engine.load_s, 3),
        "images_per_s": round(n / best["wall_s"], 3),
        "median_images_per_s": round(n / statistics.median(walls), 3),
        "tokens_per_s": round(n_tokens / best["wall_s"], 2),
        "wall_s": round(best["wall_s"], 3),
        "generated": summarize(walls, n_tokens),
        "parts_s": {"prompt_s": round(best["prompt_s"], 3), "decode_s": round(best["wall_s"] - best["prompt_s"], 3)},
        "prompt_tokens": sum(best["prompt_tokens"]), "prompt_tokens_per_item": best["prompt_tokens"],
        "warmup": {"items": 1, "wall_s": round(warm["wall_s"], 3),
                   "first_run_extra_s": round(warm["wall_s"] - best["wall_s"] / n, 3)},
        "ids": best["ids"],
    }
    log(f"   llama.cpp (one at a time) {out['images_per_s']:7.3f} images/s {out['tokens_per_s']:8.2f} tok/s "
        f"wall {out['wall_s']:.2f} s (image + prefill {out['parts_s']['prompt_s']:.2f}, decode "
        f"{out['parts_s']['decode_s']:.2f}) | load {out['load_s']:.2f} s, warm-up item {warm['wall_s']:.2f} s")
    return out


# ---- the mode -------------------------------------------------------------------------------------
def run(args) -> dict:
    batch_sizes = _parse_list(args.batch_sizes, "--batch-sizes", int)
    sizes = _parse_list(args.batch_image_sizes, "--batch-image-sizes", _parse_size)
    n_items, n_new, repeats = args.batch_items, args.batch_new_tokens, args.batch_repeats
    if n_items < 1 or n_new < 1 or repeats < 1 or min(batch_sizes) < 1:
        raise SystemExit("--batch-items, --batch-new-tokens, --batch-repeats and --batch-sizes must be >= 1")
    if max(batch_sizes) > n_items:
        raise SystemExit(f"--batch-sizes {args.batch_sizes}: larger than --batch-items {n_items}")
    if getattr(args, "f32_rewrite", None):
        raise SystemExit("--f32-rewrite is for --mode text")
    if args.llama_cpp:
        try:
            import llama_cpp.mtmd_cpp  # noqa: F401
        except ImportError as e:
            raise SystemExit(f"--llama-cpp: llama-cpp-python with mtmd is needed ({e})") from None

    import jax

    import llava_jax
    from llava_jax.defaults import smollm2_path
    from llava_jax.prompts import ImageSlot, build_prompt, template_from_metadata

    model = args.model or str(smollm2_path())
    if args.batch_mmproj:
        mmproj, mmproj_kind = args.batch_mmproj, "file"
    else:
        from llava_jax.defaults import default_mmproj_path

        mmproj, mmproj_kind = str(default_mmproj_path()), "the project's random mmproj (preset default, seed 0)"
    items = make_items(n_items, sizes)
    log(f"== batch throughput: {n_items} items, {n_new} new tokens each (EOS ignored), batch sizes {batch_sizes}, "
        f"load avg {load_average()}")
    result: dict = {
        "model": model, "mmproj": mmproj, "mmproj_kind": mmproj_kind, "clip_compat": args.batch_clip_compat,
        "items": n_items, "image_sizes": [f"{w}x{h}" for w, h in sizes], "questions": sorted(set(QUESTIONS[:n_items])),
        "new_tokens_per_item": n_new, "eos": "ignored (every item generates exactly new_tokens_per_item tokens)",
        "sampling": "greedy (argmax)", "batch_sizes": batch_sizes, "repeats": repeats,
        "load_avg_before": load_average(),
    }
    quiet = Quiet(args.quiet_wait)

    llm = llava_jax.load(model, mmproj=mmproj, clip_compat=args.batch_clip_compat)
    # decode chunks no longer than the answers (the first token comes from the prefill), as batch_eval.py
    llm.engine.chunk = max(1, min(llm.engine.chunk, n_new - 1))
    template = template_from_metadata(llm.metadata)
    result["template"] = template
    result["llava_jax"] = {"load_s": round(llm.load_s, 3), "dtype": str(llm.engine.dtype),
                           "scan_layers": llm.engine.model.scan_layers, "decode_chunk": llm.engine.chunk,
                           "prompt_buckets": {"minimum": llm.engine.buckets.minimum, "step": llm.engine.buckets.step}}
    prompt_lengths = [llm.prompt_length(it.question, [it.image], template) for it in items]
    log(f"   prompts: {min(prompt_lengths)}..{max(prompt_lengths)} tokens (images included), template {template}")
    rows = bench_llava_jax(llm, items, batch_sizes, n_new, template, repeats, quiet)
    ref_ids = rows[0]["ids"]
    for row in rows:
        row["answers_equal_to_first_batch_size"] = sum(a == b for a, b in zip(row["ids"], ref_ids, strict=True))
    result["llava_jax"]["batch"] = rows
    result["llava_jax"]["answer_head"] = llm.detokenize(ref_ids[0])
    llm = None
    gc.collect()
    jax.clear_caches()

    if args.llama_cpp:
        from llama_cpp.mtmd_cpp import mtmd_default_marker

        marker = mtmd_default_marker().decode()  # the same text pieces as llava_jax, the image at the marker
        prompts = ["".join(marker if isinstance(seg, ImageSlot) else seg for seg in build_prompt(it.question, 1, template))
                   for it in items]
        n_ctx = -(-(max(prompt_lengths) + n_new + 64) // 256) * 256
        lc = bench_llama_cpp(model, mmproj, items, prompts, n_new, n_ctx, args.threads, repeats, quiet)
        lc["n_ctx"] = n_ctx
        lc["same_prompt_tokens_as_llava_jax"] = lc["prompt_tokens_per_item"] == prompt_lengths
        result["llama_cpp"] = lc
        for row in rows:
            row["ratio_vs_llama_cpp"] = {  # llava_jax / llama.cpp sequential: > 1 = llava_jax faster
                "images_per_s": round(row["images_per_s"] / lc["images_per_s"], 3),
                "tokens_per_s": round(row["tokens_per_s"] / lc["tokens_per_s"], 3),
            }
            row["answers_equal_to_llama_cpp"] = sum(a == b for a, b in zip(row["ids"], lc["ids"], strict=True))
            log(f"   ratio llava_jax B={row['batch_size']} / llama.cpp: {row['ratio_vs_llama_cpp']['images_per_s']:.2f}x,"
                f" {row['answers_equal_to_llama_cpp']}/{n_items} answers equal")
        if not lc["same_prompt_tokens_as_llava_jax"]:
            log("   warning: llama.cpp's prompt token counts differ from llava_jax's (see prompt_tokens_per_item)")
    result["load_avg_after"] = load_average()
    result["quiet"] = quiet.summary()
    # token ids: only a head per item in the JSON (the comparisons above use all of them)
    for part in [*rows, result.get("llama_cpp", {})]:
        if "ids" in part:
            part["ids_head"] = [x[:8] for x in part.pop("ids")]
    return result
