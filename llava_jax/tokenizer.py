"""Tokenizer built from GGUF metadata alone, giving the same ids as llama.cpp.

Two vocabulary kinds (`tokenizer.ggml.model`):

- ``llama``: SentencePiece-style BPE driven by token scores. The whole text fragment is split into
  characters and adjacent pairs are merged best-score first (ties: leftmost first) as long as the
  merged text is a token; what is left that is not a token falls back to ``<0xXX>`` byte tokens.
  Spaces become ``▁`` and a space is put in front of each text fragment that starts the input or
  follows a special token (``tokenizer.ggml.add_space_prefix``, default true).
- ``gpt2``: byte-level BPE with ranked merges. Text is first split by the pre-tokenizer regexes
  that llama.cpp associates with ``tokenizer.ggml.pre`` (applied one after the other, matches and
  the gaps between them both kept as pieces), each piece is mapped to GPT-2's byte alphabet and
  merged lowest rank first (ties: leftmost first). For the llama3 family a piece that is a token as
  a whole is taken as is ("ignore merges").

Before either, special tokens are cut out of the text the way llama.cpp does: longest token text
first, USER_DEFINED tokens always, CONTROL and UNKNOWN tokens only with ``parse_special=True``.

Library use: the regex pre-tokenization runs in HF ``tokenizers`` (``pre_tokenizers.Split`` with
its Oniguruma regexes, then ``ByteLevel`` for the byte alphabet) -- the engine llama.cpp's own
tokenizer test outputs were generated with. The merges run in Python here: building a
``tokenizers`` BPE model from a 280k-merge vocabulary costs ~0.6 s per load, whereas our rank
table is one dict, and per-word results are cached.

Detokenization is llama.cpp's ``token_to_piece`` joined: CONTROL/UNKNOWN tokens are hidden unless
``special=True``, USER_DEFINED tokens are shown as their text, byte tokens give their byte, and
when ``add_space_prefix`` is set the first piece loses one leading space (what llama.cpp's
``llama_detokenize`` does). llama.cpp's optional ``clean_spaces`` post-pass (" ," -> ",") is not
applied: the pieces are joined exactly.
"""

from __future__ import annotations

import codecs
import heapq
import os
from collections.abc import Iterable
from typing import Any

from tokenizers import Regex, pre_tokenizers

from llava_jax.errors import LlavaError

__all__ = ["Tokenizer", "StreamDecoder"]

# GGUF token types (tokenizer.ggml.token_type)
_TYPE_NORMAL, _TYPE_UNKNOWN, _TYPE_CONTROL, _TYPE_USER_DEFINED, _TYPE_UNUSED, _TYPE_BYTE = 1, 2, 3, 4, 5, 6

# llama.cpp token attributes (bit flags)
ATTR_UNDEFINED = 0
ATTR_UNKNOWN = 1 << 0
ATTR_UNUSED = 1 << 1
ATTR_NORMAL = 1 << 2
ATTR_CONTROL = 1 << 3
ATTR_USER_DEFINED = 1 << 4
ATTR_BYTE = 1 << 5
ATTR_LSTRIP = 1 << 7
ATTR_RSTRIP = 1 << 8

# token type -> attribute; types outside 0..6 are UNDEFINED, as in llama.cpp
_TYPE_TO_ATTR = (ATTR_UNDEFINED, ATTR_NORMAL, ATTR_UNKNOWN, ATTR_CONTROL, ATTR_USER_DEFINED, ATTR_UNUSED, ATTR_BYTE)

_HIDDEN = ATTR_UNKNOWN | ATTR_CONTROL  # not rendered unless special=True; only parsed with parse_special
_SPECIAL = ATTR_CONTROL | ATTR_USER_DEFINED | ATTR_UNKNOWN  # cut out of the text before BPE

_SPACE = "\u2581"  # ▁
_C_SPACE = " \t\n\v\f\r"  # C isspace() in the "C" locale

# ---- pre-tokenizer regexes per tokenizer.ggml.pre (llama.cpp's lists; applied in order) ----

_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_LLAMA3 = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
           r"|\s+(?!\S)|\s+")
_QWEN2 = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_PORO = r" ?[^(\s|.,!?…。，、।۔،)]+"
_UPPER_ISH = r"((?=[\p{L}])([^a-z]))"  # llama.cpp's stand-in for [\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]
_LOWER_ISH = r"((?=[\p{L}])([^A-Z]))"  # ... and for [\p{Ll}\p{Lm}\p{Lo}\p{M}]
_TEKKEN = (rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER_ISH}*{_LOWER_ISH}+|[^\r\n\p{{L}}\p{{N}}]?{_UPPER_ISH}+{_LOWER_ISH}*"
           r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT4O = (rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER_ISH}*{_LOWER_ISH}+{_CONTRACTIONS}?"
          rf"|[^\r\n\p{{L}}\p{{N}}]?{_UPPER_ISH}+{_LOWER_ISH}*{_CONTRACTIONS}?"
          r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_DEEPSEEK3 = (r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"
              r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# name -> (regexes, ignore_merges, add_bos default)
_PRE: dict[str, tuple[tuple[str, ...], bool, bool]] = {}


def _register(names: str, regexes: tuple[str, ...], ignore_merges: bool = False, add_bos: bool = False) -> None:
    for name in names.split():
        _PRE[name] = (regexes, ignore_merges, add_bos)


_register("default", (r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", "[0-9][0-9][0-9]"))
_register("llama3 llama-v3 llama-bpe falcon3 falcon-h1 pixtral midm-2.0 lfm2", (_LLAMA3,), True, True)
_register("dbrx smaug-bpe chatglm-bpe glm4", (_LLAMA3,))
_register("gpt-2 phi-2 jina-es jina-de gigachat jina-v2-es jina-v2-de a.x-4.0 mellum exaone4 mpt olmo jais "
          "trillion granite-docling jina-v1-en jina-v2-code roberta-bpe", (_GPT2,))
_register("starcoder refact command-r smollm codeshell exaone minerva-7b", (r"\p{N}", _GPT2))
_register("qwen2 deepseek-r1-qwen megrez stablelm2 hunyuan", (_QWEN2,))
_register("falcon", (r"[\p{P}\$\+<=>\^~\|`]+", _GPT2, "[0-9][0-9][0-9]"))
_register("deepseek-coder", ("[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", "[一-龥ࠀ-一가-퟿]+", r"\p{N}"))
_register("deepseek-v3", (r"\p{N}{1,3}", "[一-龥぀-ゟ゠-ヿ]+", _DEEPSEEK3))
_register("poro-chat bloom gpt3-finnish", (_PORO,))
_register("viking", (_PORO, r"\p{N}"))
_register("tekken", (_TEKKEN,), True, True)
_register("gpt-4o llama4", (_GPT4O,))

# end-of-generation detection by token text (llama.cpp's list)
_EOG_TEXTS = frozenset([
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>", "<end_of_turn>",
    "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]", "<|end_of_text|>",
    "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>", "<｜end▁of▁sentence｜>",
])
_EOT_TEXTS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>", "<EOT>",
              "_<EOT>", "[EOT]", "<｜end▁of▁sentence｜>", "<end_of_utterance>")
# FIM pad / repo / file-separator tokens also end generation in llama.cpp
_FIM_EOG_TEXTS = (
    ("tokenizer.ggml.fim_pad_token_id", ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]")),
    ("tokenizer.ggml.fim_rep_token_id", ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>")),
    ("tokenizer.ggml.fim_sep_token_id", ("<|file_sep|>",)),
)
_FIM_OTHER_TEXTS = (
    ("tokenizer.ggml.fim_pre_token_id", ("<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<｜fim▁begin｜>", "<PRE>",
                                         "▁<PRE>", "<|code_prefix|>", "<|prefix|>")),
    ("tokenizer.ggml.fim_suf_token_id", ("<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<｜fim▁hole｜>", "<SUF>",
                                         "▁<SUF>", "<|code_suffix|>", "<|suffix|>")),
    ("tokenizer.ggml.fim_mid_token_id", ("<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<｜fim▁end｜>", "<MID>",
                                         "▁<MID>", "<|code_middle|>", "<|middle|>")),
)


def _byte_alphabet() -> list[str]:
    """GPT-2's byte -> printable character table (bytes_to_unicode)."""
    keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]


_BYTE_CHARS = _byte_alphabet()
_CHAR_TO_BYTE = {c: b for b, c in enumerate(_BYTE_CHARS)}


class Tokenizer:
    """llama.cpp-compatible tokenizer for `llama` (SentencePiece) and `gpt2` (byte-level BPE) vocabularies.

    Attributes: `vocab_size`, `model` ("llama" / "gpt2"), `pre` (pre-tokenizer name, gpt2 only),
    `bos_id` / `eos_id` / `unk_id` / `eot_id` (None when absent), `add_bos` (metadata default for
    prompts), `add_space_prefix`, `stop_ids` (llama.cpp's end-of-generation set).
    """

    _WORD_CACHE_MAX = 1 << 16

    def __init__(self, metadata: dict[str, Any]):
        md = metadata
        model = md.get("tokenizer.ggml.model")
        if model is None:
            raise LlavaError("GGUF metadata has no tokenizer (tokenizer.ggml.model is missing)")
        if model in ("no_vocab", "none"):
            raise LlavaError(f"GGUF file has no vocabulary (tokenizer.ggml.model = {model!r})")
        if model not in ("llama", "gpt2"):
            raise LlavaError(f"unsupported tokenizer model {model!r} (tokenizer.ggml.model); "
                             "supported: 'llama', 'gpt2'")
        self.model: str = model
        self._spm = model == "llama"

        tokens = md.get("tokenizer.ggml.tokens")
        if not isinstance(tokens, list) or not tokens:
            raise LlavaError("GGUF metadata has no token list (tokenizer.ggml.tokens)")
        n = len(tokens)
        tokens = [t if t else f"[EMPTY_{i}]" for i, t in enumerate(tokens)]
        self._tokens: list[str] = tokens
        self.vocab_size: int = n
        self._tok2id: dict[str, int] = {t: i for i, t in enumerate(tokens)}
        if len(self._tok2id) != n:
            seen: dict[str, int] = {}
            for i, t in enumerate(tokens):
                if t in seen:
                    raise LlavaError(f"duplicate token in vocabulary: {t!r} has ids {seen[t]} and {i}")
                seen[t] = i

        scores = md.get("tokenizer.ggml.scores")
        if scores is not None and len(scores) < n:
            raise LlavaError(f"tokenizer.ggml.scores has {len(scores)} entries for {n} tokens")
        self._scores: list[float] | None = scores
        types = md.get("tokenizer.ggml.token_type")
        if types is None:
            attrs = [ATTR_NORMAL] * n
        else:
            if len(types) < n:
                raise LlavaError(f"tokenizer.ggml.token_type has {len(types)} entries for {n} tokens")
            table = _TYPE_TO_ATTR
            attrs = [table[t] if 0 <= t < 7 else ATTR_UNDEFINED for t in types[:n]]
        self._attrs: list[int] = attrs

        # ---- model-specific settings ----
        self.pre: str | None = None
        self._ignore_merges = False
        if self._spm:
            default_add_bos, bos, eos, unk = True, 1, 2, 0
            self.add_space_prefix: bool = bool(md.get("tokenizer.ggml.add_space_prefix", True))
            self._ranks: dict[str, int] = {}
            self._pretok = None
        else:
            bos = eos = unk = None
            self.add_space_prefix = bool(md.get("tokenizer.ggml.add_space_prefix", False))
            pre = md.get("tokenizer.ggml.pre") or "default"
            if pre not in _PRE:
                raise LlavaError(f"unsupported pre-tokenizer {pre!r} (tokenizer.ggml.pre) for a gpt2 vocabulary")
            self.pre = pre
            regexes, self._ignore_merges, default_add_bos = _PRE[pre]
            merges = md.get("tokenizer.ggml.merges")
            if not isinstance(merges, list):
                raise LlavaError("gpt2 vocabulary without merges (tokenizer.ggml.merges is missing)")
            # "left right" -> rank; the first occurrence wins, as in llama.cpp
            self._ranks = dict(zip(reversed(merges), range(len(merges) - 1, -1, -1), strict=True))
            self._pretok = pre_tokenizers.Sequence(
                [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in regexes]
                + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])

        def _id(key: str, default: int | None) -> int | None:
            v = md.get(key)
            if v is None or not 0 <= v < n:
                v = default
            return v if v is not None and 0 <= v < n else None

        self.bos_id: int | None = _id("tokenizer.ggml.bos_token_id", bos)
        self.eos_id: int | None = _id("tokenizer.ggml.eos_token_id", eos)
        self.unk_id: int | None = _id("tokenizer.ggml.unknown_token_id", unk)
        self.eot_id: int | None = _id("tokenizer.ggml.eot_token_id", None)
        eom_id = _id("tokenizer.ggml.eom_token_id", None)
        self.add_bos: bool = bool(md.get("tokenizer.ggml.add_bos_token", default_add_bos))
        if self.add_bos and self.bos_id is None:
            self.add_bos = False

        self.stop_ids: frozenset[int] = self._mark_special_tokens(md, eom_id)

        # special tokens cut out of text before BPE: longest (in UTF-8 bytes) first
        cache = [i for i, a in enumerate(attrs) if a & _SPECIAL]
        cache.sort(key=lambda i: -len(tokens[i].encode("utf-8")))
        self._special_cache: list[int] = cache
        self._set_strip_attrs(md)

        self._piece_cache: dict[int, bytes] = {}
        self._word_cache: dict[str, tuple[int, ...]] = {}
        self._byte_ids: list[int | None] | None = None

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_gguf(cls, path: str | os.PathLike[str]) -> Tokenizer:
        from llava_jax.gguf_io import open_gguf

        return cls(open_gguf(path).metadata)

    @classmethod
    def from_metadata(cls, metadata: dict) -> Tokenizer:
        return cls(metadata)

    def _mark_special_tokens(self, md: dict[str, Any], eom_id: int | None) -> frozenset[int]:
        """llama.cpp's text-based fix-ups: EOT/EOM/FIM detection, end-of-generation set, CONTROL overrides."""
        tokens, attrs, tok2id = self._tokens, self._attrs, self._tok2id

        def first_of(texts: Iterable[str]) -> int | None:
            found = [tok2id[t] for t in texts if t in tok2id]
            return min(found) if found else None

        def make_control(i: int) -> None:
            attrs[i] |= ATTR_CONTROL

        if self.eot_id is None:
            self.eot_id = first_of(_EOT_TEXTS)
            if self.eot_id is not None:
                make_control(self.eot_id)
        if eom_id is None and "<|eom_id|>" in tok2id:
            eom_id = tok2id["<|eom_id|>"]
            make_control(eom_id)
        eog: set[int] = set()
        for groups, ends_generation in ((_FIM_EOG_TEXTS, True), (_FIM_OTHER_TEXTS, False)):
            for key, texts in groups:
                i = md.get(key)
                if i is None or not 0 <= i < len(tokens):
                    i = first_of(texts)
                    if i is not None:
                        make_control(i)
                if i is not None and ends_generation:
                    eog.add(i)
        for t in _EOG_TEXTS:
            i = tok2id.get(t)
            if i is not None:
                eog.add(i)
                make_control(i)
        for t in ("<|channel|>", "<|message|>", "<|start|>", "<|constrain|>"):  # gpt-oss: always rendered
            if t in tok2id:
                attrs[tok2id[t]] = ATTR_USER_DEFINED
        eog.update(i for i in (self.eos_id, self.eot_id, eom_id) if i is not None)
        texts_in = {tokens[i] for i in eog}
        if "<|end|>" in texts_in and (({"<|return|>", "<|call|>"} <= texts_in)
                                      or ({"<|calls|>", "<|flush|>"} <= texts_in)):
            end = tok2id["<|end|>"]
            eog.discard(end)
            attrs[end] = ATTR_USER_DEFINED
        if "<|tool_response>" in texts_in and "</s>" in texts_in:
            s = tok2id["</s>"]
            eog.discard(s)
            attrs[s] = ATTR_NORMAL
        return frozenset(eog)

    def _set_strip_attrs(self, md: dict[str, Any]) -> None:
        """Per-model lstrip/rstrip flags that llama.cpp sets by model name."""
        name = str(md.get("general.name", "")).lower()
        pre = str(md.get("tokenizer.ggml.pre", ""))
        arch = str(md.get("general.architecture", ""))
        tok2id, attrs = self._tok2id, self._attrs
        if any(s in pre for s in ("jina-v2-de", "jina-v2-es", "jina-v2-code")) or any(
                s in arch for s in ("nomic-bert-moe", "jina-bert-v3")):
            if "<mask>" in tok2id:
                attrs[tok2id["<mask>"]] |= ATTR_LSTRIP
        elif "phi-3" in name or "phi3" in name:
            for i in self._special_cache:
                attrs[i] |= ATTR_RSTRIP
            if "</s>" in tok2id:
                attrs[tok2id["</s>"]] |= ATTR_RSTRIP
            for t in ("<unk>", "<s>", "<|endoftext|>"):
                if t in tok2id:
                    attrs[tok2id[t]] &= ~ATTR_RSTRIP
        elif "modern-bert" in name and "[MASK]" in tok2id:
            attrs[tok2id["[MASK]"]] |= ATTR_LSTRIP

    # ------------------------------------------------------------------ queries

    def is_special(self, id: int) -> bool:
        """True for CONTROL, UNKNOWN and USER_DEFINED tokens: those matched whole in text (llama.cpp's special set).

        Of these, CONTROL/UNKNOWN are hidden by `decode` unless `special=True`.
        """
        return bool(self._attrs[self._check_id(id)] & _SPECIAL)

    def is_control(self, id: int) -> bool:
        return bool(self._attrs[self._check_id(id)] & ATTR_CONTROL)

    def token_text(self, id: int) -> str:
        """The vocabulary string of a token (e.g. '▁Hello', 'ĠHello', '<0x0A>', '<|im_end|>')."""
        return self._tokens[self._check_id(id)]

    def token_to_id(self, text: str) -> int | None:
        return self._tok2id.get(text)

    def _check_id(self, id: int) -> int:
        try:
            i = int(id)
        except (TypeError, ValueError):
            raise LlavaError(f"token id must be an integer, got {id!r}") from None
        if not 0 <= i < self.vocab_size:
            raise LlavaError(f"token id {i} out of range for a vocabulary of {self.vocab_size}")
        return i

    # ------------------------------------------------------------------ encoding

    def encode(self, text: str, add_bos: bool = False, parse_special: bool = False) -> list[int]:
        """Token ids of `text`, as llama.cpp's `llama_tokenize(text, add_special, parse_special)`.

        add_bos: put the BOS token first (pass `tok.add_bos` for the model's default; llama.cpp's
            add_special=True is `add_bos=tok.add_bos`).
        parse_special: recognise CONTROL tokens written in the text (e.g. "<|im_start|>").
        USER_DEFINED tokens are always recognised, as in llama.cpp. The EOS token is never appended.
        """
        if not isinstance(text, str):
            raise LlavaError(f"text to tokenize must be a str, got {type(text).__name__}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise LlavaError(f"text is not valid Unicode (unpaired surrogate at character {e.start})") from None
        out: list[int] = []
        if add_bos:
            if self.bos_id is None:
                raise LlavaError("add_bos requested but the vocabulary has no BOS token")
            out.append(self.bos_id)
        fragments = self._partition(text, parse_special) if text else []
        if self._spm:
            prev_special = True  # a space goes in front of the text at the start and after special tokens
            for frag in fragments:
                if isinstance(frag, int):
                    out.append(frag)
                    prev_special = True
                else:
                    if self.add_space_prefix and prev_special:
                        frag = " " + frag
                    self._spm_encode(frag.replace(" ", _SPACE), out)
                    prev_special = False
        else:
            for frag in fragments:
                if isinstance(frag, int):
                    out.append(frag)
                else:
                    self._bpe_encode(frag, out)
        return out

    def _partition(self, text: str, parse_special: bool) -> list[str | int]:
        """Split text into raw-text fragments (str) and special token ids (int), longest token first."""
        frags: list[str | int] = [text]
        tokens, attrs = self._tokens, self._attrs
        for tid in self._special_cache:
            a = attrs[tid]
            if not parse_special and a & _HIDDEN:
                continue
            tok = tokens[tid]
            if not any(isinstance(f, str) and tok in f for f in frags):
                continue
            new: list[str | int] = []
            for f in frags:
                if isinstance(f, int) or tok not in f:
                    new.append(f)
                    continue
                rest = f
                while True:
                    pos = rest.find(tok)
                    if pos < 0:
                        if rest:
                            new.append(rest)
                        break
                    left = rest[:pos]
                    if a & ATTR_LSTRIP:
                        left = left.rstrip(_C_SPACE)
                    if left:
                        new.append(left)
                    new.append(tid)
                    rest = rest[pos + len(tok):]
                    if a & ATTR_RSTRIP:
                        rest = rest.lstrip(_C_SPACE)
            frags = new
        return frags

    def _spm_encode(self, text: str, out: list[int]) -> None:
        """llama.cpp's SPM session: best-score-first bigram merges over characters, then byte fallback."""
        n = len(text)
        if n == 0:
            return
        tok2id, scores = self._tok2id, self._scores
        sym = list(text)  # current text of each symbol ("" once merged into its left neighbour)
        prev = list(range(-1, n - 1))
        nxt = list(range(1, n + 1))
        nxt[-1] = -1
        heap: list[tuple[float, int, int, int]] = []

        def add(left: int, right: int) -> None:
            if left < 0 or right < 0:
                return
            merged = sym[left] + sym[right]
            tid = tok2id.get(merged)
            if tid is None:
                return
            score = scores[tid] if scores is not None else 0.0
            heapq.heappush(heap, (-score, left, right, len(merged)))

        for i in range(1, n):
            add(i - 1, i)
        while heap:
            _, left, right, size = heapq.heappop(heap)
            ls, rs = sym[left], sym[right]
            if not ls or not rs or len(ls) + len(rs) != size:
                continue  # stale: one side was merged since
            sym[left] = ls + rs
            sym[right] = ""
            nxt[left] = nxt[right]
            if nxt[right] >= 0:
                prev[nxt[right]] = left
            add(prev[left], left)
            add(left, nxt[left])
        i = 0
        while i != -1:
            s = sym[i]
            tid = tok2id.get(s)
            if tid is not None:
                out.append(tid)
            else:
                for b in s.encode("utf-8"):
                    bid = self._byte_token(b)
                    if bid is not None:
                        out.append(bid)
            i = nxt[i]

    def _byte_token(self, b: int) -> int | None:
        if self._byte_ids is None:
            get = self._tok2id.get
            ids = []
            for x in range(256):
                tid = get(f"<0x{x:02X}>")
                if tid is None and x < 0x80:
                    tid = get(chr(x))
                ids.append(tid if tid is not None else self.unk_id)
            self._byte_ids = ids
        return self._byte_ids[b]

    def _bpe_encode(self, text: str, out: list[int]) -> None:
        cache = self._word_cache
        for word, _ in self._pretok.pre_tokenize_str(text):
            ids = cache.get(word)
            if ids is None:
                ids = self._bpe_word(word)
                if len(cache) >= self._WORD_CACHE_MAX:
                    cache.clear()
                cache[word] = ids
            out.extend(ids)

    def _bpe_word(self, word: str) -> tuple[int, ...]:
        """Merge one pre-tokenized piece (GPT-2 byte alphabet): lowest rank first, leftmost on ties."""
        tok2id = self._tok2id
        if self._ignore_merges and word in tok2id:
            return (tok2id[word],)
        parts = list(word)
        parts = self._merge_short(parts) if len(parts) <= 48 else self._merge_long(parts)
        ids: list[int] = []
        for p in parts:
            tid = tok2id.get(p)
            if tid is not None:
                ids.append(tid)
            else:  # llama.cpp: look each UTF-8 byte of the piece up as a one-byte token
                for b in p.encode("utf-8"):
                    if b < 0x80 and (tid := tok2id.get(chr(b))) is not None:
                        ids.append(tid)
        return tuple(ids)

    def _merge_short(self, parts: list[str]) -> list[str]:
        """Repeatedly merge the adjacent pair of lowest rank (leftmost on ties); O(n^2), fast for short pieces."""
        ranks = self._ranks
        while len(parts) > 1:
            best, best_rank = -1, 1 << 62
            for i in range(len(parts) - 1):
                r = ranks.get(parts[i] + " " + parts[i + 1])
                if r is not None and r < best_rank:
                    best, best_rank = i, r
            if best < 0:
                break
            parts[best:best + 2] = [parts[best] + parts[best + 1]]
        return parts

    def _merge_long(self, parts: list[str]) -> list[str]:
        """Same merge order as `_merge_short`, with a heap and a linked list (for long pieces)."""
        ranks = self._ranks
        n = len(parts)
        sym = parts[:]
        prev = list(range(-1, n - 1))
        nxt = list(range(1, n + 1))
        nxt[-1] = -1
        heap: list[tuple[int, int, int, str]] = []

        def add(left: int, right: int) -> None:
            if left < 0 or right < 0:
                return
            r = ranks.get(sym[left] + " " + sym[right])
            if r is not None:
                heapq.heappush(heap, (r, left, right, sym[left] + sym[right]))

        for i in range(1, n):
            add(i - 1, i)
        while heap:
            _, left, right, merged = heapq.heappop(heap)
            if not sym[left] or not sym[right] or sym[left] + sym[right] != merged:
                continue
            sym[left] = merged
            sym[right] = ""
            nxt[left] = nxt[right]
            if nxt[right] >= 0:
                prev[nxt[right]] = left
            add(prev[left], left)
            add(left, nxt[left])
        result = []
        i = 0
        while i != -1:
            result.append(sym[i])
            i = nxt[i]
        return result

    # ------------------------------------------------------------------ decoding

    def token_bytes(self, id: int, special: bool = False) -> bytes:
        """Raw bytes of one token's piece (llama.cpp's token_to_piece, lstrip=0); may be partial UTF-8.

        CONTROL and UNKNOWN tokens give b"" unless `special`; USER_DEFINED tokens give their text.
        """
        i = self._check_id(id)
        a = self._attrs[i]
        if a & _HIDDEN and not special:
            return b""
        piece = self._piece_cache.get(i)
        if piece is None:
            piece = self._piece_cache[i] = self._make_piece(i, a)
        return piece

    def _make_piece(self, i: int, a: int) -> bytes:
        text = self._tokens[i]
        if a & (_HIDDEN | ATTR_USER_DEFINED):
            return text.encode("utf-8")
        if a & ATTR_NORMAL:
            if self._spm:
                return text.replace(_SPACE, " ").encode("utf-8")
            try:
                return bytes([_CHAR_TO_BYTE[c] for c in text])
            except KeyError:
                return _decode_text_slow(text)
        if a & ATTR_BYTE:
            try:
                return bytes([int(text[3:5], 16)])
            except ValueError:
                return b""
        return b""  # UNUSED / UNDEFINED tokens render as nothing

    def decode_bytes(self, ids: Iterable[int], special: bool = False) -> bytes:
        """The pieces of `ids` joined; with `add_space_prefix` the first piece loses one leading space."""
        out = [self.token_bytes(i, special) for i in ids]
        if out and self.add_space_prefix and out[0][:1] == b" ":
            out[0] = out[0][1:]
        return b"".join(out)

    def decode(self, ids: Iterable[int], special: bool = False) -> str:
        """Text of `ids`: llama.cpp's token pieces joined (see `decode_bytes`); bad UTF-8 becomes U+FFFD."""
        return self.decode_bytes(ids, special).decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        pre = f", pre={self.pre!r}" if self.pre else ""
        return f"Tokenizer(model={self.model!r}{pre}, vocab_size={self.vocab_size})"


def _decode_text_slow(text: str) -> bytes:
    """llama.cpp's llama_decode_text for tokens with characters outside the GPT-2 byte alphabet."""
    out = bytearray()
    for c in text:
        b = _CHAR_TO_BYTE.get(c)
        if b is not None:
            out.append(b)
        else:
            out += b"[UNK_BYTE_0x" + c.encode("utf-8").hex().encode() + text.encode("utf-8") + b"]"
    return bytes(out)


class StreamDecoder:
    """Incremental detokenizer for streaming generation.

    `feed(id)` returns the text completed by that token (possibly ""): bytes of a UTF-8 character split
    over several tokens are held back until the character is complete. `flush()` returns what is left
    (incomplete bytes become U+FFFD). The concatenation of all returned strings equals
    `tokenizer.decode(ids, special)`.
    """

    def __init__(self, tokenizer: Tokenizer, special: bool = False):
        self.tokenizer = tokenizer
        self.special = special
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._first = True

    def feed(self, id: int) -> str:
        piece = self.tokenizer.token_bytes(id, self.special)
        if self._first:
            self._first = False
            if self.tokenizer.add_space_prefix and piece[:1] == b" ":
                piece = piece[1:]
        return self._decoder.decode(piece)

    def feed_many(self, ids: Iterable[int]) -> str:
        return "".join(self.feed(i) for i in ids)

    def flush(self) -> str:
        out = self._decoder.decode(b"", final=True)
        self._decoder.reset()
        return out
