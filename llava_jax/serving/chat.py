"""OpenAI chat messages → prompt segments (text and `prompts.ImageSlot`s) in the model's chat template.

The templates are `prompts.TEMPLATES` (one-turn); a conversation is rendered turn by turn with the same
pieces, each image where its content part stands:

    begin + system block + user_open + parts + turn_end + assistant_prefix + answer + assistant_end
          + next_user_open + parts + turn_end + ...

A single user message [image, text] renders exactly as `ChatTemplate.render(text, 1)` (what
`python -m llava_jax.run -p TEXT --image IMG` builds); a single text-only one as `run --chat-template`'s
text-only prompt. System messages replace the template's default system prompt.
"""

from __future__ import annotations

from dataclasses import dataclass

from llava_jax.errors import LlavaError
from llava_jax.prompts import CONV_MODE_ALIASES, TEMPLATES, ImageSlot, Segment, _merge

# How an answer closes its turn, and what opens it, per template (the one-turn templates end with the
# assistant's opening already written).
ASSISTANT_PREFIX = {"vicuna": " ", "llava-cli": " ", "mistral": " "}
ASSISTANT_END = {"vicuna": "</s>", "llava-cli": "</s>", "mistral": "</s>", "chatml": "<|im_end|>\n",
                 "llama3": "<|eot_id|>", "raw": "\n"}
NEXT_USER_OPEN = {"mistral": "[INST] ", "llava-cli": "\nUSER:"}


@dataclass
class Part:
    """One content part: text, or an image (its index in the request's image list)."""

    text: str | None = None
    image: int | None = None


@dataclass
class Message:
    role: str  # system | user | assistant
    parts: list[Part]


def resolve_template(name: str) -> str:
    name = CONV_MODE_ALIASES.get(name, name)
    if name not in TEMPLATES:
        raise LlavaError(f"unknown chat template {name!r}; choose one of: {', '.join([*TEMPLATES, *CONV_MODE_ALIASES])}")
    return name


def _user_parts(parts: list[Part], image_sep: str) -> list[Segment]:
    out: list[Segment] = []
    previous_text = False
    for part in parts:
        if part.image is not None:
            out += [ImageSlot(part.image), image_sep]
            previous_text = False
        else:
            out.append(("\n" if previous_text else "") + (part.text or ""))
            previous_text = True
    return out


def render_messages(messages: list[Message], template: str) -> list[Segment]:
    """The conversation as segments; the prompt ends where the assistant's next answer begins."""
    name = resolve_template(template)
    t = TEMPLATES[name]
    system_texts = [p.text or "" for m in messages if m.role == "system" for p in m.parts]
    turns = [m for m in messages if m.role != "system"]
    if not turns or turns[0].role != "user":
        raise LlavaError("messages: the conversation must start with a user message (after any system messages)")
    system = "\n".join(system_texts) if system_texts else t.default_system
    pieces: list[Segment] = [t.begin]
    if system:
        pieces += [t.system_open, system, t.system_close]
    first_user = True
    for i, m in enumerate(turns):
        if m.role == "user":
            opener = t.user_open if first_user else NEXT_USER_OPEN.get(name, t.user_open)
            pieces += [opener, *_user_parts(m.parts, t.image_sep), t.turn_end]
            first_user = False
        elif m.role == "assistant":
            if any(p.image is not None for p in m.parts):
                raise LlavaError("messages: an assistant message cannot hold images")
            last = i == len(turns) - 1
            text = "".join(p.text or "" for p in m.parts)
            pieces += [ASSISTANT_PREFIX.get(name, ""), text] + ([] if last else [ASSISTANT_END[name]])
        else:
            raise LlavaError(f"messages: unsupported role {m.role!r} (system, user, assistant)")
    return _merge(pieces)
