"""Tokenizer parity with llama.cpp: its own vocab test suite, the SmolLM2 references, streaming, bad input."""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest

from llava_jax.errors import LlavaError
from llava_jax.gguf_io import open_gguf
from llava_jax.tokenizer import _BYTE_CHARS, _PRE, StreamDecoder, Tokenizer

SEPARATOR = "\n__ggml_vocab_test__\n"


def _vocab_path(shared_reference: Path, name: str) -> Path:
    return shared_reference / "vocab" / f"ggml-vocab-llama-{name}.gguf"


def _vocab_cases(path: Path) -> list[tuple[str, list[int]]]:
    """llama.cpp's test-tokenizer-0 files: texts split by the separator, one line of ids per text."""
    texts = Path(f"{path}.inp").read_text(encoding="utf-8").split(SEPARATOR)
    lines = Path(f"{path}.out").read_text(encoding="utf-8").split("\n")
    if texts and texts[-1] == "":
        texts = texts[:-1]
    lines = lines[:len(texts)]
    assert len(texts) == len(lines) > 10
    return [(t, [int(x) for x in line.split()]) for t, line in zip(texts, lines, strict=True)]


@pytest.fixture(scope="module")
def spm_metadata(shared_reference) -> dict:
    return open_gguf(_vocab_path(shared_reference, "spm")).metadata


@pytest.fixture(scope="module")
def spm(spm_metadata) -> Tokenizer:
    return Tokenizer.from_metadata(spm_metadata)


@pytest.fixture(scope="module")
def bpe(shared_reference) -> Tokenizer:
    return Tokenizer.from_gguf(_vocab_path(shared_reference, "bpe"))


@pytest.fixture(scope="module")
def smollm2(smollm2_path) -> Tokenizer:
    return Tokenizer.from_gguf(smollm2_path)


@pytest.fixture(scope="module")
def vocabs(spm, bpe) -> dict[str, Tokenizer]:
    return {"spm": spm, "bpe": bpe}


# ---------------------------------------------------------------- llama.cpp's vocab suite


@pytest.mark.parametrize("name", ["spm", "bpe"])
def test_llamacpp_vocab_suite(name, vocabs, shared_reference):
    tok = vocabs[name]
    cases = _vocab_cases(_vocab_path(shared_reference, name))
    bad = [(text, tok.encode(text), ids) for text, ids in cases if tok.encode(text) != ids]
    assert not bad, f"{len(bad)}/{len(cases)} mismatches, first: {bad[:3]}"


@pytest.mark.parametrize("name", ["spm", "bpe"])
def test_vocab_suite_round_trip(name, vocabs, shared_reference):
    tok = vocabs[name]
    bad = [text for text, ids in _vocab_cases(_vocab_path(shared_reference, name)) if tok.decode(ids) != text]
    assert not bad


@pytest.mark.parametrize("name", ["spm", "bpe"])
def test_vocab_suite_stream_decoder(name, vocabs, shared_reference):
    tok = vocabs[name]
    split_chars = 0
    for text, ids in _vocab_cases(_vocab_path(shared_reference, name)):
        sd = StreamDecoder(tok)
        chunks = [sd.feed(i) for i in ids]
        assert "".join(chunks) + sd.flush() == tok.decode(ids) == text
        # a token whose bytes end inside a UTF-8 character yields nothing (or only the complete part)
        split_chars += sum(1 for i in ids if tok.token_bytes(i) and not _is_utf8(tok.token_bytes(i)))
        assert all("\ufffd" not in c for c in chunks)
    assert split_chars > 0  # the suite has characters spread over several tokens


def _is_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def test_vocab_attributes(spm, bpe):
    assert (spm.model, spm.vocab_size, spm.bos_id, spm.eos_id, spm.add_bos) == ("llama", 32000, 1, 2, True)
    assert spm.stop_ids == {2}
    assert spm.add_space_prefix
    assert (bpe.model, bpe.pre, bpe.vocab_size, bpe.bos_id, bpe.eos_id) == ("gpt2", "llama-bpe", 128256, 128000, 128001)
    assert bpe.add_bos  # llama3 pre-tokenizer: BOS by default, as llama.cpp
    assert {128001, 128009} <= bpe.stop_ids  # <|end_of_text|>, <|eot_id|>
    assert bpe.is_special(128009) and not bpe.is_special(9906)
    assert spm.is_special(1) and not spm.is_special(15043)


def test_add_bos(spm, bpe):
    assert spm.encode("Hello", add_bos=True) == [1, 15043]
    assert spm.encode("", add_bos=True) == [1]
    assert spm.encode("") == [] == bpe.encode("")
    assert bpe.encode("Hello", add_bos=True) == [128000, 9906]


def test_parse_special(spm, bpe):
    # SPM: special tokens are split out, and the text after a special token gets the space prefix again
    assert spm.encode("Hello</s>world", parse_special=True) == spm.encode("Hello") + [2] + spm.encode("world")
    assert 2 not in spm.encode("Hello</s>world")
    text = "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
    ids = bpe.encode(text, parse_special=True)
    assert ids == [128006, 882, 128007, 271, 13347, 128009]
    assert not set(bpe.encode(text)) & {128006, 128007, 128009}
    assert bpe.decode(ids) == "user\n\nHi"  # CONTROL tokens are hidden by default
    assert bpe.decode(ids, special=True) == text


def test_user_defined_tokens_always_parsed(spm_metadata):
    """llama.cpp splits USER_DEFINED tokens out of the text even without parse_special, and renders them."""
    md = dict(spm_metadata)
    md["tokenizer.ggml.tokens"] = [*md["tokenizer.ggml.tokens"], "<image>"]
    md["tokenizer.ggml.scores"] = [*md["tokenizer.ggml.scores"], 0.0]
    md["tokenizer.ggml.token_type"] = [*md["tokenizer.ggml.token_type"], 4]
    tok = Tokenizer.from_metadata(md)
    ids = tok.encode("a<image>b")
    assert ids == tok.encode("a") + [32000] + tok.encode("b")
    assert tok.is_special(32000)
    assert tok.decode(ids) == "a<image> b"  # the space prefix added after the token stays (as in llama.cpp)


def test_spm_leading_space(spm):
    ids = spm.encode(" Hello")
    assert ids == [29871, 15043]
    assert spm.decode(ids) == " Hello"  # only the added prefix space is removed
    # like llama.cpp's llama_detokenize, only the first token's piece loses its leading space
    assert spm.decode([1, *spm.encode("Hello")]) == " Hello"
    assert spm.token_bytes(15043) == b" Hello"


# ---------------------------------------------------------------- SmolLM2 (gpt2 / smollm)


def test_smollm2_prompts(smollm2, smollm2_reference):
    assert (smollm2.model, smollm2.pre, smollm2.add_bos) == ("gpt2", "smollm", False)
    for entry in smollm2_reference:
        ids = smollm2.encode(entry["prompt"], parse_special=True)
        assert ids == entry["ids"], entry["prompt"]
        assert smollm2.decode(ids, special=True) == entry["prompt"]
        sd = StreamDecoder(smollm2, special=True)
        assert "".join(sd.feed(i) for i in ids) + sd.flush() == entry["prompt"]


def test_smollm2_round_trip_plain(smollm2, smollm2_reference):
    for entry in smollm2_reference:
        if "<|" not in entry["prompt"]:
            assert smollm2.decode(smollm2.encode(entry["prompt"])) == entry["prompt"]


def test_smollm2_greedy_text(smollm2, smollm2_reference):
    for entry in smollm2_reference:
        assert smollm2.decode(entry["greedy_ids"]) == entry["greedy_text"]
        sd = StreamDecoder(smollm2)
        assert sd.feed_many(entry["greedy_ids"]) + sd.flush() == entry["greedy_text"]


def test_smollm2_special_tokens(smollm2):
    assert smollm2.stop_ids >= {0, 2}  # <|endoftext|>, <|im_end|>
    assert smollm2.eos_id == 2 and smollm2.bos_id == 1
    assert smollm2.encode("<|im_start|>", parse_special=True) == [1]
    assert 1 not in smollm2.encode("<|im_start|>")
    assert smollm2.token_bytes(2) == b"" and smollm2.token_bytes(2, special=True) == b"<|im_end|>"
    assert smollm2.token_text(2) == "<|im_end|>"


def test_smollm2_multibyte_stream(smollm2):
    text = "東京 🙂 naïve"
    ids = smollm2.encode(text)
    pieces = [smollm2.token_bytes(i) for i in ids]
    assert any(not _is_utf8(p) for p in pieces)  # some character is split over tokens
    sd = StreamDecoder(smollm2)
    chunks = [sd.feed(i) for i in ids]
    assert "" in chunks and "\ufffd" not in "".join(chunks)
    assert "".join(chunks) + sd.flush() == text


# ---------------------------------------------------------------- properties, edge cases


def _random_text(rng: random.Random, n: int) -> str:
    pools = ["abcXYZ", "0123456789", " \t\n\r", "'.,!?-_()[]{}<>", "éüßñÅ", "日本語東京", "🦙🙂😶‍🌫️",
             "\u0301\u200b\xa0\u3000", ["the ", "quick ", "brown ", "ing", "tion", "'s", "'LL", " 're"]]
    return "".join(rng.choice(rng.choice(pools)) for _ in range(n))


@pytest.mark.parametrize("name", ["spm", "bpe"])
def test_random_round_trip(name, vocabs):
    tok = vocabs[name]
    rng = random.Random(0)
    for _ in range(100):
        text = _random_text(rng, rng.randint(0, 40))
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert tok.encode(text, parse_special=True) == ids  # no special-token text in these


def test_stream_decoder_random_bytes(spm):
    """Arbitrary byte tokens (invalid UTF-8 included): streaming gives exactly decode()'s text."""
    rng = random.Random(1)
    byte_ids = [spm.token_to_id(f"<0x{b:02X}>") for b in range(256)]
    for _ in range(200):
        ids = [rng.choice(byte_ids) if rng.random() < 0.8 else rng.randrange(spm.vocab_size) for _ in range(12)]
        sd = StreamDecoder(spm)
        assert "".join(sd.feed(i) for i in ids) + sd.flush() == spm.decode(ids)


def test_bpe_matches_hf_tokenizers(bpe, smollm2, shared_reference, smollm2_path):
    """Differential check against HF tokenizers with each model's own HF pre-tokenizer config."""
    from tokenizers import Regex, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    llama3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
              r"|\s+(?!\S)|\s+")
    pres = {
        "bpe": [pre_tokenizers.Split(Regex(llama3), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)],
        "smollm2": [pre_tokenizers.Digits(individual_digits=True),
                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)],
    }
    paths = {"bpe": _vocab_path(shared_reference, "bpe"), "smollm2": smollm2_path}
    for name, tok in (("bpe", bpe), ("smollm2", smollm2)):
        md = open_gguf(paths[name]).metadata
        vocab = {t: i for i, t in enumerate(md["tokenizer.ggml.tokens"])}
        merges = [tuple(m.split(" ", 1)) for m in md["tokenizer.ggml.merges"]]
        hf = HFTokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=name == "bpe"))
        hf.pre_tokenizer = pre_tokenizers.Sequence(pres[name])
        rng = random.Random(4)
        for _ in range(300):
            text = _random_text(rng, rng.randint(1, 60))
            assert tok.encode(text) == hf.encode(text, add_special_tokens=False).ids, repr(text)


def test_spm_matches_sentencepiece(spm, spm_metadata):
    """Differential check against sentencepiece's BPE with a model proto built from the GGUF vocabulary."""
    sentencepiece = pytest.importorskip("sentencepiece")
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    kinds = {1: proto.SentencePiece.NORMAL, 2: proto.SentencePiece.UNKNOWN, 3: proto.SentencePiece.CONTROL,
             6: proto.SentencePiece.BYTE}
    md = spm_metadata
    for text, score, kind in zip(md["tokenizer.ggml.tokens"], md["tokenizer.ggml.scores"],
                                 md["tokenizer.ggml.token_type"], strict=True):
        piece = proto.pieces.add()
        piece.piece, piece.score, piece.type = text, score, kinds[kind]
    proto.trainer_spec.model_type = pb.TrainerSpec.BPE
    proto.trainer_spec.byte_fallback = True
    proto.trainer_spec.unk_id, proto.trainer_spec.bos_id, proto.trainer_spec.eos_id = 0, 1, 2
    proto.trainer_spec.pad_id = -1
    proto.normalizer_spec.name = "identity"
    proto.normalizer_spec.add_dummy_prefix = True
    proto.normalizer_spec.remove_extra_whitespaces = False
    proto.normalizer_spec.escape_whitespaces = True
    sp = sentencepiece.SentencePieceProcessor(model_proto=proto.SerializeToString())
    rng = random.Random(5)
    for _ in range(300):
        text = _random_text(rng, rng.randint(1, 60))
        assert spm.encode(text) == sp.encode(text), repr(text)


def test_long_word_merge_matches_short(bpe):
    rng = random.Random(2)
    alphabet = "abcdefghij ĠĊ0123"
    for _ in range(300):
        word = "".join(rng.choice(alphabet) for _ in range(rng.randint(2, 40)))
        assert bpe._merge_long(list(word)) == bpe._merge_short(list(word))


def test_long_input(bpe, spm):
    text = ("The quick brown fox jumps over the lazy dog. " * 300 + "x" * 3000 + " 1234567890" * 50)
    for tok in (bpe, spm):
        t0 = time.perf_counter()
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert time.perf_counter() - t0 < 10


def test_load_time(shared_reference):
    t0 = time.perf_counter()
    tok = Tokenizer.from_gguf(_vocab_path(shared_reference, "bpe"))
    elapsed = time.perf_counter() - t0
    print(f"llama-bpe (128k tokens, 280k merges) load incl. open_gguf: {elapsed:.2f} s")
    assert tok.vocab_size == 128256
    assert elapsed < 5.0


def _tiny_gpt2(pre: str) -> dict:
    merges = ["Ġ t", "h e", "Ġt he"]
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": [*_BYTE_CHARS, "Ġt", "he", "Ġthe"],
        "tokenizer.ggml.merges": merges,
    }


@pytest.mark.parametrize("pre", sorted(_PRE))
def test_every_pre_tokenizer_compiles_and_round_trips(pre):
    tok = Tokenizer.from_metadata(_tiny_gpt2(pre))
    rng = random.Random(3)
    assert tok.encode(" the") == [258]
    for _ in range(20):
        text = _random_text(rng, 30)
        assert tok.decode(tok.encode(text)) == text


def test_unknown_tokenizer_model(spm_metadata):
    md = dict(spm_metadata, **{"tokenizer.ggml.model": "bert-ish"})
    with pytest.raises(LlavaError, match="bert-ish"):
        Tokenizer.from_metadata(md)


def test_bad_metadata():
    with pytest.raises(LlavaError, match="tokenizer.ggml.model"):
        Tokenizer.from_metadata({})
    with pytest.raises(LlavaError, match="no-such-pre"):
        Tokenizer.from_metadata(_tiny_gpt2("no-such-pre"))
    md = _tiny_gpt2("gpt-2")
    del md["tokenizer.ggml.merges"]
    with pytest.raises(LlavaError, match="merges"):
        Tokenizer.from_metadata(md)
    md = _tiny_gpt2("gpt-2")
    md["tokenizer.ggml.tokens"] = [*md["tokenizer.ggml.tokens"], "he"]
    with pytest.raises(LlavaError, match="duplicate"):
        Tokenizer.from_metadata(md)


def test_bad_ids_and_text(spm):
    with pytest.raises(LlavaError, match="out of range"):
        spm.decode([32000])
    with pytest.raises(LlavaError, match="out of range"):
        spm.token_bytes(-1)
    with pytest.raises(LlavaError):
        spm.encode(b"bytes")  # type: ignore[arg-type]
    with pytest.raises(LlavaError, match="surrogate"):
        spm.encode("a\ud800b")


def test_from_gguf_missing_file(tmp_path):
    with pytest.raises(LlavaError):
        Tokenizer.from_gguf(tmp_path / "nope.gguf")
