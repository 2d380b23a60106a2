"""Whole-model parity with HF transformers (issues 3 and 4): tiny random `LlavaForConditionalGeneration` /
`LlavaNextForConditionalGeneration` → `convert(..., outtype="f32")` → `llava_jax.load(text, mmproj=...)`, and the
logits at every position equal HF's within 1e-4 (f32, LLaVA's own image semantics).

- text only: `Llava.logits(ids)` vs HF's logits for the same ids;
- image prompts: HF's processor builds the sequence (each `<image>` expanded to that image's token count); our
  sequence is the same ids with IMAGE_PLACEHOLDER (-1) where HF has the image token, the rows come from our
  image encoder (`build_request`), and our decoder (`Llava.logits`, all positions) runs on them.
  1.5 with one image; 1.6 with two images of different sizes (landscape 500×300 and a small portrait 200×330)
  in one prompt;
- the original LLaVA layout (`LlavaLlamaForCausalLM` + `--clip` directory) converts to a model with the same logits.

Measured (f32, XLA:CPU): max |Δlogit| ≈ 1.5e-6 (text), ≈ 6e-6 (image prompts, 609 and 2534 positions), logits
of magnitude ~5. The 1e-4 bound of the issue leaves ~15x room; a wrong norm epsilon, RoPE pairing, GELU variant,
unpad or newline placement moves logits by O(0.1-1).

One documented difference (not a parity failure, the test pins it): `build_request` tokenizes each text piece
separately, as llama.cpp's mtmd and the original LLaVA (`tokenizer_image_token` with a legacy SentencePiece
tokenizer) do, so the text after an image starts with SentencePiece's dummy-prefix "▁"; HF's processor
(`legacy=False`) does not add it. The parity tests therefore feed HF's own ids to both models.
"""

from __future__ import annotations

import numpy as np
import pytest
from hf_fixtures import *  # noqa: F403  (session fixtures: hf_llava15_dir, hf_llava16_dir, orig_* ...)
from hf_fixtures import IMAGE_TOKEN_ID
from PIL import Image

import llava_jax
from llava_jax.convert import convert
from llava_jax.generate import IMAGE_PLACEHOLDER

pytestmark = pytest.mark.slow

LOGIT_TOL = 1e-4
TEXT_IDS = [1, 322, 344, 356, 355, 350, 324, 13, 372, 329, 272, 269, 332, 269, 331, 285]
PROMPTS = {
    "15": "USER: <image>\nWhat is in the picture? ASSISTANT:",
    "16": "USER: <image>\nand <image>\nWhat is the difference? ASSISTANT:",
}


def random_image(w: int, h: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


IMAGES = {"15": [random_image(400, 300, 1)], "16": [random_image(500, 300, 2), random_image(200, 330, 3)]}


def full_logits(llm, tokens: list[int], image_embeds: np.ndarray | None) -> np.ndarray:
    """f32 [len(tokens), vocab]: our decoder's logits at every position, image rows merged at the -1 slots."""
    return llm.logits(tokens, image_embeds=() if image_embeds is None else [image_embeds])


class HFCase:
    """A tiny HF model, its processor, and the converted llava_jax model."""

    def __init__(self, kind: str, hf_dir, outdir):
        from transformers import (
            AutoTokenizer,
            LlavaForConditionalGeneration,
            LlavaNextForConditionalGeneration,
            LlavaNextProcessor,
            LlavaProcessor,
        )
        from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil
        from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

        self.kind = kind
        mmproj, text = convert(hf_dir, outdir, "f32", progress=False)
        self.llm = llava_jax.load(text, mmproj=mmproj, dtype="f32")
        if kind == "15":
            proc_cls, img_cls, model_cls = LlavaProcessor, LlavaImageProcessorPil, LlavaForConditionalGeneration
        else:
            proc_cls, img_cls, model_cls = LlavaNextProcessor, LlavaNextImageProcessorPil, LlavaNextForConditionalGeneration
        self.processor = proc_cls(image_processor=img_cls.from_pretrained(hf_dir),
                                  tokenizer=AutoTokenizer.from_pretrained(hf_dir), patch_size=14,
                                  vision_feature_select_strategy="default", num_additional_image_tokens=1)
        self.model = model_cls.from_pretrained(hf_dir).eval()

    def hf_logits(self, **inputs) -> np.ndarray:
        import torch

        with torch.no_grad():
            return self.model(**inputs).logits[0].numpy()

    def image_prompt(self):
        """(HF's ids, HF logits, our request) for this kind's image prompt."""
        inputs = self.processor(text=PROMPTS[self.kind], images=IMAGES[self.kind], return_tensors="pt")
        ids = inputs["input_ids"][0].tolist()
        return ids, self.hf_logits(**inputs), self.llm.build_request(PROMPTS[self.kind], IMAGES[self.kind])


@pytest.fixture(scope="module")
def case15(hf_llava15_dir, tmp_path_factory):  # noqa: F811
    return HFCase("15", hf_llava15_dir, tmp_path_factory.mktemp("parity15"))


@pytest.fixture(scope="module")
def case16(hf_llava16_dir, tmp_path_factory):  # noqa: F811
    return HFCase("16", hf_llava16_dir, tmp_path_factory.mktemp("parity16"))


@pytest.fixture(scope="module")
def image_results(case15, case16):
    """kind → (HF ids, HF logits, our request, our logits on HF's ids with our image rows)."""
    out = {}
    for case in (case15, case16):
        ids, hf, request = case.image_prompt()
        ours = full_logits(case.llm, [IMAGE_PLACEHOLDER if i == IMAGE_TOKEN_ID else i for i in ids], request.image_embeds)
        out[case.kind] = ids, hf, request, ours
    return out


@pytest.mark.parametrize("kind", ["15", "16"])
def test_text_only_logits(kind, case15, case16):
    case = case15 if kind == "15" else case16
    import torch

    ours = case.llm.logits(TEXT_IDS)
    hf = case.hf_logits(input_ids=torch.tensor([TEXT_IDS]))
    diff = np.abs(ours - hf).max()
    print(f"llava{kind} text-only: max |dlogit| = {diff:.2e} (|logit| max {np.abs(hf).max():.2f})")
    assert ours.shape == hf.shape and diff <= LOGIT_TOL


def test_text_tokenization_matches_hf(case15):
    tok = case15.processor.tokenizer
    for text in ["USER: What is in the picture? ASSISTANT:", "the cat 1234 and\nthe dog.", "Describe the image!"]:
        assert case15.llm.tokenize(text) == tok(text).input_ids, text


@pytest.mark.parametrize("kind", ["15", "16"])
def test_image_prompt_logits(kind, image_results):
    ids, hf, request, ours = image_results[kind]
    n_image = sum(i == IMAGE_TOKEN_ID for i in ids)
    assert n_image == len(request.image_embeds)  # HF's token count for these image sizes equals ours
    diff = np.abs(ours - hf).max()
    print(f"llava{kind} image prompt ({len(ids)} positions, {n_image} image tokens): max |dlogit| = {diff:.2e}")
    assert ours.shape == hf.shape and diff <= LOGIT_TOL


def test_llava16_image_token_counts(case16):
    """Per image, our encoder's token count equals the number of image tokens HF's processor puts in."""
    for img in IMAGES["16"]:
        ids = case16.processor(text="<image>", images=[img], return_tensors="pt")["input_ids"][0].tolist()
        assert case16.llm.image_encoder.n_tokens(img.size) == sum(i == IMAGE_TOKEN_ID for i in ids), img.size


@pytest.mark.parametrize("kind", ["15", "16"])
def test_build_request_layout_vs_hf(kind, image_results, case15):
    """Our prompt = HF's ids, the image runs at the same places, plus the "▁" that mtmd-style per-piece
    tokenization puts at the start of each text piece that follows an image (see the module docstring)."""
    ids, _, request, _ = image_results[kind]
    space = case15.llm.tokenize(" ", add_bos=False)[-1]  # SentencePiece's lone "▁"
    expected = []
    for i, t in enumerate(ids):
        expected.append(IMAGE_PLACEHOLDER if t == IMAGE_TOKEN_ID else t)
        if t == IMAGE_TOKEN_ID and (i + 1 == len(ids) or ids[i + 1] != IMAGE_TOKEN_ID):
            expected.append(space)
    assert request.tokens == expected


@pytest.mark.parametrize("kind", ["15", "16"])
def test_original_layout_gives_same_logits(kind, orig_llava15_dirs, orig_llava16_dirs, hf_llava15_dir,  # noqa: F811
                                           hf_llava16_dir, image_results, tmp_path):
    """An original-LLaVA-layout checkpoint (+ --clip directory) converts to the same model: same logits as HF."""
    model_dir, clip_dir = orig_llava15_dirs if kind == "15" else orig_llava16_dirs
    mmproj, text = convert(model_dir, tmp_path, "f32", clip_dir=clip_dir, progress=False)
    llm = llava_jax.load(text, mmproj=mmproj, dtype="f32")
    ids, hf, request, ours_hf_layout = image_results[kind]
    embeds = llm.build_request(PROMPTS[kind], IMAGES[kind]).image_embeds
    ours = full_logits(llm, [IMAGE_PLACEHOLDER if i == IMAGE_TOKEN_ID else i for i in ids], embeds)
    diff, vs_converted = np.abs(ours - hf).max(), np.abs(ours - ours_hf_layout).max()
    print(f"llava{kind} original layout: max |dlogit| vs HF = {diff:.2e}, vs the llava-hf conversion = {vs_converted:.2e}")
    assert diff <= LOGIT_TOL and vs_converted <= 1e-5
