"""Prompt building: the user's text and images → a list of segments (text pieces and image slots).

The generator tokenizes each text piece (special tokens parsed) and puts image `i`'s embeddings where
`ImageSlot(i)` stands. Whether a BOS goes in front is the generator's call (tokenizer flags), so no
template here writes `<s>` / `<|begin_of_text|>`.

Two modes, as in llama.cpp's llava-cli:

* The text contains image markers (`<image>`, or mtmd's `<__media__>`): the text is the user's own
  full prompt; each marker becomes the next image slot, in order, and no template is applied. The
  number of markers must equal the number of images.
* No marker: the text is wrapped in a chat template (`TEMPLATES`), with the images first in the user
  turn.

`process_escapes` is llama.cpp's `-e`/`--escape` (its `string_process_escapes`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from llava_jax.errors import LlavaError

IMAGE_MARKERS = ("<image>", "<__media__>")
_MARKER_RE = re.compile("|".join(re.escape(m) for m in IMAGE_MARKERS))


@dataclass(frozen=True)
class ImageSlot:
    """Where the embeddings of image `index` (0-based, the order of --image) go."""

    index: int


Segment = str | ImageSlot

VICUNA_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
LLAMA3_SYSTEM = (
    "You are a helpful language and vision assistant. You are able to understand the visual content "
    "that the user provides, and assist the user with a variety of tasks using natural language."
)


@dataclass(frozen=True)
class ChatTemplate:
    """A one-turn chat template; each instance's `doc` shows its exact rendering. In general, for
    system text S, images I0..In-1 and text T:

        begin + (system_open + S + system_close, only if S is not empty) + user_open
        + I0 + image_sep + ... + In-1 + image_sep + T + turn_end

    `default_system` is used when `build_prompt` gets `system=None`; `system=""` drops the block.
    """

    name: str
    default_system: str = ""
    begin: str = ""
    system_open: str = ""
    system_close: str = ""
    user_open: str = ""
    image_sep: str = ""
    turn_end: str = ""
    doc: str = field(default="", compare=False, repr=False)  # the exact rendering, for humans

    def render(self, text: str, n_images: int, system: str | None = None) -> list[Segment]:
        system = self.default_system if system is None else system
        pieces: list[Segment] = [self.begin]
        if system:
            pieces += [self.system_open, system, self.system_close]
        pieces.append(self.user_open)
        for i in range(n_images):
            pieces += [ImageSlot(i), self.image_sep]
        pieces += [text, self.turn_end]
        return _merge(pieces)


VICUNA = ChatTemplate(
    name="vicuna",
    default_system=VICUNA_SYSTEM,
    system_close=" ",
    user_open="USER: ",
    image_sep="\n",
    turn_end=" ASSISTANT:",
    doc="""LLaVA-1.5 / 1.6-vicuna (the layout of LLaVA's `conv_llava_v1` / `conv_vicuna_v1`):

    "{system} USER: <image>\\n{text} ASSISTANT:"

with {system} = VICUNA_SYSTEM by default ("A chat between a curious human and an artificial
intelligence assistant. The assistant gives helpful, detailed, and polite answers to the human's
questions.", the text of `conv_llava_v1` and of llava-cli; LLaVA's `conv_vicuna_v1` says "user"
instead of "human"). Several images: "<image>\\n" once per image. An empty system drops
"{system} ".""",
)

LLAVA_CLI = ChatTemplate(
    name="llava-cli",
    default_system=VICUNA_SYSTEM,
    system_close="\n",
    user_open="USER:",
    turn_end="\nASSISTANT:",
    doc="""llama.cpp's legacy llava-cli "native" prompt (no <image> in -p), for parity with it:

    "{system}\\nUSER:<image>{text}\\nASSISTANT:"

Same system text as "vicuna", but a newline before USER:, no space or newline around the image and a
newline before ASSISTANT:.""",
)

MISTRAL = ChatTemplate(
    name="mistral",
    begin="[INST] ",
    system_open="<<SYS>>\n",
    system_close="\n<</SYS>>\n\n",
    image_sep="\n",
    turn_end=" [/INST]",
    doc="""LLaVA-1.6-mistral (LLaVA's `conv_mistral_instruct`):

    "[INST] <image>\\n{text} [/INST]"

No system prompt by default; a given one goes inside the instruction as LLaVA's LLAMA_2 style does:
"[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n<image>\\n{text} [/INST]".""",
)

CHATML = ChatTemplate(
    name="chatml",
    default_system="Answer the questions.",
    system_open="<|im_start|>system\n",
    system_close="<|im_end|>\n",
    user_open="<|im_start|>user\n",
    image_sep="\n",
    turn_end="<|im_end|>\n<|im_start|>assistant\n",
    doc="""ChatML (LLaVA-1.6-34b / Nous-Hermes-2-Yi-34B, also SmolLM2, Qwen):

    "<|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>user\\n<image>\\n{text}<|im_end|>\\n<|im_start|>assistant\\n"

{system} defaults to "Answer the questions." (LLaVA's `conv_chatml_direct`). Note: LLaVA's own
renderer puts no newline after <|im_end|>; this is the standard ChatML layout of the models' jinja.""",
)

LLAMA3 = ChatTemplate(
    name="llama3",
    default_system=LLAMA3_SYSTEM,
    system_open="<|start_header_id|>system<|end_header_id|>\n\n",
    system_close="<|eot_id|>",
    user_open="<|start_header_id|>user<|end_header_id|>\n\n",
    image_sep="\n",
    turn_end="<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
    doc="""Llama-3 (llama3-llava-next-8b):

    "<|start_header_id|>system<|end_header_id|>\\n\\n{system}<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\\n\\n<image>\\n{text}<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\\n\\n"

{system} defaults to LLAMA3_SYSTEM (LLaVA-NeXT's llava_llama_3 system prompt). <|begin_of_text|>
is the BOS, added by the generator.""",
)

RAW = ChatTemplate(
    name="raw",
    doc="""No wrapping: "<image>...{text}" (the images, then the text as given).""",
)

TEMPLATES: dict[str, ChatTemplate] = {t.name: t for t in (VICUNA, LLAVA_CLI, MISTRAL, CHATML, LLAMA3, RAW)}

# LLaVA's `--conv-mode` names (its conversation.py `conv_templates`) → the template each one is. llava_v0
# ("###"-separated Human/Assistant turns) has no template of its own here; vicuna is the closest.
CONV_MODE_ALIASES: dict[str, str] = {
    "vicuna_v1": "vicuna", "llava_v1": "vicuna", "llava_v0": "vicuna", "mistral_instruct": "mistral",
    "chatml_direct": "chatml", "llava_llama_3": "llama3", "plain": "raw",
}


def template_from_metadata(metadata: dict) -> str:
    """A template name for a GGUF's metadata; "vicuna" when nothing says otherwise.

    Looks at `tokenizer.chat_template` (jinja text) first — ChatML, Llama-3 and [INST] markers —
    then at the model's name keys (LLaVA-1.5 GGUFs usually carry no chat template).
    """
    jinja = metadata.get("tokenizer.chat_template")
    if isinstance(jinja, str):
        if "<|im_start|>" in jinja:
            return "chatml"
        if "<|start_header_id|>" in jinja:
            return "llama3"
        if "[INST]" in jinja:
            return "mistral"
        if "USER:" in jinja or "ASSISTANT:" in jinja:
            return "vicuna"
    name = " ".join(str(metadata.get(key, "")) for key in ("general.name", "general.basename", "general.finetune")).lower()
    if "mistral" in name:
        return "mistral"
    if re.search(r"llama[-_ ]?3", name):
        return "llama3"
    if re.search(r"\b34b\b|\byi\b|hermes|qwen|smollm", name):
        return "chatml"
    return "vicuna"


def build_prompt(text: str, n_images: int, template: str, system: str | None = None) -> list[Segment]:
    """The prompt as segments: strings (never empty, never two in a row) and `ImageSlot`s.

    With image markers in `text`, the text is used as is with marker k replaced by ImageSlot(k)
    (template and system are ignored); the marker count must equal `n_images`. Otherwise the text
    is wrapped in `TEMPLATES[template]`, images first.
    """
    if n_images < 0:
        raise LlavaError(f"number of images must be >= 0, got {n_images}")
    n_markers = len(_MARKER_RE.findall(text))
    if n_markers:
        if n_markers != n_images:
            raise LlavaError(
                f"the prompt has {n_markers} image marker(s) (<image>) but {n_images} image(s) were given; "
                "use one marker per image, or none to put the images before the text"
            )
        parts = _MARKER_RE.split(text)
        pieces: list[Segment] = [parts[0]]
        for i, part in enumerate(parts[1:]):
            pieces += [ImageSlot(i), part]
        return _merge(pieces)
    template = CONV_MODE_ALIASES.get(template, template)
    if template not in TEMPLATES:
        raise LlavaError(f"unknown chat template {template!r}; choose one of: {', '.join([*TEMPLATES, *CONV_MODE_ALIASES])}")
    return TEMPLATES[template].render(text, n_images, system)


def _merge(pieces: list[Segment]) -> list[Segment]:
    """Drops empty strings and joins adjacent strings."""
    out: list[Segment] = []
    for piece in pieces:
        if isinstance(piece, str):
            if not piece:
                continue
            if out and isinstance(out[-1], str):
                out[-1] += piece
                continue
        out.append(piece)
    return out


_SIMPLE_ESCAPES = {ord("n"): b"\n", ord("r"): b"\r", ord("t"): b"\t", ord("'"): b"'", ord('"'): b'"', ord("\\"): b"\\"}
_HEX = set(b"0123456789abcdefABCDEF")
_C_SPACE = set(b" \t\n\v\f\r")


def _strtol_hex2(a: int, b: int) -> int | None:
    """The byte C's `strtol(x, &end, 16)` gives for the two characters x = a b when it consumes both
    (llama.cpp's test), else None: "HH", or a leading space/sign then one hex digit ("-f" → 0xF1)."""
    if b not in _HEX:
        return None
    if a in _HEX:
        return int(bytes((a, b)), 16)
    if a in _C_SPACE or a == ord("+"):
        return int(bytes((b,)), 16)
    if a == ord("-"):
        return -int(bytes((b,)), 16) & 0xFF
    return None


def process_escapes(text: str) -> str:
    """llama.cpp's `string_process_escapes` (the -e flag), byte for byte on the UTF-8 text.

    \\n \\r \\t \\' \\" \\\\ become their characters and \\xHH the byte HH; any other backslash
    pair, including C's \\a \\b \\f \\v \\? and a \\x without two hex digits, is kept as written, as
    is a trailing backslash. Bytes from \\xHH that do not form valid UTF-8 become U+FFFD.
    """
    if "\\" not in text:
        return text  # nothing to process (and lone surrogates, which UTF-8 cannot encode, pass through)
    src = text.encode("utf-8", errors="surrogatepass")
    out = bytearray()
    i, n = 0, len(src)
    while i < n:
        c = src[i]
        if c != ord("\\") or i + 1 >= n:
            out.append(c)
            i += 1
            continue
        e = src[i + 1]
        if e in _SIMPLE_ESCAPES:
            out += _SIMPLE_ESCAPES[e]
            i += 2
        elif e == ord("x") and i + 3 < n and (value := _strtol_hex2(src[i + 2], src[i + 3])) is not None:
            out.append(value)
            i += 4
        else:
            out += bytes((c, e))
            i += 2
    return out.decode("utf-8", errors="replace")
