"""Answer a LLaVA-format question file in batches, resumably, on one or several processes.

    python scripts/batch_eval.py --model MODEL.gguf --mmproj MMPROJ.gguf \
        --questions questions.jsonl --image-folder images/ --answers answers.jsonl --batch-size 8

Takes the flags of LLaVA's `model_vqa_loader.py` / `model_vqa_science.py` / `model_vqa_mmbench.py`
(`--question-file`, `--answers-file`, `--conv-mode vicuna_v1`, `--num-chunks`, `--chunk-idx`,
`--single-pred-prompt`, `--all-rounds`, `--lang`, `--temperature`), so its eval shell scripts run with it.
Multi-host (one process per host or per GPU, through jax.distributed):
    python scripts/batch_eval.py ... --num-processes 2 --process-id 0 --coordinator 127.0.0.1:12345
See llava_jax/evaluation.py for the formats and the resume / merge rules. Everything that can be
checked (flags, the question file, the image folder, the template, images without --mmproj) is checked
before the model loads.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import NamedTuple


def build_parser() -> argparse.ArgumentParser:
    from llava_jax.cli_config import add_bucket_flags, add_memory_flags

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", action="append", default=[],
                   help="TOML file of flag values (configs/; repeatable, later wins); flags override it")
    p.add_argument("--model", "--model-path", dest="model",
                   help="language model GGUF or Orbax weight-cache directory (default: embedded SmolLM2)")
    p.add_argument("--mmproj", help="mmproj GGUF")
    p.add_argument("--default-mmproj", action="store_true", help="the project's random mmproj (answers are not meaningful)")
    p.add_argument("--model-id", help="model_id written in the answers (default: the model file's stem)")
    p.add_argument("--questions", "--question-file", dest="questions",
                   help="question file: LLaVA JSONL, ScienceQA JSON list or MMBench TSV (told by content)")
    p.add_argument("--image-folder", default=".")
    p.add_argument("--answers", "--answers-file", dest="answers", help="answers JSONL (appended; resumed on restart)")
    p.add_argument("--single-pred-prompt", action="store_true",
                   help="ScienceQA / MMBench: ask for the option's letter, as LLaVA's flag does")
    p.add_argument("--all-rounds", action="store_true", help="MMBench: one round per option, the options rotated")
    p.add_argument("--lang", choices=["en", "cn"], default="en", help="MMBench: the --single-pred-prompt language")
    p.add_argument("--num-chunks", type=int, default=1, help="LLaVA's sharding: split the questions in N chunks...")
    p.add_argument("--chunk-idx", type=int, default=0, help="...and answer this one (its own --answers file)")
    p.add_argument("--limit", type=int, help="only the first N questions (lines / rows) of the file")
    p.add_argument("--retry-errors", action="store_true", help="answer rows recorded with an error again")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", "-n", type=int, default=128)
    p.add_argument("--ctx-size", type=int, default=None)
    p.add_argument("--temp", "--temperature", dest="temp", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=40)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--min-p", type=float, default=0.05)
    p.add_argument("--repeat-penalty", type=float, default=1.0)
    p.add_argument("--repeat-last-n", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--conv-mode", "--chat-template", dest="chat_template",
                   help="vicuna, llava-cli, mistral, chatml, llama3, raw, or LLaVA's names (vicuna_v1, llava_v1, "
                        "llava_v0, mistral_instruct, chatml_direct, llava_llama_3, plain)")
    p.add_argument("--clip-compat", choices=["llava", "llama.cpp"], default="llava")
    p.add_argument("--dtype", choices=["f32", "bf16", "f16"])
    p.add_argument("--mesh", help="local device mesh DATAxMODEL (default 1x1)")
    p.add_argument("--scan-layers", choices=["auto", "on", "off"], default="auto")
    add_bucket_flags(p)
    add_memory_flags(p)
    p.add_argument("--save-orbax", help="write the loaded params as an Orbax weight cache to this directory and exit")
    p.add_argument("--num-processes", type=int, default=1)
    p.add_argument("--process-id", type=int, default=0)
    p.add_argument("--coordinator", default="127.0.0.1:12355", help="jax.distributed coordinator address")
    p.add_argument("--barrier-timeout", type=float, default=86400.0,
                   help="seconds a process waits for the others at a barrier before failing (default one day)")
    p.add_argument("--no-progress", action="store_true")
    return p


def parse_mesh_shape(spec: str | None) -> tuple[int, int]:
    """"DATAxMODEL" → (data, model); None → (1, 1). LlavaError on anything else."""
    from llava_jax.errors import LlavaError

    if not spec:
        return 1, 1
    try:
        data, model = (int(x) for x in spec.lower().split("x"))
    except ValueError:
        raise LlavaError(f"bad mesh shape {spec!r}: expected DATAxMODEL, e.g. 2x4") from None
    return data, model


def main(argv: list[str] | None = None) -> int:
    from llava_jax.cli_config import parse_with_config
    from llava_jax.errors import run_cli

    args = parse_with_config(build_parser(), argv)
    rc = run_cli(lambda: run(args), "interrupted: answers so far are saved; run the same command again to resume")
    if rc and _PEER_LOST:
        # jax's exit-time shutdown waits at one more barrier for every process (until the heartbeat
        # timeout, then aborts): a process whose peer is gone leaves at once
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)
    return rc


_PEER_LOST = False  # set when a barrier failed: some process is gone


class Plan(NamedTuple):
    """What a process does, worked out before the model loads."""

    questions: list  # this job's (chunk's) questions, in question-file order
    todo: list  # this process's share of them still to answer
    answers: Path
    out_path: Path  # the answers file, or this process's part file
    template: str | None
    mmproj: str | None
    skipped: int  # questions of this process's share already answered


def check_args(args) -> None:
    """The flags alone (LlavaError, one line)."""
    from llava_jax.errors import LlavaError

    if args.batch_size < 1:
        raise LlavaError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.num_processes < 1 or not 0 <= args.process_id < args.num_processes:
        raise LlavaError(f"--process-id must be in [0, {args.num_processes}) and --num-processes >= 1, "
                         f"got {args.process_id} / {args.num_processes}")
    if args.num_chunks < 1 or not 0 <= args.chunk_idx < args.num_chunks:
        raise LlavaError(f"--chunk-idx must be in [0, {args.num_chunks}) and --num-chunks >= 1, "
                         f"got {args.chunk_idx} / {args.num_chunks}")
    if args.limit is not None and args.limit < 0:
        raise LlavaError(f"--limit must be >= 0, got {args.limit}")
    if args.barrier_timeout <= 0:
        raise LlavaError(f"--barrier-timeout must be > 0, got {args.barrier_timeout}")
    parse_mesh_shape(args.mesh)
    if not args.save_orbax and (not args.questions or not args.answers):
        raise LlavaError("--questions and --answers are required")


def mmproj_path(args) -> str | None:
    """--mmproj (which must exist), or the random one with --default-mmproj, or None."""
    from llava_jax.errors import LlavaError

    if args.mmproj is not None:
        if not Path(args.mmproj).is_file():
            raise LlavaError(f"mmproj file not found: {args.mmproj}")
        return args.mmproj
    if args.default_mmproj:
        from llava_jax.defaults import default_mmproj_path

        return str(default_mmproj_path())
    return None


def has_vision_weights(model: str | None) -> bool:
    """Does --model name an Orbax weight cache that holds an image encoder?"""
    meta = Path(model) / "meta.json" if model else None
    if meta is None or not meta.is_file():
        return False
    try:
        return "vision" in json.loads(meta.read_text())
    except (json.JSONDecodeError, OSError):
        return False  # the loader reports a broken cache


def make_plan(args) -> Plan:
    """Everything before the model loads: the flags, the question file (every line), the chunk, the image
    folder, the template, images without an mmproj, and which questions are still to answer."""
    from llava_jax import evaluation as ev
    from llava_jax.errors import LlavaError

    template = ev.resolve_template(args.chat_template)
    mmproj = mmproj_path(args)
    questions = ev.select(ev.read_questions(args.questions, args.single_pred_prompt, args.all_rounds, args.lang),
                          args.limit, args.num_chunks, args.chunk_idx)
    missing = ev.check_images(questions, args.image_folder)
    if missing:
        print(f"batch_eval: {len(missing)} image file(s) not found (their rows become errors), e.g. {missing[0]}",
              file=sys.stderr)
    if mmproj is None and any(q.has_image for q in questions) and not has_vision_weights(args.model):
        raise LlavaError("the questions have images but no --mmproj was given (or --default-mmproj)")
    answers = Path(args.answers)
    pid, n_proc = args.process_id, args.num_processes
    out_path = answers if n_proc == 1 else ev.part_path(answers, pid)
    ev.repair_tail(out_path)  # before reading: a torn last line is not an answer
    flags = ev.pending(questions, ev.read_answered([answers, *ev.existing_parts(answers)]), args.retry_errors)
    share = list(zip(questions, flags, strict=True))[pid::n_proc]  # by line, whatever is done already
    todo = [q for q, todo in share if todo]
    return Plan(questions, todo, answers, out_path, template, mmproj, len(share) - len(todo))


def barrier(name: str, args) -> None:
    """Wait for every process at `name` (jax.distributed's coordination service), at most
    --barrier-timeout seconds: LlavaError when a process does not come (it died, or is stuck)."""
    from jax._src import distributed

    from llava_jax.errors import LlavaError

    try:
        distributed.global_state.client.wait_at_barrier(f"batch_eval:{name}", int(args.barrier_timeout * 1000))
    except Exception as e:  # noqa: BLE001 - the runtime's error type differs between jax versions
        global _PEER_LOST
        _PEER_LOST = True
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise LlavaError(f"process {args.process_id}: not every process reached barrier {name!r} within "
                         f"{args.barrier_timeout:g} s (did one fail?): {reason}") from None


def run(args) -> int:
    check_args(args)
    plan = None if args.save_orbax else make_plan(args)
    import jax

    if args.num_processes > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=args.coordinator, num_processes=args.num_processes,
                                   process_id=args.process_id, local_device_ids=None)
        barrier("planned", args)  # every process has read the answers before anyone writes
    llm = load_model(args, plan.mmproj if plan else mmproj_path(args))
    if plan is None:
        llm.save_orbax(args.save_orbax)
        print(f"batch_eval: Orbax weight cache written to {args.save_orbax}", file=sys.stderr)
        return 0
    summary = answer(args, plan, llm)
    summary.extra |= finish(args, plan)
    print("batch_eval: " + json.dumps(summary.as_dict()), file=sys.stderr)
    return 0


def load_model(args, mmproj: str | None):
    import jax

    import llava_jax
    from llava_jax.cli_config import buckets_from_args, memory_kwargs
    from llava_jax.sharding import make_mesh

    mesh = make_mesh(*parse_mesh_shape(args.mesh), devices=jax.local_devices())  # each process: its own devices
    scan = {"auto": None, "on": True, "off": False}[args.scan_layers]
    llm = llava_jax.load(args.model, mmproj=mmproj, dtype=args.dtype, mesh=mesh, n_ctx=args.ctx_size,
                         scan_layers=scan, clip_compat=args.clip_compat, buckets=buckets_from_args(args),
                         # decode chunks no longer than the answers (the first token comes from prefill)
                         decode_chunk=max(1, min(16, args.max_new_tokens - 1)) if args.max_new_tokens > 0 else 16,
                         notice=lambda m: print(f"batch_eval: note: {m}", file=sys.stderr), **memory_kwargs(args))
    print(f"batch_eval: loaded in {llm.load_s:.2f} s", file=sys.stderr)
    return llm


def answer(args, plan: Plan, llm):
    """This process's questions → its answers / part file (appended, flushed row by row)."""
    from llava_jax import evaluation as ev

    model_id = args.model_id or (Path(llm.path).stem if llm.path else "llava_jax")
    generation = dict(max_new_tokens=args.max_new_tokens, temperature=args.temp, top_k=args.top_k,
                      top_p=args.top_p, min_p=args.min_p, repeat_penalty=args.repeat_penalty,
                      repeat_last_n=args.repeat_last_n, seed=args.seed, template=plan.template)
    writer = ev.AnswerWriter(plan.out_path)
    bar = None
    if not args.no_progress:
        from tqdm import tqdm

        bar = tqdm(total=len(plan.todo), unit="item", desc=f"answers[{args.process_id}]", file=sys.stderr,
                   dynamic_ncols=True)
    try:
        summary = ev.answer_questions(llm, plan.todo, args.image_folder, writer, model_id, args.batch_size,
                                      generation, progress=bar.update if bar else None)
    finally:
        writer.close()
        if bar:
            bar.close()
    summary.skipped = plan.skipped
    return summary


def finish(args, plan: Plan) -> dict:
    """One process: the answers file in question order (parts an interrupted multi-process run left merged
    in). Several: process 0 merges the parts once every process is done."""
    from llava_jax import evaluation as ev

    if args.num_processes == 1:
        return {"rows": ev.finalize_answers(plan.answers, plan.questions, ev.existing_parts(plan.answers))}
    barrier("answered", args)
    merged, error = {}, None
    if args.process_id == 0:
        try:
            merged["merged_rows"] = ev.merge_parts(plan.answers, plan.questions, args.num_processes)
        except Exception as e:  # noqa: BLE001 - the others are let go before it is raised
            error = e
    barrier("merged", args)
    if error is not None:
        raise error
    return merged


if __name__ == "__main__":
    sys.exit(main())
