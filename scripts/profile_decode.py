"""Where a decode step's time goes: profile one generation and print the per-step time of each XLA op kind.

    python scripts/profile_decode.py                       # the embedded SmolLM2 Q4_1 (f32 compute)
    python scripts/profile_decode.py -m ~/.cache/llava_jax/SmolLM2-135M-Instruct.F32.gguf --xla

Runs a `--prompt-tokens` prompt and `--gen-tokens` greedy tokens twice (compile, warm-up), then once
under `jax.profiler` with XLA:CPU's per-op trace events on (`--xla_cpu_enable_xprof_traceme`, set here
before jax is imported). From the trace it takes the decode chunks' executions and prints, per decoded
token: wall time, busy time per op kind (`dot`, `ffi_call` = the native kernels, fusions), and the idle
gaps between ops on the executing threads. `--xla` profiles the XLA path (no native decode kernels).
The profiler adds a little time per op; compare runs of this script with each other, and take speed
figures from scripts/bench.py.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import tempfile
from pathlib import Path

FLAG = "--xla_cpu_enable_xprof_traceme=true"


def _trace_events(trace_dir: str) -> list[tuple[int, int, str, str]]:
    """(start ns, duration ns, thread line, op name) of every event in the trace, sorted by start."""
    from jax.profiler import ProfileData

    pb = next(Path(trace_dir).rglob("*.xplane.pb"))
    events = []
    for plane in ProfileData.from_file(str(pb)).planes:
        for line in plane.lines:
            events.extend((ev.start_ns, ev.duration_ns, line.name, ev.name) for ev in line.events)
    return sorted(events)


def summarize(events, steps_per_execution: int) -> dict:
    """Per decoded token: wall, busy time per op kind, idle gaps. Decode executions are the host-side
    `ThunkExecutor::Execute` events other than the longest (the prefill) and the tiny ones."""
    execs = [e for e in events if e[3].startswith("ThunkExecutor::Execute") and "Eigen" not in e[2]]
    prefill = max(execs, key=lambda e: e[1])
    decode = [e for e in execs if e is not prefill and e[1] > prefill[1] / 50]
    busy: collections.Counter = collections.Counter()
    gaps = 0
    for start, dur, _, _ in decode:
        end_of_last = start
        for s, d, line, name in events:
            if not (start <= s <= start + dur) or "Eigen" not in line:
                continue
            if name.startswith(("ThunkExecutor", "end:", "ThreadpoolListener")):
                continue
            gaps += max(0, s - end_of_last)
            end_of_last = max(end_of_last, s + d)
            busy[name.split(".")[0]] += d
        gaps += max(0, start + dur - end_of_last)
    steps = steps_per_execution * len(decode)
    return {"steps": steps, "wall_ms": sum(e[1] for e in decode) / steps / 1e6,
            "gaps_ms": gaps / steps / 1e6, "busy_ms": {k: v / steps / 1e6 for k, v in busy.most_common()}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-m", "--model", help="GGUF model (default: the embedded SmolLM2-135M-Instruct Q4_1)")
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--gen-tokens", type=int, default=64, help="a multiple of the decode chunk (16)")
    ap.add_argument("--xla", action="store_true", help="profile XLA's attention and dots, not the native kernels")
    ap.add_argument("--top", type=int, default=12, help="op kinds to list")
    args = ap.parse_args(argv)
    if FLAG not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + FLAG).strip()

    import jax

    import llava_jax
    from llava_jax.defaults import smollm2_path
    from llava_jax.generate import Request, TextEngine
    from llava_jax.sampling import SamplingParams, initial_key

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench import make_prompt  # the same filler prompt as the benchmark

    model = args.model or str(smollm2_path())
    llm = llava_jax.load(model, n_ctx=args.prompt_tokens + args.gen_tokens + 64)
    engine = llm.engine
    if args.xla:
        engine = TextEngine(engine.cfg, engine.canonical_params(), engine.mesh, engine.dtype, decode_kernel=False)
    greedy = SamplingParams(temperature=0.0)
    prompt = make_prompt(lambda s: llm.tokenize(s, add_bos=False), args.prompt_tokens)

    def once():
        request = Request(list(prompt), None, 1 + args.gen_tokens)
        for _ in engine.generate([request], greedy, initial_key(greedy), llm.n_ctx, stop_ids=frozenset()):
            pass

    once()
    once()
    with tempfile.TemporaryDirectory() as trace_dir:
        jax.profiler.start_trace(trace_dir)
        once()
        jax.profiler.stop_trace()
        summary = summarize(_trace_events(trace_dir), engine.chunk)
    print(f"{Path(model).name}: decode path {engine.decode_kernels}, {summary['steps']} profiled steps")
    print(f"  {summary['wall_ms']:7.2f} ms per token (wall, profiled)")
    for kind, ms in list(summary["busy_ms"].items())[: args.top]:
        print(f"  {ms:7.3f} ms  {kind}")
    print(f"  {summary['gaps_ms']:7.3f} ms  idle between ops")
    return 0


if __name__ == "__main__":
    sys.exit(main())
