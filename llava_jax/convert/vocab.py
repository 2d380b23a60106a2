"""The vocabulary of the language half: `tokenizer.model` (SentencePiece) or `tokenizer.json` (byte-level BPE).

SentencePiece (`tokenizer.ggml.model = llama`, pre `default`): every piece with its score and type (normal,
unknown, control, unused, byte `<0xXX>`), then the added tokens of `added_tokens.json` (user-defined) and
of `tokenizer_config.json`'s `added_tokens_decoder` (control when `special`, else user-defined; score
-1000), as llama.cpp's converter does. Byte-level BPE (`gpt2`): the vocabulary and merges of
`tokenizer.json`, added tokens typed the same way, and `tokenizer.ggml.pre` recognised from the
pre-tokenizer's split regex (Llama-3 → `llama-bpe`, plain GPT-2 → `gpt2`). Either way the list is padded
to the model's vocabulary size with unused `[PAD<id>]` tokens.

Special ids come from the token strings in `tokenizer_config.json` / `special_tokens_map.json`, else from the ids in
`config.json`; the add-BOS/EOS flags from `tokenizer_config.json`, else (BPE) from the post-processor's
template, else SentencePiece's default (BOS yes, EOS no). The chat template from `tokenizer_config.json`,
`chat_template.jinja` or `chat_template.json`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import gguf
from gguf import TokenType

from llava_jax.errors import LlavaError

# Split regexes of known byte-level BPE pre-tokenizers → llama.cpp's `tokenizer.ggml.pre` name
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
_KNOWN_PRE = {LLAMA3_REGEX: "llama-bpe"}
_SPECIAL_KINDS = ("bos", "eos", "unk", "pad")


@dataclass
class Vocab:
    model: str  # "llama" (SentencePiece) or "gpt2" (byte-level BPE)
    pre: str
    tokens: list[str]
    types: list[int]
    scores: list[float] | None = None
    merges: list[str] = field(default_factory=list)
    special_ids: dict[str, int] = field(default_factory=dict)
    add_bos: bool | None = None
    add_eos: bool | None = None
    add_space_prefix: bool | None = None
    chat_template: str | list | None = None
    own_ids: dict[str, int] = field(default_factory=dict)  # the tokenizer model's own bos/eos/unk (last resort)

    def add_to(self, w: gguf.GGUFWriter) -> None:
        w.add_tokenizer_model(self.model)
        w.add_tokenizer_pre(self.pre)
        w.add_token_list(self.tokens)
        if self.scores is not None:
            w.add_token_scores(self.scores)
        w.add_token_types(self.types)
        if self.merges:
            w.add_token_merges(self.merges)
        for kind, tid in self.special_ids.items():
            getattr(w, f"add_{kind}_token_id")(tid)
        if self.add_bos is not None:
            w.add_add_bos_token(self.add_bos)
        if self.add_eos is not None:
            w.add_add_eos_token(self.add_eos)
        if self.add_space_prefix is not None:
            w.add_add_space_prefix(self.add_space_prefix)
        if self.chat_template is not None:
            w.add_chat_template(self.chat_template)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise LlavaError(f"cannot read {path}: {str(e).splitlines()[0][:200]}") from None


def _content(entry) -> str | None:
    if isinstance(entry, str):
        return entry
    if isinstance(entry, dict) and isinstance(entry.get("content"), str):
        return entry["content"]
    return None


def load_vocab(model_dir: str | Path, vocab_size: int, config_ids: dict[str, int]) -> Vocab:
    """Read the tokenizer files of `model_dir` into a `Vocab` of exactly `vocab_size` tokens."""
    d = Path(model_dir)
    tok_cfg = _read_json(d / "tokenizer_config.json") if (d / "tokenizer_config.json").is_file() else {}
    if (d / "special_tokens_map.json").is_file():  # older checkpoints name some special tokens only there
        for key, value in _read_json(d / "special_tokens_map.json").items():
            if tok_cfg.get(key) is None:
                tok_cfg[key] = value
    if (d / "tokenizer.model").is_file():
        vocab = _sentencepiece(d, vocab_size, tok_cfg)
    elif (d / "tokenizer.json").is_file():
        vocab = _byte_level_bpe(d, vocab_size, tok_cfg)
    else:
        raise LlavaError(f"no tokenizer in {d}: expected tokenizer.model (SentencePiece) or tokenizer.json")

    by_text: dict[str, int] = {}  # token text → id, preferring a control/user-defined entry over a normal one
    for i, (t, ty) in enumerate(zip(vocab.tokens, vocab.types, strict=True)):
        prev = by_text.get(t)
        if prev is None or (vocab.types[prev] == TokenType.NORMAL and ty not in (TokenType.NORMAL, TokenType.UNUSED)):
            by_text[t] = i
    for kind in _SPECIAL_KINDS:
        text = _content(tok_cfg.get(f"{kind}_token"))
        if text is not None and text in by_text:
            vocab.special_ids[kind] = by_text[text]
        elif kind in config_ids:
            vocab.special_ids[kind] = config_ids[kind]
        elif kind in vocab.own_ids:
            vocab.special_ids[kind] = vocab.own_ids[kind]
    for kind in ("bos", "eos"):
        flag = tok_cfg.get(f"add_{kind}_token")
        if isinstance(flag, bool):
            setattr(vocab, f"add_{kind}", flag)
    if vocab.model == "llama":
        vocab.add_bos = True if vocab.add_bos is None else vocab.add_bos
        vocab.add_eos = False if vocab.add_eos is None else vocab.add_eos
        if isinstance(tok_cfg.get("add_prefix_space"), bool):
            vocab.add_space_prefix = tok_cfg["add_prefix_space"]
    vocab.chat_template = _chat_template(d, tok_cfg)
    return vocab


def _chat_template(d: Path, tok_cfg: dict) -> str | list | None:
    tmpl = tok_cfg.get("chat_template")
    if isinstance(tmpl, (str, list)):
        return tmpl
    if (d / "chat_template.jinja").is_file():
        return (d / "chat_template.jinja").read_text(encoding="utf-8")
    if (d / "chat_template.json").is_file():
        tmpl = _read_json(d / "chat_template.json").get("chat_template")
        if isinstance(tmpl, (str, list)):
            return tmpl
    return None


def _added_tokens(d: Path, tok_cfg: dict) -> list[tuple[int, str, bool]]:
    """(id, content, special) for every added token: added_tokens.json, then tokenizer_config.json."""
    out: list[tuple[int, str, bool]] = []
    if (d / "added_tokens.json").is_file():
        out += [(int(i), t, False) for t, i in _read_json(d / "added_tokens.json").items()]
    decoder = tok_cfg.get("added_tokens_decoder") or {}
    out += [(int(i), e["content"], bool(e.get("special"))) for i, e in decoder.items()]
    return out


def _looks_special(token: str) -> bool:
    return (token.startswith("<|") and token.endswith("|>")) or token in ("<s>", "</s>", "<pad>", "<mask>", "<unk>")


def _pad(tokens: list[str], types: list[int], scores: list[float] | None, vocab_size: int) -> None:
    for i in range(len(tokens), vocab_size):
        tokens.append(f"[PAD{i}]")
        types.append(TokenType.UNUSED)
        if scores is not None:
            scores.append(-1000.0)


def _sentencepiece(d: Path, vocab_size: int, tok_cfg: dict) -> Vocab:
    try:
        from sentencepiece import SentencePieceProcessor
    except ImportError:
        raise LlavaError("reading tokenizer.model needs the sentencepiece package (pip install sentencepiece)") from None
    sp = SentencePieceProcessor()
    try:
        sp.LoadFromFile(str(d / "tokenizer.model"))
    except (OSError, RuntimeError) as e:
        raise LlavaError(f"cannot read {d / 'tokenizer.model'}: {str(e).splitlines()[0][:200]}") from None
    n = sp.vocab_size()
    if n > vocab_size:
        raise LlavaError(f"tokenizer.model has {n} pieces but the model's embedding has only {vocab_size} rows")
    tokens, scores, types = [], [], []
    for i in range(n):
        tokens.append(sp.IdToPiece(i))
        scores.append(float(sp.GetScore(i)))
        if sp.IsUnknown(i):
            types.append(TokenType.UNKNOWN)
        elif sp.IsControl(i):
            types.append(TokenType.CONTROL)
        elif sp.IsUnused(i):
            types.append(TokenType.UNUSED)
        elif sp.IsByte(i):
            types.append(TokenType.BYTE)
        else:
            types.append(TokenType.NORMAL)
    _pad(tokens, types, scores, vocab_size)
    for tid, text, special in _added_tokens(d, tok_cfg):
        if tid >= vocab_size:
            continue  # llama.cpp's converter ignores added tokens past the embedding too
        if tid < n and tokens[tid] == text and types[tid] in (TokenType.CONTROL, TokenType.UNKNOWN):
            continue  # <unk>, <s>, </s> restated: keep SentencePiece's entry
        tokens[tid] = text if special or _looks_special(text) else text.replace("\u2581", " ")
        types[tid] = TokenType.CONTROL if special or _looks_special(text) else TokenType.USER_DEFINED
        scores[tid] = -1000.0
    ids = {"unk": sp.unk_id()} if sp.unk_id() >= 0 else {}
    for kind, tid in (("bos", sp.bos_id()), ("eos", sp.eos_id())):
        if tid >= 0:
            ids[kind] = tid
    return Vocab("llama", "default", tokens, types, scores, own_ids=ids)


def _byte_level_bpe(d: Path, vocab_size: int, tok_cfg: dict) -> Vocab:
    tj = _read_json(d / "tokenizer.json")
    model = tj.get("model") or {}
    pre_tok = tj.get("pre_tokenizer") or {}
    pieces = pre_tok.get("pretokenizers", [pre_tok]) if pre_tok.get("type") == "Sequence" else [pre_tok]
    byte_level = any(p.get("type") == "ByteLevel" for p in pieces if p)
    if model.get("type") != "BPE" or not byte_level:
        raise LlavaError(f"unsupported tokenizer.json in {d}: only byte-level BPE (or a tokenizer.model) is supported")
    pre = _detect_pre(pieces)
    n_base = len(model["vocab"])
    size = max([n_base] + [t["id"] + 1 for t in tj.get("added_tokens", [])])
    if size > vocab_size:
        raise LlavaError(f"tokenizer.json has {size} tokens but the model's embedding has only {vocab_size} rows")
    tokens: list[str | None] = [None] * size
    types = [TokenType.NORMAL] * size
    for text, tid in model["vocab"].items():
        tokens[tid] = text
    for t in tj.get("added_tokens", []):
        tokens[t["id"]] = t["content"]
        types[t["id"]] = TokenType.CONTROL if t.get("special") or _looks_special(t["content"]) else TokenType.USER_DEFINED
    for i, t in enumerate(tokens):
        if t is None:
            tokens[i], types[i] = f"[PAD{i}]", TokenType.UNUSED
    full: list[str] = [t for t in tokens if t is not None]
    _pad(full, types, None, vocab_size)
    merges = []
    for m in model.get("merges", []):
        if isinstance(m, str):
            merges.append(m)
        else:  # [left, right] pairs (tokenizers >= 0.20): spaces inside a part are written as U+0120
            merges.append(" ".join("".join(chr(ord(c) + 256) if c == " " else c for c in part) for part in m))
    vocab = Vocab("gpt2", pre, full, types, None, merges)
    add_bos, add_eos = _template_flags(tj, tok_cfg)
    vocab.add_bos, vocab.add_eos = add_bos, add_eos
    return vocab


def _detect_pre(pieces: list[dict]) -> str:
    regexes = [p.get("pattern", {}).get("Regex") for p in pieces if p and p.get("type") == "Split"]
    if len(regexes) == 1 and regexes[0] in _KNOWN_PRE:
        return _KNOWN_PRE[regexes[0]]
    if not regexes and any(p.get("type") == "ByteLevel" and p.get("use_regex", True) for p in pieces if p):
        return "gpt2"
    raise LlavaError("unrecognised BPE pre-tokenizer in tokenizer.json (known: Llama-3 'llama-bpe', GPT-2 'gpt2')")


def _template_flags(tj: dict, tok_cfg: dict) -> tuple[bool | None, bool | None]:
    post = tj.get("post_processor") or {}
    procs = post.get("processors", [post]) if post.get("type") == "Sequence" else [post]
    bos, eos = _content(tok_cfg.get("bos_token")), _content(tok_cfg.get("eos_token"))
    for p in procs:
        if p.get("type") == "TemplateProcessing":
            single = p.get("single") or []
            first = single[0].get("SpecialToken", {}).get("id") if single else None
            last = single[-1].get("SpecialToken", {}).get("id") if single else None
            return (first is not None and first == bos), (last is not None and last == eos)
    return False, False
