"""One f32 SmolLM2 (the real Q4_1 file, default settings) per pytest process, shared by the test modules.

Loading takes ~2 s but compiling the prefill / decode programs takes 20-40 s on a shared 2-core machine,
and each `Llava` has its own compiled-program cache; sharing one model lets test_text_parity and
test_generate compile them once. Tests must not change its settings (`n_ctx`, ...): use `copy.copy`.
"""

from __future__ import annotations

import functools


@functools.cache
def shared_smollm2():
    import llava_jax

    return llava_jax.load()
