"""Multimodal prompts through the API and `python -m llava_jax.run` (issue 3, "Several images in one prompt",
"each template renders as documented", "Bad input").

- Several images placed by `<image>` markers: the k-th image's rows land at the k-th marker (distinct
  embeddings, checked through the decoder's merge), run lengths = each image's own token count.
- Each chat template, rendered through `build_request` and decoded back, is the documented text.
- Bad input through the CLI (subprocesses): one stderr line starting `error:`, non-zero exit, no traceback.
- `--default-mmproj --image shapes.png` runs the whole multimodal path on the embedded default and logs
  `image embedding created: N tokens`.

Tiny converted LLaVA models (tests/hf_fixtures.py) keep the subprocesses at a few seconds each.
"""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from hf_fixtures import *  # noqa: F403  (session fixtures: hf_llava15_dir, hf_llava16_dir)
from PIL import Image

import llava_jax
from llava_jax.convert import convert
from llava_jax.errors import LlavaError
from llava_jax.generate import IMAGE_PLACEHOLDER
from llava_jax.random_mmproj import RandomMMProjSpec, write_random_mmproj
from llava_jax.text import merge_image_embeddings

REPO = Path(__file__).resolve().parents[1]
SHAPES = REPO / "llava_jax" / "assets" / "shapes.png"
VICUNA_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives "
                 "helpful, detailed, and polite answers to the human's questions.")
LLAMA3_SYSTEM = ("You are a helpful language and vision assistant. You are able to understand the visual content "
                 "that the user provides, and assist the user with a variety of tasks using natural language.")
# Documented renderings (llava_jax/prompts.py docstrings) for two images and the text T; "<I>" marks an image.
DOCUMENTED = {
    "vicuna": f"{VICUNA_SYSTEM} USER: <I>\n<I>\nT ASSISTANT:",
    "llava-cli": f"{VICUNA_SYSTEM}\nUSER:<I><I>T\nASSISTANT:",
    "mistral": "[INST] <I>\n<I>\nT [/INST]",
    "chatml": "<|im_start|>system\nAnswer the questions.<|im_end|>\n<|im_start|>user\n<I>\n<I>\nT<|im_end|>\n"
              "<|im_start|>assistant\n",
    "llama3": f"<|start_header_id|>system<|end_header_id|>\n\n{LLAMA3_SYSTEM}<|eot_id|>"
              "<|start_header_id|>user<|end_header_id|>\n\n<I>\n<I>\nT<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "raw": "<I><I>T",
}
# The tiny mmproj for the bad-input cases: 56-pixel images (16 patches), projector out = the tiny model's 64.
TINY_MM = RandomMMProjSpec(image_size=56, dim=32, heads=2, ffn=64, blocks=2, proj_hidden=48, out_dim=64,
                           matmul_type="f32")


def random_image(w: int, h: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


def image_runs(tokens: list[int]) -> list[tuple[int, int]]:
    """(start, length) of each run of image placeholders."""
    runs: list[tuple[int, int]] = []
    for i, t in enumerate(tokens):
        if t == IMAGE_PLACEHOLDER:
            if runs and runs[-1][0] + runs[-1][1] == i:
                runs[-1] = (runs[-1][0], runs[-1][1] + 1)
            else:
                runs.append((i, 1))
    return runs


def render(llm, request, counts: list[int]) -> str:
    """A request's prompt as text: image k (counts[k] placeholders) as "<I>", text pieces decoded (special tokens
    as text, a leading BOS left out). Adjacent images stay apart because each takes exactly its count."""
    tokens = list(request.tokens)
    if tokens and tokens[0] == llm.tokenizer.bos_id and llm.tokenizer.add_bos:
        tokens = tokens[1:]
    out, piece, i, k = [], [], 0, 0
    while i < len(tokens):
        if tokens[i] == IMAGE_PLACEHOLDER:
            assert tokens[i:i + counts[k]] == [IMAGE_PLACEHOLDER] * counts[k]
            if piece:
                out.append(llm.tokenizer.decode(piece, special=True))
                piece = []
            out.append("<I>")
            i, k = i + counts[k], k + 1
        else:
            piece.append(tokens[i])
            i += 1
    if piece:
        out.append(llm.tokenizer.decode(piece, special=True))
    assert k == len(counts)
    return "".join(out)


@pytest.fixture(scope="module")
def tiny(hf_llava15_dir, hf_llava16_dir, tmp_path_factory):  # noqa: F811
    """kind → (mmproj path, text path) of the tiny converted models (f32)."""
    root = tmp_path_factory.mktemp("cli_conv")
    return {"15": convert(hf_llava15_dir, root / "15", "f32", progress=False),
            "16": convert(hf_llava16_dir, root / "16", "f32", progress=False)}


@pytest.fixture(scope="module")
def tiny16(tiny):
    mmproj, text = tiny["16"]
    return llava_jax.load(text, mmproj=mmproj, dtype="f32")


@pytest.fixture(scope="module")
def smollm2_text(smollm2_path):
    """The embedded SmolLM2 for prompt rendering only (ChatML special tokens; no vision, nothing compiled)."""
    return llava_jax.load(smollm2_path, dtype="f32")


# ---- several images ---------------------------------------------------------------------------------------------


def test_images_land_at_their_markers(tiny16):
    """Two images of different sizes: run k has image k's token count and holds image k's rows, and the
    decoder's merge puts exactly those rows at those positions."""
    images = [random_image(500, 300, 1), random_image(200, 330, 2)]
    prompt = "First: <image>, then <image> - which is larger?"
    request = tiny16.build_request(prompt, images)
    runs = image_runs(request.tokens)
    counts = [tiny16.image_encoder.n_tokens(img.size) for img in images]
    assert [n for _, n in runs] == counts and counts[0] != counts[1]
    separate = [tiny16.embed_image(img) for img in images]
    np.testing.assert_allclose(request.image_embeds, np.concatenate(separate), atol=1e-5)
    # the text between the markers is where the prompt puts it
    assert render(tiny16, request, counts) == "First: <I>, then <I> - which is larger?"

    # distinct rows (row r of image k = k*1000 + r) through the decoder's merge
    dim = tiny16.cfg.dim
    fake = [np.full((n, dim), 1000.0 * k, np.float32) + np.arange(n, dtype=np.float32)[:, None]
            for k, n in enumerate(counts)]
    req = tiny16.request_from_embeds(prompt, fake)
    tokens = np.array([req.tokens])
    x = np.zeros((1, len(req.tokens), dim), np.float32)
    merged = np.asarray(merge_image_embeddings(jnp.asarray(x), jnp.asarray(tokens < 0),
                                               jnp.asarray(req.image_embeds[None])))[0]
    for (start, n), rows in zip(image_runs(req.tokens), fake, strict=True):
        np.testing.assert_array_equal(merged[start:start + n], rows)
    assert not merged[tokens[0] >= 0].any()  # text positions untouched


def test_swapping_images_swaps_rows(tiny16):
    images = [random_image(500, 300, 1), random_image(200, 330, 2)]
    a = tiny16.build_request("<image><image>", images)
    b = tiny16.build_request("<image><image>", images[::-1])
    n0 = tiny16.image_encoder.n_tokens(images[0].size)
    np.testing.assert_allclose(a.image_embeds[:n0], b.image_embeds[-n0:], atol=1e-5)


def test_marker_count_must_match_images(tiny16):
    with pytest.raises(LlavaError, match="2 image marker"):
        tiny16.request_from_embeds("<image> and <image>", [np.zeros((3, tiny16.cfg.dim), np.float32)])


# ---- templates ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(DOCUMENTED))
def test_template_renders_as_documented(name, smollm2_text):
    dim = smollm2_text.cfg.dim
    embeds = [np.zeros((5, dim), np.float32), np.zeros((7, dim), np.float32)]
    request = smollm2_text.request_from_embeds("T", embeds, template=name)
    assert render(smollm2_text, request, [5, 7]) == DOCUMENTED[name]
    assert request.tokens.count(IMAGE_PLACEHOLDER) == 12  # render() checked each image's run


def test_template_special_tokens_are_tokens(smollm2_text):
    """ChatML markers become SmolLM2's special tokens (parsed), not text."""
    request = smollm2_text.request_from_embeds("T", [np.zeros((2, smollm2_text.cfg.dim), np.float32)],
                                               template="chatml")
    im_start = smollm2_text.tokenizer.token_to_id("<|im_start|>")
    assert im_start is not None and request.tokens.count(im_start) == 3


def test_default_template_from_metadata(smollm2_text, tiny16):
    embeds = [np.zeros((2, smollm2_text.cfg.dim), np.float32)]
    assert render(smollm2_text, smollm2_text.request_from_embeds("T", embeds), [2]).startswith("<|im_start|>system")
    # the tiny LLaVA has a vicuna-style jinja template; BOS first (add_bos), the image rows right after "USER: "
    req = tiny16.request_from_embeds("T", [np.zeros((2, tiny16.cfg.dim), np.float32)])
    assert req.tokens[0] == tiny16.tokenizer.bos_id
    assert render(tiny16, req, [2]) == f"{VICUNA_SYSTEM} USER: <I>\nT ASSISTANT:"


def test_marker_prompt_is_used_as_is(smollm2_text):
    """A prompt with markers is the whole prompt: no template, whatever template is asked for."""
    embeds = [np.zeros((2, smollm2_text.cfg.dim), np.float32)]
    for name in ("chatml", "vicuna", None):
        req = smollm2_text.request_from_embeds("<__media__>\nWhat is in the image?", embeds, template=name)
        assert render(smollm2_text, req, [2]) == "<I>\nWhat is in the image?"


# ---- the CLI: bad input ------------------------------------------------------------------------------------------


def run_cli(*args, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, "-m", "llava_jax.run", *map(str, args)], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=timeout)


@pytest.fixture(scope="module")
def bad_input_runs(tiny, tmp_path_factory):
    """case → (CompletedProcess, extra strings the message must contain); the cases run two at a time."""
    tmp = tmp_path_factory.mktemp("cli_bad")
    mm15, text15 = tiny["15"]
    mm16, text16 = tiny["16"]
    (tmp / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    random_image(400, 300, 0).save(tmp / "landscape.png")
    wide = write_random_mmproj(tmp / "width40.gguf", replace(TINY_MM, out_dim=40))
    no_key = write_random_mmproj(tmp / "nokey.gguf", replace(TINY_MM, omit=("clip.vision.patch_size",)))
    no_tensor = write_random_mmproj(tmp / "notensor.gguf", replace(TINY_MM, omit=("v.blk.1.attn_k.weight",)))
    img = tmp / "landscape.png"
    n16 = llava_jax.load(text16, mmproj=mm16, dtype="f32").prompt_length("hi", [Image.open(img)])
    cases = {
        "missing image": (["-m", text15, "--mmproj", mm15, "--image", tmp / "nope.png", "-p", "hi"],
                          ["nope.png", "not found"]),
        "unreadable image": (["-m", text15, "--mmproj", mm15, "--image", tmp / "broken.png", "-p", "hi"],
                             ["broken.png"]),
        "width mismatch": (["-m", text15, "--mmproj", wide, "--image", img, "-p", "hi"], ["40", "64"]),
        "context too small": (["-m", text16, "--mmproj", mm16, "--image", img, "-p", "hi", "-c", "600"],
                              [str(n16), "600", "-c"]),
        "missing key": (["-m", text15, "--mmproj", no_key, "--image", img, "-p", "hi"], ["clip.vision.patch_size"]),
        "missing tensor": (["-m", text15, "--mmproj", no_tensor, "--image", img, "-p", "hi"],
                           ["v.blk.1.attn_k.weight"]),
        "markers vs images": (["-m", text15, "--mmproj", mm15, "--image", img, "-p", "<image> vs <image>"],
                              ["2 image marker", "1 image"]),
        "mmproj is a language model": (["-m", text15, "--mmproj", text15, "--image", img, "-p", "hi"],
                                       ["not an mmproj"]),
    }
    with ThreadPoolExecutor(max_workers=2) as pool:
        procs = dict(zip(cases, pool.map(lambda argv: run_cli(*argv[0]), cases.values()), strict=True))
    return {name: (procs[name], cases[name][1]) for name in cases}


@pytest.mark.slow
@pytest.mark.parametrize("case", ["missing image", "unreadable image", "width mismatch", "context too small",
                                  "missing key", "missing tensor", "markers vs images", "mmproj is a language model"])
def test_bad_input_is_one_error_line(case, bad_input_runs):
    proc, needles = bad_input_runs[case]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    print(f"{case}: rc={proc.returncode} {lines}")
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and errors == lines[-1:], proc.stderr
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])


# ---- the CLI: the embedded default ------------------------------------------------------------------------------


@pytest.mark.slow
def test_default_mmproj_runs(tmp_path):
    """The README's first multimodal command on the embedded SmolLM2 + random mmproj (scanned layers: same
    function, ~5x less XLA:CPU compile time)."""
    from llava_jax.defaults import default_mmproj_path
    from llava_jax.gguf_io import open_gguf
    from llava_jax.images import image_layout
    from llava_jax.mmproj import read_vision_config

    cfg = read_vision_config(open_gguf(default_mmproj_path()))
    expected = image_layout(Image.open(SHAPES).size, cfg).n_tokens
    proc = run_cli("--default-mmproj", "--image", SHAPES, "-p", "What is in the image?", "-n", 8, "--temp", 0,
                   "--scan-layers", "on")
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert f"image embedding created: {expected} tokens" in proc.stderr
    assert "image encode time" in proc.stderr
