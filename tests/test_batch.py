"""Batched generation equals per-row generation: `Llava.generate_batch` over a ragged batch gives, row for
row, exactly the greedy token ids (and text, stop reason) of `Llava.generate` on that row alone.

The real SmolLM2 with small random mmproj files written here in the real layouts: a LLaVA-1.5-style one
(one 112-px tile, always 64 image tokens) and a LLaVA-1.6-style one (anyres tiling over a 56-px base
with pinpoints scaled from LLaVA's, spatial_unpad + image newline: the token count depends on the image
size). Small towers keep the prompts short enough for CPU; the code paths (tiling, unpadding, batched
ViT, placeholder merge, left padding, per-row positions / masks / limits) are the ones real files take.

Rows mix text only, one image and two images of different sizes, a prompt with an explicit `<image>`
marker, and prompt lengths that differ by hundreds of tokens, so each row's left padding inside the
batch differs from its padding alone (its own, smaller bucket). The mixed-row tests load the model with
scanned layers (the GPU/TPU layout, stacked KV cache; it compiles ~5x faster on CPU); a smaller test runs
the CPU default (unrolled layers, per-layer KV cache) on the model shared with the other test modules.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
from smollm2_model import shared_smollm2
from tiny_mmproj import drawing, tiny_spec

import llava_jax
from llava_jax.generate import IMAGE_PLACEHOLDER, bucket
from llava_jax.random_mmproj import write_random_mmproj
from llava_jax.vision import ImageEncoder

pytestmark = pytest.mark.slow

MAX_NEW = 10
LONG_TEXT = ("The lighthouse keeper climbed the spiral stairs every evening at dusk, carrying a small brass lamp, "
             "a notebook full of tide tables and a thermos of strong black tea. Tonight the sea was restless. "
             "Summarise the keeper's evening routine in one sentence:")


@pytest.fixture(scope="module")
def models(tmp_path_factory, smollm2_path):
    """(LLaVA-1.6-style model, LLaVA-1.5-style model): one SmolLM2 engine (shared compiled programs), two encoders."""
    d = tmp_path_factory.mktemp("mmproj")
    p16 = write_random_mmproj(d / "tiny16.gguf", tiny_spec(56, True, seed=1))
    p15 = write_random_mmproj(d / "tiny15.gguf", tiny_spec(112, False, seed=2))
    llm16 = llava_jax.load(smollm2_path, mmproj=p16, scan_layers=True)
    llm15 = copy.copy(llm16)
    llm15.image_encoder = ImageEncoder.from_gguf(p15, mesh=llm16.engine.mesh, text_dim=llm16.cfg.dim)
    return llm16, llm15


def n_image_tokens(llm, prompt, images) -> int:
    return sum(t == IMAGE_PLACEHOLDER for t in llm.build_request(prompt, images).tokens) if images else 0


def check_batch_equals_rows(llm, rows, limits):
    prompts = [p for p, _ in rows]
    images = [imgs for _, imgs in rows]
    batched = llm.generate_batch(prompts, images, max_new_tokens=limits, temperature=0)
    lengths = [len(r.prompt_ids) for r in batched]
    assert len(set(bucket(n) for n in lengths)) >= 3, lengths  # rows alone use different buckets than the batch
    for i, ((prompt, imgs), limit, res) in enumerate(zip(rows, limits, batched, strict=True)):
        alone = llm.generate(prompt, imgs, max_new_tokens=limit, temperature=0)
        assert res.prompt_ids == alone.prompt_ids, i
        assert res.token_ids == alone.token_ids, (i, res.token_ids, alone.token_ids)
        assert res.text == alone.text and res.stop_reason == alone.stop_reason, i
        assert len(res.token_ids) == limit or res.stop_reason == "eos", i
    return batched


def test_llava16_style_rows(models):
    llm16, _ = models
    sizes = {"small": (40, 30), "wide": (300, 90), "tall": (60, 200), "square": (100, 100), "strip": (150, 40)}
    img = {k: drawing(w, h, seed=i) for i, (k, (w, h)) in enumerate(sizes.items())}
    counts = {k: llm16.image_encoder.n_tokens(im.size) for k, im in img.items()}
    assert len(set(counts.values())) >= 4, counts  # anyres: the token count follows the image size
    rows = [
        ("Hi!", []),
        (LONG_TEXT, []),
        ("What is in the image?", [img["small"]]),
        ("Describe the colours and the shapes you can see in this picture, one by one, from left to right.",
         [img["wide"]]),
        ("Which of the two pictures is taller?", [img["tall"], img["square"]]),
        ("<image>\nThe first words that come to mind:", [img["strip"]]),
    ]
    batched = check_batch_equals_rows(llm16, rows, [MAX_NEW] * len(rows))
    assert [n_image_tokens(llm16, p, i) for p, i in rows] == [0, 0, counts["small"], counts["wide"],
                                                             counts["tall"] + counts["square"], counts["strip"]]
    assert len({tuple(r.token_ids) for r in batched}) == len(rows)  # rows really differ


def test_llava15_style_rows_and_per_row_limits(models):
    _, llm15 = models
    img = [drawing(w, h, seed=10 + i) for i, (w, h) in enumerate([(200, 150), (40, 30), (300, 300), (90, 160)])]
    assert {llm15.image_encoder.n_tokens(im.size) for im in img} == {64}  # 1.5: one tile, fixed count
    rows = [
        ("Tell me a short story about a robot who learns to paint, in two sentences.", []),
        ("What colour is the square?", [img[0]]),
        (LONG_TEXT + " And what does the picture show?", [img[1]]),
        ("Compare these two images.", [img[2], img[3]]),
        ("Ok", []),
    ]
    check_batch_equals_rows(llm15, rows, [MAX_NEW, 3, MAX_NEW, 7, 1])  # per-row limits in one batch


def test_batched_vision_equals_one_image_at_a_time(models):
    """All tiles of all images through the ViT in one call = each image alone."""
    llm16, llm15 = models
    imgs = [drawing(w, h, seed=20 + i) for i, (w, h) in enumerate([(40, 30), (300, 90), (60, 200), (100, 100)])]
    for llm in (llm16, llm15):
        together = llm.embed_images(imgs)
        for im, emb in zip(imgs, together, strict=True):
            alone = llm.embed_image(im)
            assert emb.shape == alone.shape == (llm.image_encoder.n_tokens(im.size), 576)
            np.testing.assert_allclose(emb, alone, rtol=0, atol=1e-5)


def test_default_cpu_layout(models):
    """The same property with unrolled layers (the CPU default, its own KV-cache layout): text + one image."""
    llm = copy.copy(shared_smollm2())
    assert llm.engine.model.scan_layers is False
    llm.image_encoder = models[1].image_encoder  # the 1.5-style encoder: 64 image tokens
    rows = [("Hi!", []), (LONG_TEXT, []), ("What colour is the square?", [drawing(200, 150, seed=30)])]
    check_batch_equals_rows(llm, rows, [MAX_NEW] * len(rows))
