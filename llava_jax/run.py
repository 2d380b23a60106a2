"""`python -m llava_jax.run`: the command line, with llama.cpp's flag names.

    python -m llava_jax.run -m MODEL.gguf -p "Once upon a time" -n 64
    python -m llava_jax.run -m MODEL.gguf --mmproj MMPROJ.gguf --image cat.jpg -p "What is in the image?"

Text streams to stdout; load / image / prompt-eval / eval statistics go to stderr as llama.cpp prints
them. `--json` prints one JSON object instead. Any user error is one `error: ...` line on stderr and
exit status 1; Ctrl-C exits with 130. JAX is imported only after the arguments are parsed (`--help` is
instant), and compiled programs are kept in JAX's persistent cache (`--no-compile-cache` turns it off).
"""

from __future__ import annotations

import argparse
import json
import sys

from llava_jax import prompts
from llava_jax.cli_config import (
    add_compile_cache_flag,
    add_engine_flags,
    buckets_from_args,
    memory_kwargs,
)
from llava_jax.errors import LlavaError, run_cli

EPILOG = """\
example (the embedded SmolLM2 + the project's random mmproj; see the README for real LLaVA files):
  python -m llava_jax.run --default-mmproj --image llava_jax/assets/shapes.png -p "What is in the image?" -n 32 --temp 0

prompts: with images, a prompt without <image> markers is wrapped in the chat template (--chat-template,
default from the GGUF metadata), images first; a prompt with markers is used as the whole prompt. A
text-only prompt is used as is (a completion, as llama-cli without -cnv) unless --chat-template or
-sys is given: then it is wrapped in that template (default: the GGUF's), as scripts/batch_eval.py
wraps every question.
"""


def _template_names() -> str:
    """The chat template names for --help (and LLaVA's conv-mode aliases, where prompts.py has them)."""
    aliases = getattr(prompts, "CONV_MODE_ALIASES", {})
    return ", ".join(prompts.TEMPLATES) + (f" or LLaVA's {', '.join(aliases)}" if aliases else "")


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The docstring and epilog as written, and each flag's default in its help line (where it has one and the
    help does not already say it)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default in (None, False, [], argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m llava_jax.run", description=__doc__.split("\n\n")[0],
                                epilog=EPILOG, formatter_class=_HelpFormatter)
    p.add_argument("--config", action="append", default=[],
                   help="TOML file of flag values (configs/; repeatable, later wins); flags override it")
    p.add_argument("-m", "--model", help="language model GGUF (default: the embedded SmolLM2-135M-Instruct Q4_1)")
    p.add_argument("--mmproj", help="mmproj GGUF (CLIP vision tower + projector); --default-mmproj uses the embedded random one")
    p.add_argument("--default-mmproj", action="store_true",
                   help="use the project's deterministic random mmproj (answers do not describe the image)")
    p.add_argument("--image", action="append", default=[], help="image file; repeat for several <image> markers")
    p.add_argument("-p", "--prompt", help="prompt text; with images, a prompt containing <image> is used as the whole prompt")
    p.add_argument("-f", "--file", help="read the prompt from a UTF-8 text file")
    p.add_argument("-e", "--escape", action="store_true", help="process escapes (\\n, \\t, \\', \\\", \\\\) in the prompt")
    p.add_argument("-sys", "--system-prompt", default=None,
                   help="system prompt for the chat template (default: the template's own; '' for none); "
                        "a text-only prompt is templated when it is given")
    p.add_argument("-n", "--n-predict", type=int, default=-1, help="tokens to generate (-1: until EOS or the context is full)")
    p.add_argument("-c", "--ctx-size", type=int, default=None,
                   help="context size (default: min(4096, model's); 0 = model's; above the model's: a warning)")
    p.add_argument("--temp", type=float, default=0.2, help="temperature, >= 0 (0 = greedy; llama-mtmd-cli's value)")
    p.add_argument("--top-k", type=int, default=40, help="top-k sampling, >= 0 (0 = off)")
    p.add_argument("--top-p", type=float, default=0.95, help="top-p sampling, in (0, 1] (1 = off)")
    p.add_argument("--min-p", type=float, default=0.05, help="min-p sampling, in [0, 1] (0 = off)")
    p.add_argument("--repeat-penalty", type=float, default=1.0, help="repetition penalty, > 0 (1 = off)")
    p.add_argument("--repeat-last-n", type=int, default=64, help="tokens the penalty looks back on (0 = off, -1 = context)")
    p.add_argument("-s", "--seed", type=int, default=-1, help="random seed (-1: random)")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--chat-template", help=f"{_template_names()} (default: from the GGUF metadata); "
                                           "applied to text-only prompts too when given")
    add_engine_flags(p)
    p.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-sequence tokens (benchmarks)")
    add_compile_cache_flag(p)
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


def read_prompt(args) -> str:
    """The prompt from -p or -f (UTF-8), escapes processed with -e; LlavaError when there is none."""
    if args.file:
        try:
            with open(args.file, encoding="utf-8") as f:
                prompt = f.read()
        except OSError as e:
            raise LlavaError(f"cannot read prompt file {args.file}: {e.strerror}") from None
        except UnicodeDecodeError as e:
            raise LlavaError(f"prompt file {args.file} is not UTF-8 text (byte {e.start}: {e.reason})") from None
    else:
        prompt = args.prompt
    if prompt is None:
        raise LlavaError("no prompt: pass -p TEXT or -f FILE")
    if args.escape:
        from llava_jax.prompts import process_escapes

        prompt = process_escapes(prompt)
    return prompt


def check_template(name: str | None) -> None:
    """An unknown --chat-template is a LlavaError in every mode (names as prompts.py resolves them)."""
    if name is not None:
        from llava_jax.prompts import build_prompt

        build_prompt("", 0, name)


def template_text_only(llm, prompt: str, args) -> tuple[str, bool]:
    """(prompt, templated): a text-only prompt wrapped in the chat template when --chat-template or -sys is
    given (the template named, else the GGUF's), as batch_eval wraps text-only questions; else as is."""
    if args.chat_template is None and args.system_prompt is None:
        return prompt, False
    from llava_jax.prompts import build_prompt, template_from_metadata

    name = args.chat_template or template_from_metadata(llm.metadata)
    return "".join(build_prompt(prompt, 0, name, args.system_prompt)), True


def sampling_kwargs(args) -> dict:
    """The generation keyword arguments of `Llava.stream` / `generate`, validated (one-line LlavaError)."""
    from llava_jax.sampling import SamplingParams

    SamplingParams(temperature=args.temp, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                   repeat_penalty=args.repeat_penalty, repeat_last_n=max(args.repeat_last_n, 0))
    if args.repeat_last_n < -1:
        raise LlavaError(f"--repeat-last-n must be >= -1 (-1 = the whole context), got {args.repeat_last_n}")
    return dict(max_new_tokens=args.n_predict, temperature=args.temp, top_k=args.top_k, top_p=args.top_p,
                min_p=args.min_p, repeat_penalty=args.repeat_penalty, repeat_last_n=args.repeat_last_n,
                seed=None if args.seed < 0 else args.seed, stop=args.stop, template=args.chat_template,
                system=args.system_prompt, ignore_eos=getattr(args, "ignore_eos", False))


def describe_images(llm, images: list, paths: list[str], random_mmproj: bool) -> None:
    """stderr: each image's size, tiles and token count (what the vision path really computes), and, for the
    random default mmproj, that the answer cannot describe the image."""
    if random_mmproj:
        _log("llava_jax: note: --default-mmproj is a randomly initialised projector: the image is tiled, encoded and "
             "placed in the prompt for real, but the answer does not describe it (use --mmproj with a real file)")
    for i, (img, path) in enumerate(zip(images, paths, strict=True)):
        lay = llm.image_encoder.layout(img.size)
        grid = f", grid {lay.grid[0]}x{lay.grid[1]}" if lay.grid != (0, 0) else ""
        _log(f"llava_jax: image {i} ({path}): {img.size[0]}x{img.size[1]} -> {lay.n_tiles} tile(s) of {lay.tile_tokens} "
             f"tokens ({lay.merge}{grid}) = {lay.n_tokens} image tokens")


def _run(args) -> int:
    prompt = read_prompt(args)
    check_template(args.chat_template)
    kwargs = sampling_kwargs(args)
    mmproj = args.mmproj
    random_mmproj = args.default_mmproj and mmproj is None
    if random_mmproj:
        from llava_jax.defaults import default_mmproj_path

        mmproj = default_mmproj_path()
    if args.image and mmproj is None:
        raise LlavaError("--image needs an mmproj file: pass --mmproj FILE (or --default-mmproj)")
    import llava_jax
    from llava_jax.sharding import parse_mesh

    scan = {"auto": None, "on": True, "off": False}[args.scan_layers]
    llm = llava_jax.load(args.model, mmproj=mmproj, dtype=args.dtype, mesh=parse_mesh(args.mesh),
                         n_ctx=args.ctx_size, scan_layers=scan, clip_compat=args.clip_compat,
                         buckets=buckets_from_args(args), notice=lambda m: _log(f"llava_jax: note: {m}"),
                         **memory_kwargs(args))
    if llm.n_ctx > llm.cfg.context_length:  # llama.cpp's warning, in its words
        _log(f"warning: model was trained on only {llm.cfg.context_length} context tokens ({llm.n_ctx} specified)")
    images = []
    if args.image:
        from llava_jax.images import load_image

        images = [load_image(p) for p in args.image]
        describe_images(llm, images, args.image, random_mmproj)
    templated = bool(images)
    if not images:
        prompt, templated = template_text_only(llm, prompt, args)
    if args.json:
        res = llm.generate(prompt, images, **kwargs)
        print(json.dumps({**res.as_dict(), "load_s": llm.load_s, "decode_kernels": llm.engine.decode_kernels},
                         ensure_ascii=False))
        return 0
    stream = llm.stream(prompt, images, **kwargs)
    for piece in stream:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()
    res = stream.result
    if not templated and not res.text.strip():
        _log("llava_jax: note: the answer is empty: a text-only prompt is used as is (a completion); "
             "pass --chat-template (or -sys) to ask it as a chat turn")
    if res.timings.image_tokens:
        _log(f"llava_jax: image embedding created: {res.timings.image_tokens} tokens")
    _print_timings(res, llm.load_s, llm.engine.decode_kernels)
    return 0


if __name__ == "__main__":
    sys.exit(main())
