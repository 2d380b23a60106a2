"""Benchmark llava_jax (and optionally llama.cpp) on a GGUF model; prints one JSON object.

    python scripts/bench.py                                     # llava_jax on the embedded SmolLM2 Q4_1
    python scripts/bench.py --llama-cpp                         # + llama.cpp on the same prompt, ratios
    python scripts/bench.py --llama-cpp --f32-rewrite ~/.cache/llava_jax/SmolLM2-135M-Instruct.F32.gguf
                                                                # + the same on the model's F32 rewrite

Measured per model and engine (`--mode text`):
- load_s: model file (in the page cache) → weights ready to run.
- prefill: one `--prompt-tokens` (512) prompt, tokens/s. llava_jax: the jitted prefill + first-token
  sampling (as `Timings.prompt_s`); llama.cpp: `Llama.eval` of the prompt in one n_batch=512 batch.
- decode: `--gen-tokens` (128) greedy tokens after the prompt, EOS ignored, tokens/s. llava_jax: the
  scan decode chunks (sampling on device, one host sync per chunk); llama.cpp: eval one token +
  argmax of its logits, per token.
Warm numbers: compilation and the first run of each executable are excluded and reported apart
(`compile_s`, `first_run`); each figure is the best of `--repeats` runs (the machine is shared, so
the minimum time is the least disturbed one; the median is reported too). Both engines are loaded
together and their timed runs alternate (llava_jax, llama.cpp, llava_jax, ...), so a slow spell of
the shared machine hits both alike instead of skewing the ratio. Before each timed run the
script waits (`--quiet-wait`, default up to 120 s) for the other processes to leave the CPU idle and
records how busy it was; the load average is recorded before and after.

llama.cpp runs through `llama-cpp-python` with 2 threads, an f32 KV cache, no flash attention, and
model params `use_extra_bufts=False` (its repacked AMX CPU buffers crash on Q4_1 in these VMs) — the
settings the references in ../shared/reference were made with.

`--mode image` (image encoding, scripts/bench_image.py) and `--mode batch` (batched generation
throughput, scripts/bench_batch.py) live in their own files: each has `add_arguments(parser)` and
`run(args) -> dict` (the mode's part of the JSON). Shared helpers are in scripts/bench_common.py.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_common and the mode modules beside this file
from bench_common import Quiet, llama_cpp_without_extra_bufts, load_average, log, machine_info, summarize  # noqa: E402

# The filler text the prompt is cut from (tokenized, repeated, truncated to --prompt-tokens ids).
FILLER = (
    "The history of computing is a story of layers. Early machines were programmed by rewiring panels; "
    "then came stored programs, assemblers, compilers, operating systems and networks. Each layer hid "
    "the one below it and let people think in larger pieces. Today a language model runs on top of a "
    "tensor compiler, which runs on top of vector instructions, caches and memory buses. Understanding "
    "where the time goes means looking through those layers again, one at a time. "
)


def make_prompt(tokenize, n_tokens: int) -> list[int]:
    ids: list[int] = []
    while len(ids) < n_tokens:
        ids += tokenize(FILLER)
    return ids[:n_tokens]


# ---- the two engines: each a runner with warm-up, one timed run, and a summary -------------------
class LlavaJaxRunner:
    """llava_jax's prefill + scan decode; `run()` is one generation, EOS ignored."""

    name = "llava_jax"

    def __init__(self, model: str, prompt: list[int], n_gen: int):
        import llava_jax
        from llava_jax.sampling import SamplingParams

        self.prompt, self.n_gen = prompt, n_gen
        self.llm = llava_jax.load(model, n_ctx=len(prompt) + n_gen + 64)
        self.greedy = SamplingParams(temperature=0.0)
        self.compile_s = 0.0

    def run(self) -> tuple[float, float, list[int]]:
        """(prefill s, decode s, ids)."""
        from llava_jax.generate import Request
        from llava_jax.sampling import initial_key

        # 1 token from the prefill, then n_gen from decode chunks (a multiple of the chunk).
        request = Request(list(self.prompt), None, 1 + self.n_gen)
        steps = self.llm.engine.generate([request], self.greedy, initial_key(self.greedy), self.llm.n_ctx,
                                         stop_ids=frozenset())
        first = next(steps)
        ids = list(first.tokens[0])
        t0 = time.perf_counter()
        for step in steps:
            ids += step.tokens[0]
        decode_wall = time.perf_counter() - t0
        t = first.timings
        self.compile_s = max(self.compile_s, t.compile_s)
        return t.prompt_s, t.generate_s if t.generate_s else decode_wall, ids

    def warm_up(self) -> tuple[float, float, list[int]]:
        # Run 1 compiles (AOT, timed apart) and pays each executable's first-execution cost; run 2 is warm.
        first = self.run()
        self.run()
        return first

    def info(self) -> dict:
        engine = self.llm.engine
        return {"load_s": round(self.llm.load_s, 3), "compile_s": round(self.compile_s, 3),
                "dtype": str(engine.dtype), "scan_layers": engine.model.scan_layers, "chunk": engine.chunk,
                "decode_kernel": engine.model.decode_kernel}

    def close(self):
        import jax

        self.llm = None  # free the weights before the next model
        gc.collect()
        jax.clear_caches()


class LlamaCppRunner:
    """llama.cpp through llama-cpp-python: `Llama.eval` of the prompt, then eval + argmax per token."""

    name = "llama_cpp"

    def __init__(self, model: str, prompt: list[int], n_gen: int, threads: int):
        self.prompt, self.n_gen, self.threads = prompt, n_gen, threads
        with llama_cpp_without_extra_bufts() as llama_cpp:
            t0 = time.perf_counter()
            self.llm = llama_cpp.Llama(model, n_ctx=len(prompt) + n_gen + 64, n_batch=512, n_ubatch=512,
                                       n_threads=threads, n_threads_batch=threads, type_k=0, type_v=0,
                                       flash_attn=False, verbose=False)
            self.load_s = time.perf_counter() - t0
        assert not self.llm.model_params.use_extra_bufts
        self.n_vocab = self.llm.n_vocab()

    def _argmax(self) -> int:
        return int(np.argmax(np.ctypeslib.as_array(self.llm._ctx.get_logits(), shape=(self.n_vocab,))))

    def run(self) -> tuple[float, float, list[int]]:
        llm = self.llm
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(self.prompt)
        token = self._argmax()
        prefill_s = time.perf_counter() - t0
        ids = [token]
        t0 = time.perf_counter()
        for _ in range(self.n_gen):
            llm.eval([token])
            token = self._argmax()
            ids.append(token)
        return prefill_s, time.perf_counter() - t0, ids

    def warm_up(self) -> tuple[float, float, list[int]]:
        return self.run()  # graph allocation and warm-up, reported apart

    def info(self) -> dict:
        return {"load_s": round(self.load_s, 3), "threads": self.threads}

    def close(self):
        self.llm.close()
        self.llm = None  # free the model before the next one
        gc.collect()


def bench_engines(runners: list, repeats: int, quiet: Quiet) -> dict[str, dict]:
    """Warm every runner, then `repeats` rounds in which each runner runs once, engines alternating, so
    a drift of the shared machine's speed hits both engines alike (best of the rounds, medians too)."""
    firsts = {r.name: r.warm_up() for r in runners}
    times: dict[str, list[tuple[float, float]]] = {r.name: [] for r in runners}
    for _ in range(repeats):
        for r in runners:
            quiet.wait()
            prefill_s, decode_s, _ = r.run()
            times[r.name].append((prefill_s, decode_s))
    out = {}
    for r in runners:
        prefills, decodes = zip(*times[r.name], strict=True)
        p0, d0, ids = firsts[r.name]
        out[r.name] = {
            **r.info(),
            "first_run": {"prefill_s": round(p0, 4), "decode_s": round(d0, 4),
                          "extra_s": round(p0 + d0 - min(prefills) - min(decodes), 3)},
            "prefill": summarize(list(prefills), len(r.prompt)),
            "decode": summarize(list(decodes), r.n_gen),
            "greedy_ids_head": ids[:16],
        }
    return out


# ---- modes ----------------------------------------------------------------------------------------
def bench_text(args, models: list[str]) -> list[dict]:
    from llava_jax.tokenizer import Tokenizer

    rows = []
    for model in models:
        prompt = make_prompt(lambda s, m=model: Tokenizer.from_gguf(m).encode(s), args.prompt_tokens)
        log(f"== {Path(model).name}: prompt {len(prompt)} tokens, decode {args.gen_tokens}, load avg {load_average()}")
        row: dict = {"model": str(model), "load_avg_before": load_average()}
        quiet = Quiet(args.quiet_wait)
        runners = [LlavaJaxRunner(model, prompt, args.gen_tokens)]
        if args.llama_cpp:
            runners.append(LlamaCppRunner(model, prompt, args.gen_tokens, args.threads))
        try:
            row |= bench_engines(runners, args.repeats, quiet)
        finally:
            for r in runners:
                r.close()
        log(f"   llava_jax  {_line(row['llava_jax'])}")
        if args.llama_cpp:
            log(f"   llama.cpp  {_line(row['llama_cpp'])}")
            jx, lc = row["llava_jax"], row["llama_cpp"]
            row["ratio"] = {  # llava_jax / llama.cpp: > 1 means llava_jax is faster (load: < 1 is faster)
                "prefill": round(jx["prefill"]["tps"] / lc["prefill"]["tps"], 3),
                "decode": round(jx["decode"]["tps"] / lc["decode"]["tps"], 3),
                "load": round(jx["load_s"] / lc["load_s"], 3),
            }
            log(f"   ratio llava_jax/llama.cpp: prefill {row['ratio']['prefill']:.2f}x, "
                f"decode {row['ratio']['decode']:.2f}x, load time {row['ratio']['load']:.2f}x")
        row["load_avg_after"] = load_average()
        row["quiet"] = quiet.summary()
        rows.append(row)
    return rows


def _line(r: dict) -> str:
    return (f"load {r['load_s']:.2f} s | prefill {r['prefill']['tps']:.1f} tok/s (median {r['prefill']['median_tps']:.1f})"
            f" | decode {r['decode']['tps']:.1f} tok/s (median {r['decode']['median_tps']:.1f})"
            f" | first-run extra {r['first_run']['extra_s']:.2f} s" + (f" | compile {r['compile_s']:.2f} s"
                                                                        if "compile_s" in r else ""))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-m", "--model", help="GGUF model (default: the embedded SmolLM2-135M-Instruct Q4_1)")
    ap.add_argument("--mode", choices=("text", "image", "batch", "7b"), default="text")
    ap.add_argument("--llama-cpp", action="store_true", help="also measure llama.cpp (llama-cpp-python) and print ratios")
    ap.add_argument("--f32-rewrite", metavar="PATH",
                    help="write the F32 rewrite of the model to PATH (if absent) and benchmark it too")
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--gen-tokens", type=int, default=128, help="decode tokens (a multiple of the decode chunk, 16)")
    ap.add_argument("--repeats", type=int, default=3, help="warm runs per figure; the best is reported")
    ap.add_argument("--threads", type=int, default=2, help="llama.cpp threads")
    ap.add_argument("--quiet-wait", type=float, default=120, metavar="S",
                    help="before each timed run wait up to S seconds for an idle CPU (0: don't wait)")
    ap.add_argument("-o", "--output", help="also write the JSON here")
    modes = _mode_modules()
    for module in modes.values():
        module.add_arguments(ap.add_argument_group(f"--mode {module.MODE}"))
    args = ap.parse_args(argv)
    if args.mode != "text":
        if args.mode not in modes:
            raise SystemExit(f"--mode {args.mode}: scripts/bench_{args.mode}.py is missing")
        result = {"mode": args.mode, "machine": machine_info(), "argv": list(sys.argv[1:] if argv is None else argv)}
        result |= modes[args.mode].run(args)
        return _emit(result, args.output)

    from llava_jax.defaults import smollm2_path

    models = [args.model or str(smollm2_path())]
    if args.f32_rewrite:
        from llava_jax.rewrite import write_f32_rewrite

        target = Path(args.f32_rewrite).expanduser()
        if not target.exists():
            t0 = time.perf_counter()
            write_f32_rewrite(models[0], target)
            log(f"wrote the F32 rewrite of {Path(models[0]).name} to {target} in {time.perf_counter() - t0:.1f} s")
        models.append(str(target))

    result = {"mode": args.mode, "machine": machine_info(), "argv": list(sys.argv[1:] if argv is None else argv),
              "prompt_tokens": args.prompt_tokens, "gen_tokens": args.gen_tokens, "repeats": args.repeats}
    result["results"] = bench_text(args, models)
    return _emit(result, args.output)


def _mode_modules() -> dict:
    """The other modes' modules ({mode: module}), each with MODE, add_arguments(group) and run(args)."""
    import importlib

    modules = {}
    for name in ("bench_image", "bench_batch", "bench_7b"):
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:
                raise
            continue
        modules[module.MODE] = module
    return modules


def _emit(result: dict, output: str | None) -> int:
    text = json.dumps(result, indent=1)
    print(text)
    if output:
        Path(output).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
