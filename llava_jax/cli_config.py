"""`--config FILE` for the CLIs: a TOML file of flag values, flags on the command line override it.

Keys are flag names (dashes or underscores) grouped in tables: `[model]`, `[generation]` and
`[mesh]` are read by `python -m llava_jax.run` and `scripts/batch_eval.py`; `[batch]` only by
`batch_eval.py`. A key a tool does not know in a table it reads is an error (typos do not pass).
"""

from __future__ import annotations

import argparse
import tomllib
from pathlib import Path

from llava_jax.errors import LlavaError


def load_config(path: str | None, sections: tuple[str, ...] = ("model", "generation", "mesh", "batch")) -> dict:
    if not path:
        return {}
    p = Path(path)
    if not p.exists():
        raise LlavaError(f"config file not found: {p}")
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise LlavaError(f"{p}: not valid TOML ({e})") from None
    flat: dict = {}
    for key, value in data.items():
        if not isinstance(value, dict):
            raise LlavaError(f"{p}: key {key!r} must sit in a table ([model], [generation], [mesh] or [batch])")
        if key in sections:
            flat |= {k.replace("-", "_"): v for k, v in value.items()}
    return flat


def parse_with_config(parser: argparse.ArgumentParser, argv: list[str] | None,
                      sections: tuple[str, ...] = ("model", "generation", "mesh", "batch")) -> argparse.Namespace:
    """Parse once for --config, apply its values as defaults, parse again (so flags win)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", action="append", default=[])
    known, _ = pre.parse_known_args(argv)
    values: dict = {}
    try:
        for path in known.config:  # later files override earlier ones
            values |= load_config(path, sections)
    except LlavaError as e:
        parser.exit(1, f"error: {e}\n")
    dests = {a.dest for a in parser._actions}
    unknown = sorted(set(values) - dests)
    if unknown:
        parser.exit(1, f"error: {', '.join(known.config)}: unknown keys {', '.join(unknown)}\n")
    parser.set_defaults(**values)
    return parser.parse_args(argv)
