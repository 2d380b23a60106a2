"""OpenAI messages → prompt segments (`llava_jax.serving.chat`): a single user turn renders exactly as
`run` builds its prompt (`prompts.build_prompt`), for every template; conversations keep each image
where its part stands and close each answer with the template's end marker. No model needed."""

from __future__ import annotations

import pytest

from llava_jax.errors import LlavaError
from llava_jax.prompts import CONV_MODE_ALIASES, TEMPLATES, ImageSlot, build_prompt
from llava_jax.serving.chat import ASSISTANT_END, Message, Part, render_messages


@pytest.mark.parametrize("name", [*TEMPLATES, *CONV_MODE_ALIASES])
def test_one_user_turn_renders_as_run(name):
    q = "What is in the image?"
    assert render_messages([Message("user", [Part(image=0), Part(text=q)])], name) == build_prompt(q, 1, name)
    two = [Message("user", [Part(image=0), Part(image=1), Part(text=q)])]
    assert render_messages(two, name) == build_prompt(q, 2, name)
    assert render_messages([Message("user", [Part(text=q)])], name) == build_prompt(q, 0, name)
    system = [Message("system", [Part(text="Be brief.")]), Message("user", [Part(image=0), Part(text=q)])]
    assert render_messages(system, name) == build_prompt(q, 1, name, "Be brief.")


def test_a_conversation_in_chatml():
    messages = [Message("user", [Part(text="Look:"), Part(image=0), Part(text="What is it?")]),
                Message("assistant", [Part(text="A cat.")]),
                Message("user", [Part(image=1), Part(text="And this?")])]
    segs = render_messages(messages, "chatml")
    assert segs == ["<|im_start|>system\nAnswer the questions.<|im_end|>\n<|im_start|>user\nLook:", ImageSlot(0),
                    "\nWhat is it?<|im_end|>\n<|im_start|>assistant\nA cat.<|im_end|>\n<|im_start|>user\n", ImageSlot(1),
                    "\nAnd this?<|im_end|>\n<|im_start|>assistant\n"]


def test_vicuna_answers_close_with_eos():
    messages = [Message("user", [Part(text="Hi")]), Message("assistant", [Part(text="Hello.")]),
                Message("user", [Part(text="Bye")])]
    text = "".join(render_messages(messages, "vicuna"))
    assert text.endswith(f"USER: Hi ASSISTANT: Hello.{ASSISTANT_END['vicuna']}USER: Bye ASSISTANT:")


def test_bad_conversations():
    with pytest.raises(LlavaError, match="start with a user"):
        render_messages([Message("assistant", [Part(text="x")])], "chatml")
    with pytest.raises(LlavaError, match="unknown chat template"):
        render_messages([Message("user", [Part(text="x")])], "nope")
