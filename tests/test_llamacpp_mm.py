"""llama.cpp parity of whole runs (issues 3 and 4).

1. The GGUF files our converter writes, run by llama.cpp itself (`llama-cpp-python==0.3.36`, CPU, f32 KV cache,
   no flash attention, models loaded with `use_extra_bufts=False`: the AMX path crashes in these VMs):
   - tokenization equals llava_jax's tokenizer (SentencePiece and byte-level BPE vocabularies, special tokens
     parsed or not, BOS or not);
   - 16 greedy tokens of text prompts equal `llava_jax.load(...).generate(temperature=0)`;
   - with images, through llama.cpp's mtmd (our converted mmproj, 1.5 and 1.6): the chunk layout and text ids
     equal our `build_request`, and 16 greedy tokens equal ours in `clip_compat="llama.cpp"` mode.
2. Compat mode vs the shared llama.cpp multimodal references (../shared/reference/mm): the embedded SmolLM2 Q4_1
   (dequantized to f32 = the F32 rewrite llama.cpp ran) + the tiny 1.5 / 1.6 mmproj files, prompt
   `<__media__>\\nWhat is in the image?` (image first, no template), 24 greedy tokens on each of the 4 images.
   The issue asked for equal answers on >= 6 of the 8 pairs; measured: 8 of 8 equal, so the test asks for 8 of 8.
   Where a pair differs, the failure message gives the margin (top-1 minus top-2 logit in our run) at the first
   divergence, to tell a near-tie from a different function.
   The models for part 2 are loaded with `scan_layers=True` (XLA:CPU compiles the scanned 30-layer decoder in
   ~1/5 of the unrolled time; the function is the same, see test_text_parity); the prefill of the 1.6 images
   (up to 2887 tokens) dominates the run time.
"""

from __future__ import annotations

import copy
import ctypes
import json

import numpy as np
import pytest
from hf_fixtures import *  # noqa: F403  (session fixtures: hf_llava15_dir, hf_llava16_dir, hf_llava15_bpe_dir)

import llava_jax
from llava_jax.convert import convert, write_language_model
from llava_jax.generate import IMAGE_PLACEHOLDER
from llava_jax.images import load_image
from llava_jax.vision import ImageEncoder

pytestmark = [pytest.mark.slow, pytest.mark.llamacpp]

REF_IMAGES = ("photo_640x488", "shapes_200x150", "shapes_300x900", "shapes_400x300")
MM_PROMPT = "<__media__>\nWhat is in the image?"
TEXTS = ["Hello world, the man said 12345 héllo  two   spaces\ttab", "USER: What is in the picture? ASSISTANT:",
         "\n\nnew lines\n", "日本 ok. Café!", "USER: <image>\nDescribe it.</s> ASSISTANT:", "<s>the cat<pad>"]


# ---- llama.cpp plumbing -----------------------------------------------------------------------------------------




def load_llamacpp(llama_cpp, path, n_ctx: int = 512):
    return llama_cpp.Llama(str(path), n_ctx=n_ctx, n_batch=512, n_threads=2, logits_all=True, type_k=0, type_v=0,
                           flash_attn=False, verbose=False)


def llamacpp_greedy(llm, logits: np.ndarray, n: int) -> list[int]:
    """Greedy tokens from `logits` (of the last evaluated position) on, stopping before EOS (as we do)."""
    out: list[int] = []
    for _ in range(n):
        tok = int(np.argmax(logits))
        if tok == llm.token_eos():
            break
        out.append(tok)
        llm.eval([tok])
        logits = np.asarray(llm.scores[llm.n_tokens - 1])
    return out


_QUIET = None


def mtmd_run(llama_cpp, text_path, mmproj_path, image_path, prompt: str, n_new: int, n_ctx: int = 2048):
    """llama.cpp's mtmd on one image: (layout, greedy ids). layout: per chunk, a list of text ids or the image
    chunk's token count."""
    import llama_cpp.mtmd_cpp as mtmd

    global _QUIET
    if _QUIET is None:
        _QUIET = llama_cpp.llama_log_callback(lambda level, text, user: None)
        mtmd.mtmd_helper_log_set(_QUIET, None)
        mtmd.mtmd_log_set(_QUIET, None)
    llm = load_llamacpp(llama_cpp, text_path, n_ctx)
    params = mtmd.mtmd_context_params_default()
    params.use_gpu, params.n_threads, params.warmup, params.flash_attn_type = False, 2, False, 0
    ctx = mtmd.mtmd_init_from_file(str(mmproj_path).encode(), llm._model.model, params)
    assert ctx
    img = np.asarray(load_image(image_path))
    h, w = img.shape[:2]
    bitmap = mtmd.mtmd_bitmap_init(w, h, (ctypes.c_uint8 * img.size).from_buffer_copy(img.tobytes()))
    chunks = mtmd.mtmd_input_chunks_init()
    try:
        text = prompt.encode()
        inp = mtmd.mtmd_input_text(text=text, text_len=len(text), add_special=True, parse_special=True)
        assert mtmd.mtmd_tokenize(ctx, chunks, ctypes.byref(inp), (mtmd.mtmd_bitmap_p_ctypes * 1)(bitmap), 1) == 0
        layout: list = []
        for i in range(mtmd.mtmd_input_chunks_size(chunks)):
            chunk = mtmd.mtmd_input_chunks_get(chunks, i)
            if mtmd.mtmd_input_chunk_get_type(chunk) == 0:  # text
                n = ctypes.c_size_t()
                ptr = mtmd.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(n))
                layout.append([ptr[j] for j in range(n.value)])
            else:
                layout.append(int(mtmd.mtmd_input_chunk_get_n_tokens(chunk)))
        n_past = llama_cpp.llama_pos(0)
        assert mtmd.mtmd_helper_eval_chunks(ctx, llm._ctx.ctx, chunks, 0, 0, 512, True, ctypes.byref(n_past)) == 0
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1), shape=(llm.n_vocab(),)).copy()
        llm.n_tokens = n_past.value
        return layout, llamacpp_greedy(llm, logits, n_new)
    finally:
        mtmd.mtmd_input_chunks_free(chunks)
        mtmd.mtmd_bitmap_free(bitmap)
        mtmd.mtmd_free(ctx)


def our_layout(tokens: list[int], chunk: int | None = None) -> list:
    """Our prompt ids in mtmd's chunk form: text runs as id lists, image runs as token counts (split into
    `chunk`-sized pieces when given: llama.cpp's 1.6 path makes each tile a separate 576-token image chunk)."""
    out: list = []
    for t in tokens:
        if t == IMAGE_PLACEHOLDER:
            if out and isinstance(out[-1], int) and (chunk is None or out[-1] < chunk):
                out[-1] += 1
            else:
                out.append(1)
        elif out and isinstance(out[-1], list):
            out[-1].append(t)
        else:
            out.append([t])
    return out


# ---- 1. our converted files in llama.cpp ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def converted(hf_llava15_dir, hf_llava16_dir, tmp_path_factory):  # noqa: F811
    root = tmp_path_factory.mktemp("lcpp_conv")
    return {"15": convert(hf_llava15_dir, root / "15", "f32", progress=False),
            "16": convert(hf_llava16_dir, root / "16", "f32", progress=False)}


@pytest.fixture(scope="module")
def bpe_text(hf_llava15_bpe_dir, tmp_path_factory):  # noqa: F811
    return write_language_model(hf_llava15_bpe_dir, tmp_path_factory.mktemp("lcpp_bpe") / "bpe.gguf", "f32")


@pytest.fixture(scope="module")
def tiny15(converted):
    mmproj, text = converted["15"]
    return llava_jax.load(text, mmproj=mmproj, dtype="f32", clip_compat="llama.cpp")


@pytest.mark.parametrize("vocab", ["spm", "bpe"])
def test_tokenization_matches_llamacpp(vocab, llama_cpp_mod, converted, bpe_text):
    path = converted["15"][1] if vocab == "spm" else bpe_text
    ours = llava_jax.load(path, dtype="f32").tokenizer
    theirs = load_llamacpp(llama_cpp_mod, path, n_ctx=64)
    texts = [*TEXTS, " leading space", "it's 1234567 ok", "<|begin_of_text|>hi<|eot_id|>"]
    for text in texts:
        for add_bos in (False, True):
            for special in (False, True):
                want = theirs.tokenize(text.encode(), add_bos=add_bos, special=special)
                assert ours.encode(text, add_bos=add_bos, parse_special=special) == want, (text, add_bos, special)


@pytest.mark.parametrize("prompt", ["USER: what color is the dog? ASSISTANT:", "Hello world, the man said"])
def test_greedy_text_matches_llamacpp(prompt, llama_cpp_mod, converted, tiny15):
    theirs = load_llamacpp(llama_cpp_mod, converted["15"][1])
    ids = theirs.tokenize(prompt.encode(), add_bos=True, special=True)
    theirs.eval(ids)
    want = llamacpp_greedy(theirs, np.asarray(theirs.scores[len(ids) - 1]), 16)
    res = tiny15.generate(prompt, temperature=0, max_new_tokens=16)
    assert res.prompt_ids == ids
    print(f"{prompt!r}: {res.token_ids}")
    assert res.token_ids == want and len(want) >= 8


@pytest.mark.parametrize("kind", ["15", "16"])
def test_mtmd_greedy_matches_compat_mode(kind, llama_cpp_mod, converted, tiny15, shared_reference):
    """An image prompt through llama.cpp's mtmd with our converted mmproj vs our llama.cpp-compat mode."""
    mmproj, text = converted[kind]
    llm = tiny15 if kind == "15" else llava_jax.load(text, mmproj=mmproj, dtype="f32", clip_compat="llama.cpp")
    image = shared_reference / "mm" / "images" / "shapes_400x300.png"
    layout, want = mtmd_run(llama_cpp_mod, text, mmproj, image, MM_PROMPT, 16)
    res = llm.generate(MM_PROMPT, [load_image(image)], temperature=0, max_new_tokens=16)
    assert our_layout(res.prompt_ids, chunk=576 if kind == "16" else None) == layout
    print(f"llava{kind} mtmd layout {[c if isinstance(c, int) else len(c) for c in layout]}: {res.token_ids}")
    assert res.token_ids == want and len(want) >= 8


# ---- 2. compat mode vs the shared llama.cpp references ----------------------------------------------------------


def next_logits(llm, tokens: list[int], image_embeds: np.ndarray | None) -> np.ndarray:
    """f32 [vocab]: our logits after `tokens` (image rows merged at the -1 slots), teacher-forced."""
    return llm.logits(tokens, image_embeds=() if image_embeds is None else [image_embeds])[-1]


def margin(logits: np.ndarray) -> float:
    top2 = np.sort(logits)[-2:]
    return float(top2[1] - top2[0])


@pytest.fixture(scope="module")
def smollm2_mm(smollm2_path, shared_reference):
    """kind → the embedded SmolLM2 (f32) with the reference tiny mmproj in llama.cpp-compat mode; one text engine."""
    mm = shared_reference / "mm"
    base = llava_jax.load(smollm2_path, mmproj=mm / "mmproj-llava15-tiny-f32.gguf", dtype="f32",
                          clip_compat="llama.cpp", scan_layers=True)
    llava16 = copy.copy(base)  # shares the engine (params and compiled programs)
    llava16.image_encoder = ImageEncoder.from_gguf(mm / "mmproj-llava16-tiny-f32.gguf", compat="llama.cpp",
                                                   text_dim=base.cfg.dim)
    return {"llava15": base, "llava16": llava16}


@pytest.fixture(scope="module")
def reference_run(smollm2_mm, shared_reference):
    """(kind, image) → (reference json, our GenerationResult, divergence); divergence is None, or (k, our top-1
    minus top-2 logit, our top-1 minus our logit of llama.cpp's token) at the first differing token k. Each pair
    runs once, when first asked for (so `-k llava15` runs only those)."""
    mm = shared_reference / "mm"
    cache: dict = {}

    def run(kind: str, name: str):
        if (kind, name) in cache:
            return cache[kind, name]
        llm = smollm2_mm[kind]
        ref = json.loads((mm / "llama.cpp" / f"mmproj-{kind}-tiny-f32__{name}.json").read_text())
        assert ref["prompt_text"] == MM_PROMPT
        image = load_image(mm / "images" / f"{name}.png")
        res = llm.generate(MM_PROMPT, [image], temperature=0, max_new_tokens=len(ref["gen_ids"]), template="raw")
        diverge = None
        if res.token_ids != ref["gen_ids"]:
            k = next((i for i, (a, b) in enumerate(zip(res.token_ids, ref["gen_ids"], strict=False)) if a != b),
                     min(len(res.token_ids), len(ref["gen_ids"])))
            request = llm.build_request(MM_PROMPT, [image], "raw")
            logits = next_logits(llm, request.tokens + res.token_ids[:k], request.image_embeds)
            gap = float(logits.max() - logits[ref["gen_ids"][k]]) if k < len(ref["gen_ids"]) else float("inf")
            diverge = (k, margin(logits), gap)
        t = res.timings
        print(f"{kind} {name}: {t.prompt_tokens} prompt tokens, prefill {t.prompt_s:.1f}s, decode {t.generate_s:.1f}s, "
              f"compile {t.compile_s:.1f}s, equal={res.token_ids == ref['gen_ids']}")
        cache[kind, name] = ref, res, diverge
        return cache[kind, name]

    return run


@pytest.mark.parametrize("kind", ["llava15", "llava16"])
@pytest.mark.parametrize("name", REF_IMAGES)
def test_reference_chunk_layout(kind, name, reference_run):
    """Token counts and the text chunk's ids equal llama.cpp's; image rows come first (no BOS: SmolLM2's
    add_bos_token is false), one 576-token chunk per tile/overview."""
    ref, res, _ = reference_run(kind, name)
    n_image = sum(t == IMAGE_PLACEHOLDER for t in res.prompt_ids)
    assert n_image == ref["n_image_tokens"] == sum(c["n_tokens"] for c in ref["chunks"] if c["type"] == "image")
    want = [c["n_tokens"] if c["type"] == "image" else c["tokens"] for c in ref["chunks"]]
    assert our_layout(res.prompt_ids, chunk=576) == want
    assert len(res.prompt_ids) == ref["n_past_after_prompt"]


def test_reference_greedy_answers(reference_run):
    """All 8 greedy 24-token answers equal llama.cpp's (as measured); a difference fails with its logit margins."""
    runs = {(kind, name): reference_run(kind, name) for kind in ("llava15", "llava16") for name in REF_IMAGES}
    equal, lines = 0, []
    for (kind, name), (ref, res, diverge) in sorted(runs.items()):
        if res.token_ids == ref["gen_ids"]:
            equal += 1
            lines.append(f"  {kind} {name}: equal ({len(ref['gen_ids'])} tokens)")
        else:
            k, m, gap = diverge
            lines.append(f"  {kind} {name}: differs at token {k}: our top-1 - top-2 margin {m:.4f}, "
                         f"our top-1 - llama.cpp's token {gap:.4f}")
    report = f"greedy answers equal to llama.cpp on {equal} of {len(runs)} pairs\n" + "\n".join(lines)
    print(report)
    assert equal == len(runs) == 8, report


def test_reference_first_step_logits(smollm2_mm, reference_run, shared_reference):
    """Our logits after the prompt vs llama.cpp's first-step top-5 (ids and values), one 1.5 pair: the image
    embeddings differ by up to ~2e-3 (llama.cpp's fp16 GELU tables), so the logits agree to ~1e-2, not 1e-4.
    Also checks `next_logits` (the divergence-margin helper) against the generated first token."""
    mm = shared_reference / "mm"
    ref, res, _ = reference_run("llava15", "shapes_200x150")
    llm = smollm2_mm["llava15"]
    request = llm.build_request(MM_PROMPT, [load_image(mm / "images" / "shapes_200x150.png")], "raw")
    logits = next_logits(llm, request.tokens, request.image_embeds)
    assert int(np.argmax(logits)) == res.token_ids[0]
    ids = [i for i, _ in ref["first_step_top5"]]
    want = np.array([v for _, v in ref["first_step_top5"]])
    diff = np.abs(logits[ids] - want).max()
    print(f"first-step top-5 logits vs llama.cpp: max diff {diff:.2e}, our margin {margin(logits):.3f}")
    assert list(np.argsort(-logits)[:5]) == ids
    assert diff < 0.05
