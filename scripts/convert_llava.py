#!/usr/bin/env python
"""Convert a LLaVA-1.5/1.6 checkpoint into mmproj-model-<type>.gguf + ggml-model-<type>.gguf.

    python scripts/convert_llava.py MODEL_DIR --outdir OUT [--clip CLIP_DIR] [--outtype f32|f16|bf16|q8_0]

The logic lives in `llava_jax.convert`; see its `cli` module.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llava_jax.convert.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
