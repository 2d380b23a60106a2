"""Answer a LLaVA-format question file in batches, resumably, on one or several processes.

    python scripts/batch_eval.py --model MODEL.gguf --mmproj MMPROJ.gguf \
        --questions questions.jsonl --image-folder images/ --answers answers.jsonl --batch-size 8

Multi-host (one process per host or per GPU, through jax.distributed):
    python scripts/batch_eval.py ... --num-processes 2 --process-id 0 --coordinator 127.0.0.1:12345
See llava_jax/evaluation.py for the formats and the resume / merge rules.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    from llava_jax.cli_config import add_bucket_flags

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", action="append", default=[],
                   help="TOML file of flag values (configs/; repeatable, later wins); flags override it")
    p.add_argument("--model", help="language model GGUF or Orbax weight-cache directory (default: embedded SmolLM2)")
    p.add_argument("--mmproj", help="mmproj GGUF")
    p.add_argument("--default-mmproj", action="store_true", help="the project's random mmproj (answers are not meaningful)")
    p.add_argument("--model-id", help="model_id written in the answers (default: the model file's stem)")
    p.add_argument("--questions", required=False, help="question JSONL (question_id, image, text, category)")
    p.add_argument("--image-folder", default=".")
    p.add_argument("--answers", required=False, help="answers JSONL (appended; resumed on restart)")
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
    p.add_argument("--conv-mode", "--chat-template", dest="chat_template", help="vicuna, mistral, chatml, llama3, raw")
    p.add_argument("--clip-compat", choices=["llava", "llama.cpp"], default="llava")
    p.add_argument("--dtype", choices=["f32", "bf16", "f16"])
    p.add_argument("--mesh", help="local device mesh DATAxMODEL (default 1x1)")
    p.add_argument("--scan-layers", choices=["auto", "on", "off"], default="auto")
    add_bucket_flags(p)
    p.add_argument("--save-orbax", help="write the loaded params as an Orbax weight cache to this directory and exit")
    p.add_argument("--num-processes", type=int, default=1)
    p.add_argument("--process-id", type=int, default=0)
    p.add_argument("--coordinator", default="127.0.0.1:12355", help="jax.distributed coordinator address")
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
    return run_cli(lambda: run(args), "interrupted: answers so far are saved; run the same command again to resume")


def run(args) -> int:
    import jax

    from llava_jax.errors import LlavaError

    if args.batch_size < 1:
        raise LlavaError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.num_processes < 1 or not 0 <= args.process_id < args.num_processes:
        raise LlavaError(f"--process-id must be in [0, {args.num_processes}) and --num-processes >= 1, "
                         f"got {args.process_id} / {args.num_processes}")
    mesh_shape = parse_mesh_shape(args.mesh)
    if args.num_processes > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=args.coordinator, num_processes=args.num_processes,
                                   process_id=args.process_id, local_device_ids=None)
    import llava_jax
    from llava_jax import evaluation as ev
    from llava_jax.cli_config import buckets_from_args
    from llava_jax.sharding import make_mesh

    mesh = make_mesh(*mesh_shape, devices=jax.local_devices())  # each process: its own devices, its own slice
    mmproj = args.mmproj
    if args.default_mmproj and mmproj is None:
        from llava_jax.defaults import default_mmproj_path

        mmproj = default_mmproj_path()
    scan = {"auto": None, "on": True, "off": False}[args.scan_layers]
    llm = llava_jax.load(args.model, mmproj=mmproj, dtype=args.dtype, mesh=mesh, n_ctx=args.ctx_size,
                         scan_layers=scan, clip_compat=args.clip_compat, buckets=buckets_from_args(args),
                         # decode chunks no longer than the answers (the first token comes from prefill)
                         decode_chunk=max(1, min(16, args.max_new_tokens - 1)) if args.max_new_tokens > 0 else 16)
    print(f"batch_eval: loaded in {llm.load_s:.2f} s", file=sys.stderr)
    if args.save_orbax:
        llm.save_orbax(args.save_orbax)
        print(f"batch_eval: Orbax weight cache written to {args.save_orbax}", file=sys.stderr)
        return 0
    if not args.questions or not args.answers:
        raise LlavaError("--questions and --answers are required")
    questions = ev.read_questions(args.questions)
    answers = Path(args.answers)
    pid, n_proc = args.process_id, args.num_processes
    out_path = answers if n_proc == 1 else ev.part_path(answers, pid)
    done = ev.read_answered([answers, *ev.existing_parts(answers)])
    todo = [q for q in questions if str(q.question_id) not in done][pid::n_proc]
    if n_proc > 1:
        from jax.experimental import multihost_utils

        # every process must split the same `done`: nobody writes before everybody has read
        multihost_utils.sync_global_devices("batch_eval:read_answered")
    model_id = args.model_id or (Path(llm.path).stem if llm.path else "llava_jax")
    generation = dict(max_new_tokens=args.max_new_tokens, temperature=args.temp, top_k=args.top_k,
                      top_p=args.top_p, min_p=args.min_p, repeat_penalty=args.repeat_penalty,
                      repeat_last_n=args.repeat_last_n, seed=args.seed, template=args.chat_template)
    writer = ev.AnswerWriter(out_path)
    bar = None
    if not args.no_progress:
        from tqdm import tqdm

        bar = tqdm(total=len(todo), unit="item", desc=f"answers[{pid}]", file=sys.stderr, dynamic_ncols=True)
    try:
        summary = ev.answer_questions(llm, todo, args.image_folder, writer, model_id, args.batch_size, generation,
                                      progress=bar.update if bar else None)
    finally:
        writer.close()
        if bar:
            bar.close()
    summary.skipped = len(done)
    if n_proc > 1:
        multihost_utils.sync_global_devices("batch_eval:answers_written")
        if pid == 0:
            summary.extra["merged_rows"] = ev.merge_parts(answers, questions, n_proc)
        multihost_utils.sync_global_devices("batch_eval:merged")
    else:  # question order (and the rows of parts left by an interrupted multi-process run merged in)
        summary.extra["rows"] = ev.finalize_answers(answers, questions, ev.existing_parts(answers))
    print("batch_eval: " + json.dumps(summary.as_dict()), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
