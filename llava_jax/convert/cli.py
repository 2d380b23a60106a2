"""`python scripts/convert_llava.py MODEL_DIR --outdir OUT [--clip CLIP_DIR] [--outtype f32|f16|bf16|q8_0]`.

Writes OUT/mmproj-model-<type>.gguf and OUT/ggml-model-<type>.gguf. Both files are planned (layout,
vision tower, every tensor and the tokenizer resolved) before either is written, so a refusal leaves
nothing behind; a failure is one stderr line and exit status 1.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from llava_jax.convert.language import plan_language_model
from llava_jax.convert.layouts import detect_layout
from llava_jax.convert.mmproj import plan_mmproj
from llava_jax.convert.writer import OUTTYPES, check_outtype, write_plans
from llava_jax.errors import run_cli


def output_paths(outdir: str | os.PathLike[str], outtype: str) -> tuple[Path, Path]:
    """(mmproj path, language-model path) for `outtype` in `outdir`."""
    out = Path(outdir)
    return out / f"mmproj-model-{outtype}.gguf", out / f"ggml-model-{outtype}.gguf"


def convert(model_dir: str | os.PathLike[str], outdir: str | os.PathLike[str], outtype: str = "f16",
            clip_dir: str | os.PathLike[str] | None = None, progress: bool = True) -> tuple[Path, Path]:
    """Write both GGUF files of the LLaVA checkpoint in `model_dir`; returns (mmproj path, language path)."""
    check_outtype(outtype)
    layout = detect_layout(model_dir, clip_dir)
    plans = [plan_mmproj(layout, outtype), plan_language_model(layout, outtype)]
    paths = output_paths(outdir, outtype)
    write_plans(list(zip(plans, paths, strict=True)), progress=progress)
    return paths


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, like every other refusal
        self.exit(2, f"error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="convert_llava.py",
                description="Convert a LLaVA-1.5/1.6 checkpoint (llava-hf or original layout) into "
                            "mmproj-model-<type>.gguf and ggml-model-<type>.gguf.")
    p.add_argument("model_dir", help="checkpoint directory (config.json, shards, tokenizer)")
    p.add_argument("--outdir", required=True, help="output directory")
    p.add_argument("--clip", dest="clip_dir", default=None,
                   help="local CLIP directory of the vision tower (original LLaVA-1.5: `mm_vision_tower`)")
    p.add_argument("--outtype", default="f16", help=f"tensor type: {', '.join(OUTTYPES)} (default f16)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> int:
        mmproj, text = convert(args.model_dir, args.outdir, args.outtype, args.clip_dir, progress=not args.no_progress)
        print(f"wrote {mmproj}")
        print(f"wrote {text}")
        return 0

    return run_cli(body, interrupted="error: interrupted")
