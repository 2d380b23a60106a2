"""mmproj loading: VisionConfig from metadata + shapes, legacy naming, old files, the params pytree, and a
one-line LlavaError for every kind of bad file."""

from __future__ import annotations

from dataclasses import replace

import gguf
import numpy as np
import pytest

from llava_jax.config import VisionConfig
from llava_jax.errors import LlavaError
from llava_jax.gguf_io import open_gguf
from llava_jax.mmproj import load_mmproj, read_vision_config
from llava_jax.random_mmproj import PRESETS, RandomMMProjSpec, random_mmproj_tensors, write_random_mmproj
from llava_jax.vision import ImageEncoder

TINY = RandomMMProjSpec(dim=32, heads=2, ffn=64, blocks=2, proj_hidden=48, out_dim=40, matmul_type="f32")


def write(tmp_path, spec: RandomMMProjSpec = TINY, name: str = "mm.gguf"):
    return write_random_mmproj(tmp_path / name, spec)


def one_line_error(fn, *args, **kwargs) -> str:
    with pytest.raises(LlavaError) as err:
        fn(*args, **kwargs)
    msg = str(err.value)
    assert "\n" not in msg, msg
    return msg


# ---------------------------------------------------------------------------------------------
# configs


def test_reference_tiny_files(shared_reference):
    for kind in ("llava15", "llava16"):
        cfg = read_vision_config(open_gguf(shared_reference / "mm" / f"mmproj-{kind}-tiny-f32.gguf"))
        assert (cfg.image_size, cfg.patch_size, cfg.dim, cfg.ffn_dim, cfg.n_layers, cfg.n_heads) == (336, 14, 64, 128,
                                                                                                     3, 4)
        assert cfg.ffn_swapped and not cfg.use_gelu and cfg.projector == "mlp"
        assert (cfg.proj_in, cfg.proj_hidden, cfg.out_dim) == (64, 576, 576)
        assert cfg.n_patches == 576 and cfg.n_positions == 577 and cfg.feature_layers == ()
        assert cfg.blocks_to_run("llava") == 3 and cfg.blocks_to_run("llama.cpp") == 2
        if kind == "llava16":
            assert cfg.grid_pinpoints == ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))
            assert cfg.patch_merge == "spatial_unpad" and cfg.has_newline
        else:
            assert not cfg.is_anyres and not cfg.has_newline


def test_random_file_config_and_params(tmp_path):
    spec = replace(TINY, pinpoints=PRESETS["default"].pinpoints, matmul_type="f16", feature_layers=(1, 2))
    path = write(tmp_path, spec)
    mm = load_mmproj(path)
    cfg = mm.cfg
    assert (cfg.dim, cfg.ffn_dim, cfg.n_layers, cfg.n_heads, cfg.proj_in, cfg.proj_hidden, cfg.out_dim) == (
        32, 64, 2, 2, 64, 48, 40)
    assert cfg.feature_layers == (1, 2) and cfg.is_anyres and not cfg.ffn_swapped
    blk = mm.params["v"]["blk"]
    assert blk["attn_q"]["weight"].shape == (2, 32, 32) and blk["ffn_up"]["weight"].shape == (2, 64, 32)
    assert mm.params["mm"]["0"]["weight"].shape == (48, 64) and mm.newline.shape == (40,)
    assert mm.params["v"]["patch_embd"]["weight"].shape == (32, 3, 14, 14)
    assert mm.f16_weights == frozenset({"patch_embd", "blk.attn_q", "blk.attn_k", "blk.attn_v", "blk.attn_out",
                                        "blk.ffn_up", "blk.ffn_down", "mm.0", "mm.2"})
    tensors = random_mmproj_tensors(spec)
    np.testing.assert_array_equal(np.asarray(blk["ffn_down"]["weight"][1]), tensors["v.blk.1.ffn_down.weight"])
    np.testing.assert_array_equal(np.asarray(mm.params["v"]["position_embd"]["weight"]),
                                  tensors["v.position_embd.weight"])


def test_legacy_ffn_names_are_swapped_into_place(tmp_path):
    modern = load_mmproj(write(tmp_path, TINY, "a.gguf"))
    legacy = load_mmproj(write(tmp_path, replace(TINY, legacy_ffn_names=True), "b.gguf"))
    assert legacy.cfg.ffn_swapped and not modern.cfg.ffn_swapped
    for kind in ("ffn_up", "ffn_down"):
        for leaf in ("weight", "bias"):
            np.testing.assert_array_equal(np.asarray(legacy.params["v"]["blk"][kind][leaf]),
                                          np.asarray(modern.params["v"]["blk"][kind][leaf]))


def test_old_file_without_projector_type(tmp_path):
    cfg = load_mmproj(write(tmp_path, replace(TINY, projector_type=None))).cfg
    assert cfg.projector == "mlp"
    norm = replace(TINY, projector="mlp_norm", projector_type=None)
    cfg = load_mmproj(write(tmp_path, norm, "yi.gguf")).cfg
    assert cfg.projector == "mlp_norm" and cfg.out_dim == 40
    # and a file that says "mlp" but carries Yi-VL's mm.3/mm.4
    assert load_mmproj(write(tmp_path, replace(norm, projector_type="mlp"), "yi2.gguf")).cfg.projector == "mlp_norm"
    no_llava = replace(TINY, projector_type=None, omit=("clip.has_llava_projector",))
    assert "projector" in one_line_error(load_mmproj, write(tmp_path, no_llava, "c.gguf"))


def test_gguf_v2_file_loads(tmp_path):
    path = write(tmp_path)
    data = bytearray(path.read_bytes())
    assert data[4:8] == (3).to_bytes(4, "little")
    data[4:8] = (2).to_bytes(4, "little")  # v2 and v3 share the layout (v3 added big-endian files)
    v2 = tmp_path / "v2.gguf"
    v2.write_bytes(bytes(data))
    assert open_gguf(v2).version == 2
    assert load_mmproj(v2).cfg == load_mmproj(path).cfg


# ---------------------------------------------------------------------------------------------
# bad files


@pytest.mark.parametrize("key", ["clip.vision.embedding_length", "clip.vision.block_count",
                                 "clip.vision.attention.head_count", "clip.vision.image_size",
                                 "clip.vision.patch_size", "clip.vision.attention.layer_norm_epsilon",
                                 "clip.vision.feed_forward_length"])
def test_missing_required_key(tmp_path, key):
    msg = one_line_error(load_mmproj, write(tmp_path, replace(TINY, omit=(key,))))
    assert key in msg and "mm.gguf" in msg


@pytest.mark.parametrize("tensor", ["v.patch_embd.weight", "v.position_embd.weight", "v.blk.1.attn_k.weight",
                                    "v.blk.0.ffn_down.bias", "v.pre_ln.weight", "mm.0.weight", "mm.2.bias"])
def test_missing_tensor(tmp_path, tensor):
    msg = one_line_error(load_mmproj, write(tmp_path, replace(TINY, omit=(tensor,))))
    assert tensor in msg


def test_missing_newline_for_spatial_unpad(tmp_path):
    spec = replace(TINY, pinpoints=PRESETS["default"].pinpoints, omit=("model.image_newline",))
    assert "image_newline" in one_line_error(load_mmproj, write(tmp_path, spec))


def _rewrite(src, dst, *, drop=(), arch="clip", metadata=None, tensors=None) -> None:
    """Copy an mmproj GGUF with some metadata replaced or tensors swapped (for malformed-file tests)."""
    g = open_gguf(src)
    w = gguf.GGUFWriter(str(dst), arch=arch)
    for key, value in {**{k: v for k, v in g.metadata.items() if k not in drop}, **(metadata or {})}.items():
        if key in ("GGUF.version", "general.architecture"):
            continue
        if isinstance(value, bool):
            w.add_bool(key, value)
        elif isinstance(value, int):
            w.add_uint32(key, value)
        elif isinstance(value, float):
            w.add_float32(key, value)
        elif isinstance(value, str):
            w.add_string(key, value)
        else:
            w.add_array(key, value)
    arrays = {n: gguf.quants.dequantize(v.raw, v.qtype).reshape(v.shape) for n, v in g.tensors.items()}
    for name, arr in {**arrays, **(tensors or {})}.items():
        if name not in drop:
            w.add_tensor(name, np.ascontiguousarray(arr, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_wrong_tensor_shape(tmp_path):
    src = write(tmp_path)
    _rewrite(src, tmp_path / "bad.gguf", tensors={"v.blk.0.attn_q.weight": np.zeros((32, 31), np.float32)})
    msg = one_line_error(load_mmproj, tmp_path / "bad.gguf")
    assert "v.blk.0.attn_q.weight" in msg and "[32, 31]" in msg


def test_unsupported_projector_type(tmp_path):
    msg = one_line_error(load_mmproj, write(tmp_path, replace(TINY, projector_type="ldp")))
    assert "'ldp'" in msg and "mlp" in msg


def test_not_an_mmproj(tmp_path):
    src = write(tmp_path)
    _rewrite(src, tmp_path / "llama.gguf", arch="llama")
    assert "language model" in one_line_error(load_mmproj, tmp_path / "llama.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file" * 10)
    assert "not a GGUF" in one_line_error(load_mmproj, tmp_path / "junk.gguf")
    assert "not found" in one_line_error(load_mmproj, tmp_path / "nope.gguf")


def test_bad_feature_layer_and_pinpoints(tmp_path):
    msg = one_line_error(load_mmproj, write(tmp_path, replace(TINY, feature_layers=(5,)), "a.gguf"))
    assert "feature_layer 5" in msg
    msg = one_line_error(load_mmproj, write(tmp_path, replace(TINY, pinpoints=((336, 500),)), "b.gguf"))
    assert "336x500" in msg


def test_projector_width_must_match_text_width(tmp_path):
    path = write(tmp_path)
    msg = one_line_error(ImageEncoder.from_gguf, path, text_dim=576)
    assert "40" in msg and "576" in msg
    assert ImageEncoder.from_gguf(path, text_dim=40).out_dim == 40


def test_vision_config_is_hashable_and_rejects_text_files():
    cfg = VisionConfig(image_size=28, patch_size=14, dim=8, ffn_dim=16, n_layers=1, n_heads=2, norm_eps=1e-5,
                       image_mean=(0.5,) * 3, image_std=(0.5,) * 3, projector="mlp", proj_in=8, proj_hidden=8,
                       out_dim=8)
    assert hash(cfg) == hash(replace(cfg))
    with pytest.raises(LlavaError, match="language model"):
        VisionConfig.from_metadata({"general.architecture": "llama"}, {}, "m.gguf")


def test_default_random_mmproj(tmp_path, monkeypatch):
    from llava_jax.random_mmproj import default_mmproj_path

    monkeypatch.setenv("LLAVA_JAX_CACHE", str(tmp_path))
    path = default_mmproj_path()
    assert path.parent == tmp_path and default_mmproj_path() == path
    first = path.read_bytes()
    path.unlink()
    assert default_mmproj_path().read_bytes() == first  # deterministic
    enc = ImageEncoder.from_gguf(path, text_dim=576)
    assert enc.cfg.is_anyres and enc.cfg.patch_merge == "spatial_unpad"
    # 200×150 ties between 336×672 and 672×336; the first pinpoint, (w, h) = (336, 672), wins: 1×2 tiles
    assert enc.n_tokens((640, 488)) == 2340 and enc.n_tokens((200, 150)) == 1026
