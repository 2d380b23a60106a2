"""Prompt building: golden renderings of every template, image markers, template choice from GGUF
metadata, and llama.cpp's escape processing."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llava_jax.errors import LlavaError
from llava_jax.prompts import (
    TEMPLATES,
    ImageSlot,
    build_prompt,
    process_escapes,
    template_from_metadata,
)

I0, I1, I2 = ImageSlot(0), ImageSlot(1), ImageSlot(2)
Q = "What is in the image?"
VICUNA_SYS = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
LLAMA3_SYS = (
    "You are a helpful language and vision assistant. You are able to understand the visual content "
    "that the user provides, and assist the user with a variety of tasks using natural language."
)

# Golden strings written out from each template's documented format.
GOLDEN_ONE_IMAGE = {
    "vicuna": [VICUNA_SYS + " USER: ", I0, "\n" + Q + " ASSISTANT:"],
    "llava-cli": [VICUNA_SYS + "\nUSER:", I0, Q + "\nASSISTANT:"],
    "mistral": ["[INST] ", I0, "\n" + Q + " [/INST]"],
    "chatml": [
        "<|im_start|>system\nAnswer the questions.<|im_end|>\n<|im_start|>user\n",
        I0,
        "\n" + Q + "<|im_end|>\n<|im_start|>assistant\n",
    ],
    "llama3": [
        "<|start_header_id|>system<|end_header_id|>\n\n" + LLAMA3_SYS + "<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n",
        I0,
        "\n" + Q + "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
    ],
    "raw": [I0, Q],
}


@pytest.mark.parametrize("name", sorted(GOLDEN_ONE_IMAGE))
def test_template_golden_one_image(name):
    assert build_prompt(Q, 1, name) == GOLDEN_ONE_IMAGE[name]


def test_templates_cover_the_required_names():
    assert {"vicuna", "mistral", "chatml", "llama3", "raw"} <= set(TEMPLATES)
    for t in TEMPLATES.values():
        assert t.doc, f"template {t.name} lacks its documented rendering"


def test_vicuna_two_images_and_no_image():
    assert build_prompt(Q, 2, "vicuna") == [VICUNA_SYS + " USER: ", I0, "\n", I1, "\n" + Q + " ASSISTANT:"]
    assert build_prompt(Q, 0, "vicuna") == [VICUNA_SYS + " USER: " + Q + " ASSISTANT:"]


def test_custom_and_empty_system():
    assert build_prompt("Hi", 1, "vicuna", system="Be brief.") == ["Be brief. USER: ", I0, "\nHi ASSISTANT:"]
    assert build_prompt("Hi", 1, "vicuna", system="") == ["USER: ", I0, "\nHi ASSISTANT:"]
    assert build_prompt("Hi", 1, "mistral", system="Be brief.") == [
        "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\n",
        I0,
        "\nHi [/INST]",
    ]
    assert build_prompt("Hi", 0, "chatml", system="") == ["<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"]
    assert build_prompt("Hi", 0, "llama3", system="S") == [
        "<|start_header_id|>system<|end_header_id|>\n\nS<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n"
        "Hi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    ]


def test_no_template_adds_bos():
    for name in TEMPLATES:
        first = build_prompt("x", 0, name)[0]
        assert not first.startswith(("<s>", "<|begin_of_text|>", "<|startoftext|>"))


# ---------------------------------------------------------------- image markers


def test_markers_fill_slots_in_order_and_ignore_the_template():
    text = "<|im_start|>user\n<image>first<image>\nthen <image><|im_end|>"
    assert build_prompt(text, 3, "vicuna", system="ignored") == [
        "<|im_start|>user\n",
        I0,
        "first",
        I1,
        "\nthen ",
        I2,
        "<|im_end|>",
    ]


def test_adjacent_markers_and_mtmd_marker():
    assert build_prompt("<image><image>", 2, "chatml") == [I0, I1]
    # llama.cpp's mtmd marker, as in the shared reference prompt
    assert build_prompt("<__media__>\nWhat is in the image?", 1, "vicuna") == [I0, "\nWhat is in the image?"]


@pytest.mark.parametrize("text, n_images", [("<image> a", 0), ("<image> a <image>", 1), ("a <image>", 2)])
def test_marker_count_mismatch_raises(text, n_images):
    with pytest.raises(LlavaError) as err:
        build_prompt(text, n_images, "vicuna")
    msg = str(err.value)
    assert "\n" not in msg
    assert f"{text.count('<image>')} image marker" in msg and f"{n_images} image" in msg


def test_unknown_template_raises():
    with pytest.raises(LlavaError, match="unknown chat template 'nope'"):
        build_prompt("hi", 0, "nope")


@settings(max_examples=60, deadline=None)
@given(
    pieces=st.lists(st.text(alphabet=st.characters(blacklist_characters="<>"), max_size=8), min_size=1, max_size=5),
)
def test_marker_split_round_trips(pieces):
    text = "<image>".join(pieces)
    segs = build_prompt(text, len(pieces) - 1, "raw")
    rebuilt = "".join(s if isinstance(s, str) else "<image>" for s in segs)
    assert rebuilt == text
    assert [s.index for s in segs if isinstance(s, ImageSlot)] == list(range(len(pieces) - 1))
    assert all(s for s in segs if isinstance(s, str))  # no empty strings
    assert not any(isinstance(a, str) and isinstance(b, str) for a, b in zip(segs, segs[1:], strict=False))


# ---------------------------------------------------------------- template from metadata

SMOLLM2_JINJA = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
MISTRAL_JINJA = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ message['content'] + eos_token}}{% endif %}{% endfor %}"
)
LLAMA3_JINJA = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
VICUNA_JINJA = (
    "{% for message in messages %}{% if message['role'] == 'user' %}{{ 'USER: ' + message['content'] + ' ' }}"
    "{% else %}{{ 'ASSISTANT: ' + message['content'] + eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


@pytest.mark.parametrize(
    "metadata, want",
    [
        ({"tokenizer.chat_template": SMOLLM2_JINJA, "general.name": "Smollm2 135M 8k Lc100K Mix1 Ep2"}, "chatml"),
        ({"tokenizer.chat_template": MISTRAL_JINJA}, "mistral"),
        ({"tokenizer.chat_template": LLAMA3_JINJA, "general.name": "whatever"}, "llama3"),
        ({"tokenizer.chat_template": VICUNA_JINJA}, "vicuna"),
        ({"general.name": "llava-v1.6-mistral-7b"}, "mistral"),
        ({"general.name": "llava-v1.6-34b"}, "chatml"),
        ({"general.name": "llama3-llava-next-8b"}, "llama3"),
        ({"general.name": "LLaMA v2", "general.basename": "llava-v1.5-7b"}, "vicuna"),
        ({}, "vicuna"),
    ],
)
def test_template_from_metadata(metadata, want):
    assert template_from_metadata(metadata) == want


def test_template_from_real_smollm2_file(smollm2_path):
    from llava_jax.gguf_io import open_gguf

    assert template_from_metadata(open_gguf(smollm2_path).metadata) == "chatml"


# ---------------------------------------------------------------- escapes


@pytest.mark.parametrize(
    "raw, want",
    [
        (r"a\nb", "a\nb"),
        (r"\r\t\'\"\\", "\r\t'\"\\"),
        (r"\x41\x7a", "Az"),
        (r"\xc3\xa9", "é"),  # bytes, decoded as UTF-8
        (r"\x4", r"\x4"),  # needs two characters after \x
        (r"\xg1", r"\xg1"),  # not hex: kept
        (r"\x-1", "\ufffd"),  # strtol("-1") = -1 → byte 0xFF, not UTF-8 on its own
        (r"\x 9", "\t"),  # strtol skips leading space
        (r"\a\b\f\v\?", r"\a\b\f\v\?"),  # llama.cpp does not handle C's other escapes
        (r"\q", r"\q"),
        ("tail\\", "tail\\"),  # trailing backslash kept
        (r"\\n", "\\n"),  # escaped backslash, then a plain n
        ("é\\n", "é\n"),
        ("", ""),
    ],
)
def test_process_escapes(raw, want):
    assert process_escapes(raw) == want


@settings(max_examples=100, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_characters="\\")))
def test_process_escapes_leaves_backslash_free_text_alone(text):
    assert process_escapes(text) == text
