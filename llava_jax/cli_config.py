"""`--config FILE` for the CLIs: a TOML file of flag values, flags on the command line override it.

Keys are flag names (dashes or underscores) grouped in tables: `[model]`, `[generation]` and
`[mesh]` are read by `python -m llava_jax.run` and `scripts/batch_eval.py`; `[batch]` only by
`batch_eval.py`. A key a tool does not know in a table it reads, a table that is none of these four,
or a value the flag would refuse (type, choices) is a one-line error (typos do not pass).

`parse_with_config` also gives every CLI `--no-compile-cache` and, unless it is passed, turns on JAX's
persistent compilation cache (`defaults.compile_cache_dir()`), so a repeated call loads its compiled
programs instead of compiling them again. Nothing here imports jax: `--help` stays fast.
"""

from __future__ import annotations

import argparse
import tomllib
from pathlib import Path

from llava_jax.errors import LlavaError

TABLES = ("model", "generation", "mesh", "batch")


def load_config(path: str | None, sections: tuple[str, ...] = TABLES) -> dict:
    """TOML file → {flag dest: value} from the tables in `sections` (later tables win on a repeated key)."""
    if not path:
        return {}
    p = Path(path)
    if not p.is_file():
        raise LlavaError(f"config file not found: {p}")
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise LlavaError(f"{p}: not valid TOML ({e})") from None
    except UnicodeDecodeError:
        raise LlavaError(f"{p}: not a UTF-8 text file") from None
    flat: dict = {}
    for key, value in data.items():
        if not isinstance(value, dict):
            raise LlavaError(f"{p}: key {key!r} must sit in a table ([model], [generation], [mesh] or [batch])")
        if key not in TABLES:
            raise LlavaError(f"{p}: unknown table [{key}] (tables: [model], [generation], [mesh], [batch])")
        if key in sections:
            flat |= {k.replace("-", "_"): v for k, v in value.items()}
    return flat


def _check_value(action: argparse.Action, value):
    """A config value as the flag would take it: strings through the flag's type, choices checked."""
    flag = action.option_strings[-1] if action.option_strings else action.dest
    if isinstance(action, argparse._StoreConstAction):  # store_true / store_false: the value itself
        if not isinstance(value, bool):
            raise LlavaError(f"{action.dest} = {value!r}: expected true or false (flag {flag})")
        return value
    if isinstance(action, argparse._AppendAction):
        items = value if isinstance(value, list) else [value]
        return [_convert(action, flag, v) for v in items]
    return _convert(action, flag, value)


def _convert(action: argparse.Action, flag: str, value):
    if isinstance(value, (dict, list)):
        raise LlavaError(f"{action.dest} = {value!r}: expected a single value (flag {flag})")
    typ = action.type
    if typ is not None and not isinstance(value, bool):
        try:
            if isinstance(value, str) or (typ is float and isinstance(value, int)):
                value = typ(value)
            elif not isinstance(value, typ):
                raise TypeError
        except (TypeError, ValueError):
            raise LlavaError(f"{action.dest} = {value!r}: expected {getattr(typ, '__name__', typ)} (flag {flag})") from None
    elif typ is not None:
        raise LlavaError(f"{action.dest} = {value!r}: expected {getattr(typ, '__name__', typ)} (flag {flag})")
    if action.choices is not None and value not in action.choices:
        raise LlavaError(f"{action.dest} = {value!r}: choose from {', '.join(map(str, action.choices))} (flag {flag})")
    return value


def parse_with_config(parser: argparse.ArgumentParser, argv: list[str] | None,
                      sections: tuple[str, ...] = TABLES) -> argparse.Namespace:
    """Parse once for --config, apply its values as defaults, parse again (so flags win); then turn on the
    compilation cache unless --no-compile-cache."""
    add_compile_cache_flag(parser)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", action="append", default=[])
    known, _ = pre.parse_known_args(argv)
    values: dict = {}
    try:
        for path in known.config:  # later files override earlier ones
            values |= load_config(path, sections)
        actions = {a.dest: a for a in parser._actions if a.dest not in ("help", "config")}
        unknown = sorted(set(values) - set(actions))
        if unknown:
            raise LlavaError(f"{', '.join(known.config)}: unknown keys {', '.join(unknown)}")
        values = {k: _check_value(actions[k], v) for k, v in values.items()}
    except LlavaError as e:
        parser.exit(1, f"error: {e}\n")
    # repeatable flags (--stop, --image): given on the command line, they replace the config's list
    appended = {k for k in values if isinstance(actions[k], argparse._AppendAction)}
    if appended:
        parser.set_defaults(**{k: [] for k in appended})
        given = parser.parse_args(argv)
        values |= {k: [] for k in appended if getattr(given, k)}  # the final parse appends the flags' items
    parser.set_defaults(**values)
    args = parser.parse_args(argv)
    if not args.no_compile_cache:
        from llava_jax.defaults import enable_compile_cache

        enable_compile_cache()
    return args


def add_compile_cache_flag(parser: argparse.ArgumentParser) -> None:
    """--no-compile-cache (config key no_compile_cache); `parse_with_config` adds it when a parser lacks it."""
    if any(a.dest == "no_compile_cache" for a in parser._actions):
        return
    parser.add_argument("--no-compile-cache", action="store_true",
                        help="do not use JAX's persistent compilation cache (default: on, in "
                             "~/.cache/llava_jax/jax_cache or $LLAVA_JAX_COMPILE_CACHE)")


KV_TYPES = ("f32", "f16", "bf16")


def add_memory_flags(parser: argparse.ArgumentParser) -> None:
    """--weights (config key weights) and llama.cpp's -ctk / -ctv (cache_type_k / cache_type_v)."""
    parser.add_argument("--weights", choices=["quantized", "dequantized"], default=None,
                        help="keep matrices in the file's block format in memory, read by the products directly "
                             "(quantized; default on CPU), or dequantize them at load to --dtype (default on GPU/TPU)")
    parser.add_argument("-ctk", "--cache-type-k", choices=KV_TYPES, default=None,
                        help="KV cache dtype for K (default: the compute dtype; f16 halves the cache)")
    parser.add_argument("-ctv", "--cache-type-v", choices=KV_TYPES, default=None,
                        help="KV cache dtype for V (llava_jax keeps K and V in one dtype: give the same as -ctk)")


def memory_kwargs(args: argparse.Namespace) -> dict:
    """`load()` keyword arguments of the memory flags (weights=, kv_dtype=); a K/V type mismatch is a LlavaError."""
    from llava_jax.errors import LlavaError

    k, v = getattr(args, "cache_type_k", None), getattr(args, "cache_type_v", None)
    if k and v and k != v:
        raise LlavaError(f"-ctk {k} and -ctv {v} differ: llava_jax keeps K and V in one dtype")
    return {"weights": getattr(args, "weights", None), "kv_dtype": k or v}


def add_bucket_flags(parser: argparse.ArgumentParser) -> None:
    """--bucket-min / --bucket-step / --bucket-prompt-step (config keys bucket_min / bucket_step /
    bucket_prompt_step), defaults those of `generate.Buckets` (copied in `defaults`, so that building the
    parser imports no jax)."""
    from llava_jax.defaults import BUCKET_MIN, BUCKET_PROMPT_STEP, BUCKET_STEP

    parser.add_argument("--bucket-min", type=int, default=BUCKET_MIN,
                        help="smallest compiled prompt-length bucket; lengths round up to powers of two from here")
    parser.add_argument("--bucket-step", type=int, default=BUCKET_STEP,
                        help="above this length, KV-cache lengths round up to multiples of it "
                             "(fewer compiles vs less padding)")
    parser.add_argument("--bucket-prompt-step", type=int, default=BUCKET_PROMPT_STEP,
                        help="above this length, prompt lengths round up to multiples of it (each padded "
                             "row costs a real row's compute; each bucket is one more compile)")


def buckets_from_args(args: argparse.Namespace):
    """The `generate.Buckets` the bucket flags ask for (a bad policy raises LlavaError)."""
    from llava_jax.generate import Buckets

    return Buckets(args.bucket_min, args.bucket_step, args.bucket_prompt_step)


def add_engine_flags(parser: argparse.ArgumentParser) -> None:
    """How the model runs, shared by `run` and `serve`: image pipeline, dtype, mesh, layer scan,
    compile buckets and the memory flags."""
    parser.add_argument("--clip-compat", choices=["llava", "llama.cpp"], default="llava",
                        help="image pipeline semantics: LLaVA's own or llama.cpp's mtmd graph")
    parser.add_argument("--dtype", choices=["f32", "bf16", "f16"],
                        help="compute dtype (default: f32 on CPU, bf16 on GPU/TPU)")
    parser.add_argument("--mesh", help="device mesh DATAxMODEL, e.g. 2x4 (default: one device)")
    parser.add_argument("--scan-layers", choices=["auto", "on", "off"], default="auto",
                        help="scan over stacked layers (auto: off on CPU, on elsewhere)")
    add_bucket_flags(parser)
    add_memory_flags(parser)
