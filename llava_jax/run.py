"""`python -m llava_jax.run`: the command line, with llama.cpp's flag names.

    python -m llava_jax.run -m MODEL.gguf -p "Once upon a time" -n 64
    python -m llava_jax.run -m MODEL.gguf --mmproj MMPROJ.gguf --image cat.jpg -p "What is in the image?"

Text streams to stdout; load / image / prompt-eval / eval statistics go to stderr as llama.cpp prints
them. `--json` prints one JSON object instead. Any user error is one `error: ...` line on stderr and
exit status 1; Ctrl-C exits with 130.
"""

from __future__ import annotations

import argparse
import json
import sys

from llava_jax.cli_config import add_bucket_flags, buckets_from_args
from llava_jax.errors import LlavaError, run_cli


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m llava_jax.run", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", action="append", default=[], 
                   help="TOML file of flag values (configs/; repeatable, later wins); flags override it")
    p.add_argument("-m", "--model", help="language model GGUF (default: the embedded SmolLM2-135M-Instruct Q4_1)")
    p.add_argument("--mmproj", help="mmproj GGUF (CLIP vision tower + projector); --default-mmproj uses the embedded random one")
    p.add_argument("--default-mmproj", action="store_true",
                   help="use the project's deterministic random mmproj (answers do not describe the image)")
    p.add_argument("--image", action="append", default=[], help="image file; repeat for several <image> markers")
    p.add_argument("-p", "--prompt", help="prompt text; with images, a prompt containing <image> is used as the whole prompt")
    p.add_argument("-f", "--file", help="read the prompt from a file")
    p.add_argument("-e", "--escape", action="store_true", help="process escapes (\\n, \\t, \\', \\\", \\\\) in the prompt")
    p.add_argument("-n", "--n-predict", type=int, default=-1, help="tokens to generate (-1: until EOS or the context is full)")
    p.add_argument("-c", "--ctx-size", type=int, default=None, help="context size (default min(4096, model's); 0 = model's)")
    p.add_argument("--temp", type=float, default=0.8, help="temperature (0 = greedy)")
    p.add_argument("--top-k", type=int, default=40)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--min-p", type=float, default=0.05)
    p.add_argument("--repeat-penalty", type=float, default=1.0)
    p.add_argument("--repeat-last-n", type=int, default=64)
    p.add_argument("-s", "--seed", type=int, default=-1, help="random seed (-1: random)")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--chat-template", help="vicuna, mistral, chatml, llama3, llava-cli or raw (default: from the GGUF metadata)")
    p.add_argument("--clip-compat", choices=["llava", "llama.cpp"], default="llava",
                   help="image pipeline semantics: LLaVA's own (default) or llama.cpp's mtmd graph")
    p.add_argument("--dtype", choices=["f32", "bf16", "f16"], help="compute dtype (default: f32 on CPU, bf16 on GPU/TPU)")
    p.add_argument("--mesh", help="device mesh DATAxMODEL, e.g. 2x4 (default: one device)")
    p.add_argument("--scan-layers", choices=["auto", "on", "off"], default="auto",
                   help="scan over stacked layers (auto: off on CPU, on elsewhere)")
    add_bucket_flags(p)
    p.add_argument("--json", action="store_true", help="print one JSON object (text, token ids, timings) instead of streaming")
    return p


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _print_timings(res, load_s: float, decode_kernels: str) -> None:
    t = res.timings
    _log(f"llava_jax: load time = {load_s * 1e3:10.2f} ms")
    _log(f"llava_jax: decode kernels = {decode_kernels}")
    if t.image_tokens:
        _log(f"llava_jax: image encode time = {t.image_s * 1e3:10.2f} ms / {t.image_tokens} image tokens")
    _log(f"llava_jax: compile time = {t.compile_s * 1e3:10.2f} ms")
    _log(f"llava_jax: prompt eval time = {t.prompt_s * 1e3:10.2f} ms / {t.prompt_tokens:5d} tokens "
         f"({t.prompt_tps:8.2f} tokens per second)")
    _log(f"llava_jax:        eval time = {t.generate_s * 1e3:10.2f} ms / {t.generated_tokens:5d} runs   "
         f"({t.generate_tps:8.2f} tokens per second)")


def main(argv: list[str] | None = None) -> int:
    from llava_jax.cli_config import parse_with_config

    args = parse_with_config(build_parser(), argv, sections=("model", "generation", "mesh"))
    return run_cli(lambda: _run(args))


def _run(args) -> int:
    import llava_jax
    from llava_jax.sharding import parse_mesh

    if args.file:
        try:
            with open(args.file, encoding="utf-8") as f:
                prompt = f.read()
        except OSError as e:
            raise LlavaError(f"cannot read prompt file {args.file}: {e.strerror}") from None
    else:
        prompt = args.prompt
    if prompt is None:
        raise LlavaError("no prompt: pass -p TEXT or -f FILE")
    if args.escape:
        from llava_jax.prompts import process_escapes

        prompt = process_escapes(prompt)
    mmproj = args.mmproj
    if args.default_mmproj and mmproj is None:
        from llava_jax.defaults import default_mmproj_path

        mmproj = default_mmproj_path()
    if args.image and mmproj is None:
        raise LlavaError("--image needs an mmproj file: pass --mmproj FILE (or --default-mmproj)")
    scan = {"auto": None, "on": True, "off": False}[args.scan_layers]
    llm = llava_jax.load(args.model, mmproj=mmproj, dtype=args.dtype, mesh=parse_mesh(args.mesh),
                         n_ctx=args.ctx_size, scan_layers=scan, clip_compat=args.clip_compat,
                         buckets=buckets_from_args(args))
    images = []
    if args.image:
        from llava_jax.images import load_image

        images = [load_image(p) for p in args.image]
    kwargs = dict(max_new_tokens=args.n_predict, temperature=args.temp, top_k=args.top_k, top_p=args.top_p,
                  min_p=args.min_p, repeat_penalty=args.repeat_penalty, repeat_last_n=args.repeat_last_n,
                  seed=None if args.seed < 0 else args.seed, stop=args.stop, template=args.chat_template)
    if args.json:
        res = llm.generate(prompt, images, **kwargs)
        print(json.dumps({**res.as_dict(), "load_s": llm.load_s, "decode_kernels": llm.engine.decode_kernels},
                         ensure_ascii=False))
        return 0
    for piece in llm.stream(prompt, images, **kwargs):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    res = llm.last_result
    if res.timings.image_tokens:
        _log(f"llava_jax: image embedding created: {res.timings.image_tokens} tokens")
    _print_timings(res, llm.load_s, llm.engine.decode_kernels)
    return 0


if __name__ == "__main__":
    sys.exit(main())
