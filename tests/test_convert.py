"""Conversion (issue 4): tiny random HF LLaVA checkpoints → GGUF, read back and compared with the HF weights.

Logit parity of the converted files through llava_jax's own decoder/vision code belongs to those modules'
tests; they should use the `hf_llava15_dir` / `hf_llava16_dir` fixtures (and `orig_llava15_dirs` /
`orig_llava16_dirs` for the original layout) and convert with `convert(...)` at outtype "f32".
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from hf_fixtures import *  # noqa: F403  (session fixtures: hf_llava15_dir, hf_llava16_dir, ...)
from hf_fixtures import IMAGE_TOKEN_ID, PAD_TOKEN_ID, PINPOINTS, SPM_PIECES, VOCAB_SIZE, build_llava15

from llava_jax.convert import convert, write_language_model, write_mmproj
from llava_jax.convert.language import permute_qk, unpermute_qk
from llava_jax.errors import LlavaError
from llava_jax.gguf_io import open_gguf

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "convert_llava.py"
REFERENCE_MM = REPO.parent / "shared" / "reference" / "mm"


# ---- helpers -----------------------------------------------------------------------------------------------------


def hf_state(model_dir: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    out: dict[str, np.ndarray] = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _pick(state: dict, *names: str) -> np.ndarray:
    for n in names:
        if n in state:
            return state[n].astype(np.float32)
    raise KeyError(names[0])


def expected_mmproj(state: dict, n_blocks: int, with_newline: bool) -> dict[str, np.ndarray]:
    """GGUF name → the f32 array the mmproj file must hold, from an HF (5.x or 4.x named) state dict."""

    def v(name):
        return _pick(state, f"vision_tower.{name}", f"vision_tower.vision_model.{name}",
                     f"model.vision_tower.{name}", f"model.vision_tower.vision_model.{name}")

    def p(name):
        return _pick(state, f"multi_modal_projector.{name}", f"model.multi_modal_projector.{name}")

    out = {"v.patch_embd.weight": v("embeddings.patch_embedding.weight"),
           "v.class_embd": v("embeddings.class_embedding"),
           "v.position_embd.weight": v("embeddings.position_embedding.weight"),
           "v.pre_ln.weight": v("pre_layrnorm.weight"), "v.pre_ln.bias": v("pre_layrnorm.bias")}
    block = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
             "attn_out": "self_attn.out_proj", "ln1": "layer_norm1", "ln2": "layer_norm2", "ffn_up": "mlp.fc1",
             "ffn_down": "mlp.fc2"}
    for i in range(n_blocks):
        for short, hf in block.items():
            for leaf in ("weight", "bias"):
                out[f"v.blk.{i}.{short}.{leaf}"] = v(f"encoder.layers.{i}.{hf}.{leaf}")
    for idx, hf in (("0", "linear_1"), ("2", "linear_2")):
        for leaf in ("weight", "bias"):
            out[f"mm.{idx}.{leaf}"] = p(f"{hf}.{leaf}")
    if with_newline:
        out["model.image_newline"] = _pick(state, "image_newline", "model.image_newline")
    return out


def expected_language(state: dict, n_layers: int, n_heads: int, n_kv: int, tied: bool) -> dict[str, np.ndarray]:
    def t(name):
        return _pick(state, f"language_model.model.{name}", f"model.language_model.{name}")

    out = {"token_embd.weight": t("embed_tokens.weight"), "output_norm.weight": t("norm.weight")}
    block = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
             "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
             "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
    for i in range(n_layers):
        for short, hf in block.items():
            w = t(f"layers.{i}.{hf}.weight")
            if short == "attn_q":
                w = permute_qk(w, n_heads)
            elif short == "attn_k":
                w = permute_qk(w, n_kv)
            out[f"blk.{i}.{short}.weight"] = w
    if not tied:
        out["output.weight"] = _pick(state, "language_model.lm_head.weight", "lm_head.weight")
    return out


def read_f32(view) -> np.ndarray:
    """A tensor of a GGUF file (via llava_jax.gguf_io) dequantized to float32."""
    if view.qtype == QT.F32:
        return view.raw.view(np.float32).reshape(view.shape)
    if view.qtype == QT.F16:
        return view.raw.view(np.float16).reshape(view.shape).astype(np.float32)
    return gguf.quants.dequantize(np.asarray(view.raw), view.qtype).reshape(view.shape)


def check_tensors(path: Path, expected: dict[str, np.ndarray], outtype: str) -> None:
    g = open_gguf(path)
    assert set(g.tensors) == set(expected), set(g.tensors) ^ set(expected)
    for name, want in expected.items():
        view = g.tensors[name]
        assert view.shape == want.shape, name
        got = read_f32(view)
        if view.qtype == QT.F32:
            np.testing.assert_array_equal(got, want, err_msg=name)
        elif view.qtype == QT.F16:
            np.testing.assert_array_equal(got, want.astype(np.float16).astype(np.float32), err_msg=name)
        elif view.qtype == QT.BF16:
            np.testing.assert_array_equal(np.asarray(view.raw).ravel(),
                                          gguf.quants.quantize(want, QT.BF16).ravel(), err_msg=name)
            np.testing.assert_allclose(got, want, rtol=2.0**-8, atol=0, err_msg=name)
        elif view.qtype == QT.Q8_0:
            np.testing.assert_array_equal(np.asarray(view.raw).ravel(),
                                          gguf.quants.quantize(want, QT.Q8_0).ravel(), err_msg=name)
            blocks = want.reshape(-1, 32)  # half a step, plus the f16 rounding of the block scale (≤ 127 · 2^-11 steps)
            tol = np.abs(blocks).max(axis=1, keepdims=True) / 127 * (0.5 + 127 * 2.0**-11) + 1e-7
            assert np.all(np.abs(got.reshape(-1, 32) - blocks) <= tol), name
        else:
            raise AssertionError(f"{name}: unexpected type {view.qtype.name}")
        # storage policy (llama.cpp's converter): 1-D, norms, position embedding F32; patch kernel F16/F32
        if want.ndim == 1 or "position_embd" in name:
            assert view.qtype == QT.F32, name
        elif name == "v.patch_embd.weight":
            assert view.qtype == (QT.F16 if outtype == "f16" else QT.F32), name
        else:
            assert view.qtype == {"f32": QT.F32, "f16": QT.F16, "bf16": QT.BF16, "q8_0": QT.Q8_0}[outtype], name


@pytest.fixture(scope="session")
def converted(hf_llava15_dir, hf_llava16_dir, tmp_path_factory):
    """outtype → {"15": (mmproj, text), "16": (mmproj, text)}, converted lazily."""
    cache: dict[str, dict[str, tuple[Path, Path]]] = {}

    def get(outtype: str) -> dict[str, tuple[Path, Path]]:
        if outtype not in cache:
            root = tmp_path_factory.mktemp(f"conv_{outtype}")
            cache[outtype] = {"15": convert(hf_llava15_dir, root / "15", outtype, progress=False),
                              "16": convert(hf_llava16_dir, root / "16", outtype, progress=False)}
        return cache[outtype]

    return get


# ---- round trips -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("outtype", ["f32", "f16", "bf16", "q8_0"])
def test_round_trip_every_outtype(outtype, converted, hf_llava15_dir, hf_llava16_dir):
    files = converted(outtype)
    for key, model_dir in (("15", hf_llava15_dir), ("16", hf_llava16_dir)):
        mmproj, text = files[key]
        assert mmproj.name == f"mmproj-model-{outtype}.gguf" and text.name == f"ggml-model-{outtype}.gguf"
        state = hf_state(model_dir)
        check_tensors(mmproj, expected_mmproj(state, n_blocks=2, with_newline=key == "16"), outtype)
        check_tensors(text, expected_language(state, n_layers=2, n_heads=4, n_kv=2, tied=False), outtype)
        ftype = {"f32": 0, "f16": 1, "bf16": 32, "q8_0": 7}[outtype]
        assert open_gguf(mmproj).metadata["general.file_type"] == ftype
        assert open_gguf(text).metadata["general.file_type"] == ftype


def test_qk_unpermute_recovers_hf_and_matches_rope(converted, hf_llava15_dir):
    """Un-permuting attn_q/attn_k gives HF's rows back; and adjacent-pair RoPE on the permuted projection
    equals HF's half-split RoPE on the original, up to the same row permutation."""
    state = hf_state(hf_llava15_dir)
    g = open_gguf(converted("f32")["15"][1])
    for i in range(2):
        for short, hf, heads in (("attn_q", "q_proj", 4), ("attn_k", "k_proj", 2)):
            w_hf = _pick(state, f"language_model.model.layers.{i}.self_attn.{hf}.weight")
            w_gguf = read_f32(g.tensors[f"blk.{i}.{short}.weight"])
            assert not np.array_equal(w_gguf, w_hf)
            np.testing.assert_array_equal(unpermute_qk(w_gguf, heads), w_hf)

    head_dim, pos = 16, 7
    inv = 10000.0 ** (-np.arange(0, head_dim, 2) / head_dim)
    cos, sin = np.cos(pos * inv), np.sin(pos * inv)
    x = np.random.default_rng(0).standard_normal(64).astype(np.float64)
    w_hf = _pick(state, "language_model.model.layers.0.self_attn.k_proj.weight").astype(np.float64)
    w_gguf = read_f32(g.tensors["blk.0.attn_k.weight"]).astype(np.float64)
    hf = (w_hf @ x).reshape(2, head_dim)
    lo, hi = hf[:, : head_dim // 2], hf[:, head_dim // 2:]
    hf_rot = np.concatenate([lo * cos - hi * sin, hi * cos + lo * sin], axis=1)
    cpp = (w_gguf @ x).reshape(2, head_dim // 2, 2)
    a, b = cpp[..., 0], cpp[..., 1]
    cpp_rot = np.stack([a * cos - b * sin, b * cos + a * sin], axis=-1).reshape(2, head_dim)
    np.testing.assert_allclose(permute_qk(hf_rot.reshape(-1, 1), 2).ravel(), cpp_rot.ravel(), atol=1e-10)


# ---- metadata ----------------------------------------------------------------------------------------------------


def test_mmproj_metadata_llava15(converted):
    md = open_gguf(converted("f16")["15"][0]).metadata
    assert md["general.architecture"] == "clip"
    expect = {
        "clip.has_text_encoder": False, "clip.has_vision_encoder": True, "clip.has_llava_projector": True,
        "clip.projector_type": "mlp", "clip.vision.image_size": 336, "clip.vision.patch_size": 14,
        "clip.vision.embedding_length": 64, "clip.vision.feed_forward_length": 128,
        "clip.vision.projection_dim": 32, "clip.vision.block_count": 2, "clip.vision.attention.head_count": 4,
        "clip.vision.feature_layer": [2], "clip.use_gelu": False,
    }
    for k, v in expect.items():
        assert md[k] == v, k
    assert md["clip.vision.attention.layer_norm_epsilon"] == pytest.approx(1e-5)
    np.testing.assert_allclose(md["clip.vision.image_mean"], [0.48145466, 0.4578275, 0.40821073], rtol=1e-6)
    np.testing.assert_allclose(md["clip.vision.image_std"], [0.26862954, 0.26130258, 0.27577711], rtol=1e-6)
    for k in ("clip.vision.image_grid_pinpoints", "clip.vision.mm_patch_merge_type"):
        assert k not in md
    assert "v.post_ln.weight" not in open_gguf(converted("f16")["15"][0]).tensors


def test_mmproj_metadata_llava16(converted):
    g = open_gguf(converted("f16")["16"][0])
    md = g.metadata
    flat_wh = [x for h, w in PINPOINTS for x in (w, h)]  # transformers' pairs are (height, width)
    assert md["clip.vision.image_grid_pinpoints"] == flat_wh
    assert md["clip.vision.mm_patch_merge_type"] == "spatial_unpad"
    assert md["clip.vision.image_aspect_ratio"] == "anyres"
    assert g.tensors["model.image_newline"].shape == (64,)


@pytest.mark.skipif(not REFERENCE_MM.exists(), reason="shared reference files missing")
def test_mmproj_keys_cover_reference(converted):
    """Every key of the shared reference mmproj files (written in llama.cpp's layout) is in ours."""
    ours15 = set(open_gguf(converted("f16")["15"][0]).metadata)
    ours16 = set(open_gguf(converted("f16")["16"][0]).metadata)
    for ref, ours in (("mmproj-llava15-tiny-f32.gguf", ours15), ("mmproj-llava16-tiny-f32.gguf", ours16)):
        missing = set(open_gguf(REFERENCE_MM / ref).metadata) - ours
        assert not missing, (ref, missing)


def test_language_metadata_and_vocab(converted, hf_llava15_dir):
    import sentencepiece as spm

    md = open_gguf(converted("f16")["15"][1]).metadata
    expect = {
        "general.architecture": "llama", "llama.context_length": 4096, "llama.embedding_length": 64,
        "llama.block_count": 2, "llama.feed_forward_length": 128, "llama.attention.head_count": 4,
        "llama.attention.head_count_kv": 2, "llama.rope.dimension_count": 16, "llama.vocab_size": VOCAB_SIZE,
        "tokenizer.ggml.model": "llama", "tokenizer.ggml.pre": "default",
        "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.ggml.padding_token_id": PAD_TOKEN_ID, "tokenizer.ggml.add_bos_token": True,
        "tokenizer.ggml.add_eos_token": False,
    }
    for k, v in expect.items():
        assert md[k] == v, k
    assert md["llama.rope.freq_base"] == 10000.0
    assert md["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-5)
    assert "llama.rope.scaling.type" not in md
    assert md["tokenizer.chat_template"] == json.loads((hf_llava15_dir / "tokenizer_config.json").read_text())[
        "chat_template"]

    sp = spm.SentencePieceProcessor(model_file=str(hf_llava15_dir / "tokenizer.model"))
    tokens, types, scores = md["tokenizer.ggml.tokens"], md["tokenizer.ggml.token_type"], md["tokenizer.ggml.scores"]
    assert len(tokens) == len(types) == len(scores) == VOCAB_SIZE
    assert tokens[:SPM_PIECES] == [sp.id_to_piece(i) for i in range(SPM_PIECES)]
    np.testing.assert_allclose(scores[:SPM_PIECES], [sp.get_score(i) for i in range(SPM_PIECES)])
    T = gguf.TokenType
    assert types[0] == T.UNKNOWN and types[1] == types[2] == T.CONTROL
    assert tokens[3:259] == [f"<0x{b:02X}>" for b in range(256)] and set(types[3:259]) == {T.BYTE}
    assert set(types[259:SPM_PIECES]) == {T.NORMAL}
    assert tokens[IMAGE_TOKEN_ID] == "<image>" and types[IMAGE_TOKEN_ID] == T.CONTROL
    assert tokens[PAD_TOKEN_ID] == "<pad>" and types[PAD_TOKEN_ID] == T.CONTROL
    assert tokens[PAD_TOKEN_ID + 1:] == [f"[PAD{i}]" for i in range(PAD_TOKEN_ID + 1, VOCAB_SIZE)]
    assert set(types[PAD_TOKEN_ID + 1:]) == {T.UNUSED}


def test_bpe_vocab(hf_llava15_bpe_dir, tmp_path):
    out = write_language_model(hf_llava15_bpe_dir, tmp_path / "bpe.gguf", "f32")
    md = open_gguf(out).metadata
    tj = json.loads((hf_llava15_bpe_dir / "tokenizer.json").read_text())
    ids = {t["content"]: t["id"] for t in tj["added_tokens"]}
    assert md["tokenizer.ggml.model"] == "gpt2" and md["tokenizer.ggml.pre"] == "llama-bpe"
    assert len(md["tokenizer.ggml.merges"]) == len(tj["model"]["merges"])
    assert md["tokenizer.ggml.bos_token_id"] == ids["<|begin_of_text|>"]
    assert md["tokenizer.ggml.eos_token_id"] == ids["<|eot_id|>"]
    assert md["tokenizer.ggml.padding_token_id"] == ids["<pad>"]
    assert md["tokenizer.ggml.add_bos_token"] is True and md["tokenizer.ggml.add_eos_token"] is False
    tokens, types = md["tokenizer.ggml.tokens"], md["tokenizer.ggml.token_type"]
    for text, tid in tj["model"]["vocab"].items():
        assert tokens[tid] == text and types[tid] == gguf.TokenType.NORMAL
    for text, tid in ids.items():
        assert tokens[tid] == text and types[tid] == gguf.TokenType.CONTROL
    assert "tokenizer.ggml.scores" not in md


def test_tied_embeddings_have_no_output_tensor(tmp_path):
    model_dir = build_llava15(tmp_path / "tied", tie_word_embeddings=True)
    out = write_language_model(model_dir, tmp_path / "tied.gguf", "f32")
    g = open_gguf(out)
    assert "output.weight" not in g.tensors and "token_embd.weight" in g.tensors


def test_preprocessor_mean_std_are_used(hf_llava15_dir, tmp_path):
    model_dir = tmp_path / "m"
    shutil.copytree(hf_llava15_dir, model_dir)
    pre = json.loads((model_dir / "preprocessor_config.json").read_text())
    pre["image_mean"], pre["image_std"] = [0.5, 0.25, 0.125], [0.5, 0.5, 0.75]
    (model_dir / "preprocessor_config.json").write_text(json.dumps(pre))
    md = open_gguf(write_mmproj(model_dir, tmp_path / "mm.gguf", "f32")).metadata
    assert md["clip.vision.image_mean"] == [0.5, 0.25, 0.125] and md["clip.vision.image_std"] == [0.5, 0.5, 0.75]


# ---- original LLaVA layouts --------------------------------------------------------------------------------------


def _same_files(a: Path, b: Path) -> None:
    ga, gb = open_gguf(a), open_gguf(b)
    assert list(ga.tensors) == list(gb.tensors)
    for name, va in ga.tensors.items():
        vb = gb.tensors[name]
        assert (va.qtype, va.shape) == (vb.qtype, vb.shape), name
        np.testing.assert_array_equal(np.asarray(va.raw), np.asarray(vb.raw), err_msg=name)
    skip = {"general.name", "general.description"}
    ma = {k: v for k, v in ga.metadata.items() if k not in skip}
    mb = {k: v for k, v in gb.metadata.items() if k not in skip}
    assert ma == mb


def test_original_llava15_with_clip_dir_matches_hf(orig_llava15_dirs, converted, tmp_path):
    model_dir, clip_dir = orig_llava15_dirs
    assert list(model_dir.glob("pytorch_model-*.bin")) and not list(model_dir.glob("*.safetensors"))
    mmproj, text = convert(model_dir, tmp_path, "f32", clip_dir=clip_dir, progress=False)
    ref_mmproj, ref_text = converted("f32")["15"]
    _same_files(mmproj, ref_mmproj)
    _same_files(text, ref_text)


def test_original_llava16_matches_hf(orig_llava16_dirs, converted, tmp_path):
    model_dir, clip_dir = orig_llava16_dirs
    assert not list(clip_dir.glob("*.safetensors"))  # the weights come from the checkpoint itself
    mmproj, text = convert(model_dir, tmp_path, "f32", clip_dir=clip_dir, progress=False)
    ref_mmproj, ref_text = converted("f32")["16"]
    _same_files(mmproj, ref_mmproj)
    _same_files(text, ref_text)


def test_original_llava15_text_half_needs_no_clip(orig_llava15_dirs, converted, tmp_path):
    model_dir, _ = orig_llava15_dirs
    _same_files(write_language_model(model_dir, tmp_path / "t.gguf", "f32"), converted("f32")["15"][1])


# ---- refusals (script: one stderr line, non-zero exit, no output) ------------------------------------------------


def run_script(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args), "--no-progress"], capture_output=True,
                          text=True, env=env, timeout=120)


def assert_refused(proc: subprocess.CompletedProcess, outdir: Path, fragment: str) -> None:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and fragment in lines[0], lines[0]
    assert "Traceback" not in proc.stderr
    assert not outdir.exists() or not any(outdir.iterdir())


def _copy_without(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_refuses_unknown_layout(hf_llava15_dir, tmp_path):
    model_dir = _copy_without(hf_llava15_dir, tmp_path / "m")
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg["architectures"] = ["BertForMaskedLM"]
    (model_dir / "config.json").write_text(json.dumps(cfg))
    assert_refused(run_script(model_dir, "--outdir", tmp_path / "out"), tmp_path / "out", "unknown checkpoint layout")


def test_refuses_missing_shard(orig_llava16_dirs, tmp_path):
    model_dir, clip_dir = orig_llava16_dirs
    model_dir = _copy_without(model_dir, tmp_path / "m")
    next(iter(sorted(model_dir.glob("model-*.safetensors")))).unlink()
    proc = run_script(model_dir, "--outdir", tmp_path / "out", "--clip", clip_dir)
    assert_refused(proc, tmp_path / "out", "missing shard model-00001-of-00002.safetensors")


def test_refuses_missing_tensor(hf_llava15_dir, tmp_path):
    from safetensors.numpy import save_file

    model_dir = _copy_without(hf_llava15_dir, tmp_path / "m")
    state = {k: v for k, v in hf_state(model_dir).items() if k != "multi_modal_projector.linear_2.bias"}
    save_file(state, str(model_dir / "model.safetensors"))
    assert_refused(run_script(model_dir, "--outdir", tmp_path / "out"), tmp_path / "out", "missing tensor")


def test_refuses_vision_tower_not_found(orig_llava15_dirs, tmp_path):
    model_dir, _ = orig_llava15_dirs
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf"), HF_HUB_CACHE=str(tmp_path / "hf" / "hub"))
    proc = run_script(model_dir, "--outdir", tmp_path / "out", env=env)
    assert_refused(proc, tmp_path / "out", "vision tower 'openai/clip-vit-large-patch14-336' not found")


def test_refuses_unsupported_outtype(hf_llava15_dir, tmp_path):
    proc = run_script(hf_llava15_dir, "--outdir", tmp_path / "out", "--outtype", "q4_0")
    assert_refused(proc, tmp_path / "out", "unsupported out type 'q4_0'")


def test_api_refusals_raise_llava_error(hf_llava15_dir, tmp_path):
    with pytest.raises(LlavaError, match="unsupported out type"):
        write_mmproj(hf_llava15_dir, tmp_path / "x.gguf", "q4_k")
    with pytest.raises(LlavaError, match="model directory not found"):
        write_language_model(tmp_path / "nope", tmp_path / "x.gguf", "f32")


def test_script_writes_both_files(hf_llava16_dir, tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), str(hf_llava16_dir), "--outdir", str(tmp_path),
                           "--outtype", "q8_0"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "mmproj-model-q8_0.gguf").is_file() and (tmp_path / "ggml-model-q8_0.gguf").is_file()
    assert not list(tmp_path.glob("*.partial"))


# ---- llama.cpp ---------------------------------------------------------------------------------------------------




def _load(llama_cpp, path: Path, n_ctx: int = 256):
    return llama_cpp.Llama(str(path), n_ctx=n_ctx, n_threads=2, n_batch=n_ctx, verbose=False, logits_all=True,
                           type_k=0, type_v=0, flash_attn=False)


TEXTS = ["Hello world, the man said 12345 héllo  two   spaces\ttab", "USER: What is in the picture? ASSISTANT:",
         "\n\nnew lines\n", "日本 ok. Café!"]


@pytest.mark.llamacpp
@pytest.mark.slow
def test_llamacpp_spm_tokenization_and_logits(llama_cpp_mod, converted, hf_llava15_dir):
    import sentencepiece as spm
    import torch
    from transformers import LlavaForConditionalGeneration

    llm = _load(llama_cpp_mod, converted("f32")["15"][1])
    sp = spm.SentencePieceProcessor(model_file=str(hf_llava15_dir / "tokenizer.model"))
    for text in [*TEXTS, " leading space"]:
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == sp.encode(text), text
    ids = llm.tokenize(b"USER: <image>\nWhat is this? ASSISTANT:", add_bos=True, special=True)
    assert ids[0] == 1 and IMAGE_TOKEN_ID in ids

    ids = [1, *sp.encode(TEXTS[1])]
    llm.eval(ids)
    got = np.array(llm.scores[: len(ids)])
    model = LlavaForConditionalGeneration.from_pretrained(hf_llava15_dir).eval()
    with torch.no_grad():
        want = model(input_ids=torch.tensor([ids])).logits[0].numpy()
    np.testing.assert_allclose(got, want, atol=1e-4)


@pytest.mark.llamacpp
@pytest.mark.slow
def test_llamacpp_bpe_tokenization(llama_cpp_mod, hf_llava15_bpe_dir, tmp_path):
    from tokenizers import Tokenizer

    out = write_language_model(hf_llava15_bpe_dir, tmp_path / "bpe.gguf", "f32")
    llm = _load(llama_cpp_mod, out)
    tok = Tokenizer.from_file(str(hf_llava15_bpe_dir / "tokenizer.json"))
    for text in [*TEXTS, " leading space", "it's 1234567 ok"]:
        assert llm.tokenize(text.encode(), add_bos=True, special=False) == tok.encode(text).ids, text


@pytest.mark.llamacpp
@pytest.mark.slow
@pytest.mark.parametrize("outtype", ["f16", "bf16", "q8_0"])
def test_llamacpp_loads_every_outtype(llama_cpp_mod, converted, outtype):
    llm = _load(llama_cpp_mod, converted(outtype)["16"][1])
    llm.eval([1, 322, 344, 356])
    assert np.isfinite(np.array(llm.scores[:4])).all()


@pytest.mark.llamacpp
@pytest.mark.slow
def test_llamacpp_mtmd_encodes_image_with_converted_mmproj(llama_cpp_mod, converted, hf_llava15_dir):
    """llama.cpp's mtmd loads our mmproj (current FFN naming) and encodes a 336×336 image into 576 embeddings
    that match HF's image features. This llama.cpp appends the class token after the patches, so its rows are
    HF's rows shifted by one (HF's first patch is dropped; the last row is the class token's)."""
    import ctypes

    import llama_cpp.mtmd_cpp as mtmd
    import torch
    from PIL import Image
    from transformers import AutoImageProcessor, LlavaForConditionalGeneration

    mmproj, text = converted("f32")["15"]
    llm = _load(llama_cpp_mod, text, n_ctx=1024)
    params = mtmd.mtmd_context_params_default()
    params.use_gpu, params.n_threads, params.warmup, params.flash_attn_type = False, 2, False, 0
    ctx = mtmd.mtmd_init_from_file(str(mmproj).encode(), llm._model.model, params)
    assert ctx
    try:
        img = np.random.default_rng(0).integers(0, 256, (336, 336, 3), dtype=np.uint8)
        bitmap = mtmd.mtmd_bitmap_init(336, 336, (ctypes.c_uint8 * img.size).from_buffer_copy(img.tobytes()))
        chunks = mtmd.mtmd_input_chunks_init()
        prompt = mtmd.mtmd_default_marker() + b"\nhi"
        inp = mtmd.mtmd_input_text(text=prompt, text_len=len(prompt), add_special=True, parse_special=True)
        assert mtmd.mtmd_tokenize(ctx, chunks, ctypes.byref(inp), (mtmd.mtmd_bitmap_p_ctypes * 1)(bitmap), 1) == 0
        embs = []
        for i in range(mtmd.mtmd_input_chunks_size(chunks)):
            chunk = mtmd.mtmd_input_chunks_get(chunks, i)
            if mtmd.mtmd_input_chunk_get_type(chunk) == 1:  # image
                n = mtmd.mtmd_input_chunk_get_n_tokens(chunk)
                assert mtmd.mtmd_encode_chunk(ctx, chunk) == 0
                embs.append(np.ctypeslib.as_array(mtmd.mtmd_get_output_embd(ctx), shape=(n * 64,)).reshape(n, 64).copy())
        mtmd.mtmd_input_chunks_free(chunks)
        mtmd.mtmd_bitmap_free(bitmap)
    finally:
        mtmd.mtmd_free(ctx)
    got = np.concatenate(embs)
    assert got.shape == (576, 64) and np.isfinite(got).all()

    model = LlavaForConditionalGeneration.from_pretrained(hf_llava15_dir).eval()
    pixels = AutoImageProcessor.from_pretrained(hf_llava15_dir)(Image.fromarray(img), return_tensors="pt")
    with torch.no_grad():
        feats = model.model.get_image_features(pixel_values=pixels["pixel_values"])
    feats = getattr(feats, "pooler_output", feats)
    want = (torch.cat(list(feats)) if isinstance(feats, (list, tuple)) else feats).reshape(-1, 64).numpy()
    assert np.abs(got[:-1] - want[1:]).mean() < 0.05


def test_refuses_unknown_tower_config_for_original_llava16(orig_llava16_dirs, tmp_path):
    """Without --clip the 1.6 tower's head count comes from the table of known towers; the tiny tower is not
    openai/clip-vit-large-patch14-336, so the converter refuses instead of guessing."""
    model_dir, _ = orig_llava16_dirs
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf"), HF_HUB_CACHE=str(tmp_path / "hf" / "hub"))
    proc = run_script(model_dir, "--outdir", tmp_path / "out", env=env)
    assert_refused(proc, tmp_path / "out", "pass its local CLIP directory with --clip")


# ---- checkpoint reading ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("naming", ["transformers4", "transformers5"])
def test_hf_key_naming_variants(naming, hf_llava16_dir, converted, tmp_path):
    """llava-hf checkpoints on the Hub use `vision_tower.vision_model.*`; transformers 5 models name their
    parameters `model.language_model.*`, `model.vision_tower.*`, `lm_head.*`: all convert the same."""
    from safetensors.numpy import save_file

    model_dir = _copy_without(hf_llava16_dir, tmp_path / "m")
    renamed = {}
    for k, v in hf_state(model_dir).items():
        if naming == "transformers4":
            k = k.replace("vision_tower.", "vision_tower.vision_model.", 1) if k.startswith("vision_tower.") else k
        else:
            for old, new in (("language_model.model.", "model.language_model."), ("language_model.lm_head.", "lm_head."),
                             ("vision_tower.", "model.vision_tower."),
                             ("multi_modal_projector.", "model.multi_modal_projector."),
                             ("image_newline", "model.image_newline")):
                if k.startswith(old):
                    k = new + k[len(old):]
                    break
        renamed[k] = v
    save_file(renamed, str(model_dir / "model.safetensors"))
    mmproj, text = convert(model_dir, tmp_path / "out", "f32", progress=False)
    ref_mmproj, ref_text = converted("f32")["16"]
    _same_files(mmproj, ref_mmproj)
    _same_files(text, ref_text)


def test_checkpoint_reads_bf16_and_f16_safetensors(tmp_path):
    import torch
    from safetensors.torch import save_file

    from llava_jax.convert.checkpoint import Checkpoint

    x = torch.randn(8, 5, generator=torch.Generator().manual_seed(0))
    save_file({"a": x.to(torch.bfloat16), "b": x.to(torch.float16), "c": x}, str(tmp_path / "model.safetensors"))
    ckpt = Checkpoint(tmp_path)
    assert ckpt.shape("a") == (8, 5)
    np.testing.assert_array_equal(ckpt.get("a"), x.to(torch.bfloat16).float().numpy())
    np.testing.assert_array_equal(ckpt.get("b"), x.to(torch.float16).float().numpy())
    np.testing.assert_array_equal(ckpt.get("c"), x.numpy())
