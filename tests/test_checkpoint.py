"""Orbax weight cache: `Llava.save_orbax(DIR)` / `batch_eval.py --save-orbax DIR`, then `llava_jax.load(DIR)`.

The restored model is the same model: every params leaf (text and vision) bit-identical, the same configs,
tokenizer, dtype and layer layout, identical logits and identical image embeddings. Restored onto a mesh
of 8 simulated CPU devices (data=2, model=4; a subprocess, since XLA_FLAGS must be set before jax loads)
the weights land sharded as the partition table says, with the same values. GGUF load vs Orbax restore
times of SmolLM2 are printed (pytest -s) for BENCHMARKS.md.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from tiny_mmproj import drawing, tiny_spec

import llava_jax
from llava_jax import checkpoint
from llava_jax.errors import LlavaError
from llava_jax.random_mmproj import write_random_mmproj

REPO = Path(__file__).resolve().parents[1]
PROMPT = "The lighthouse keeper climbed the stairs at dusk and"

pytestmark = pytest.mark.slow


def leaves(params) -> dict[str, np.ndarray]:
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in flat}


def assert_same_params(a, b):
    la, lb = leaves(a), leaves(b)
    assert la.keys() == lb.keys()
    for k in la:
        assert la[k].dtype == lb[k].dtype and la[k].shape == lb[k].shape, k
        assert np.array_equal(la[k], lb[k]), k


@pytest.fixture(scope="module")
def mmproj(tmp_path_factory):
    return write_random_mmproj(tmp_path_factory.mktemp("mm") / "tiny16.gguf", tiny_spec(56, True, seed=3))


@pytest.fixture(scope="module")
def saved(tmp_path_factory, smollm2_path, mmproj):
    """(GGUF-loaded model with scanned layers + mmproj, its checkpoint dir, the restored model)."""
    llm = llava_jax.load(smollm2_path, mmproj=mmproj, scan_layers=True)
    d = tmp_path_factory.mktemp("orbax") / "smollm2-scan"
    llm.save_orbax(d)
    return llm, d, llava_jax.load(d)


def test_round_trip_same_model(saved):
    llm, d, back = saved
    assert checkpoint.is_checkpoint(d)
    assert_same_params(llm.engine.params, back.engine.params)
    assert_same_params(llm.image_encoder.params, back.image_encoder.params)
    assert np.array_equal(np.asarray(llm.image_encoder.newline), np.asarray(back.image_encoder.newline))
    assert back.cfg == llm.cfg and back.image_encoder.cfg == llm.image_encoder.cfg
    assert back.engine.dtype == llm.engine.dtype and back.engine.model.scan_layers is True
    assert back.image_encoder.compat == llm.image_encoder.compat and back.n_ctx == llm.n_ctx
    assert back.metadata == llm.metadata and back.tensor_names == llm.tensor_names
    assert back.tokenize(PROMPT) == llm.tokenize(PROMPT)


def test_round_trip_identical_logits_and_image_embeddings(saved):
    llm, _, back = saved
    ids = llm.tokenize(PROMPT)
    a, b = llm.logits(ids), back.logits(ids)
    assert a.shape == (len(ids), llm.cfg.vocab_size) and np.isfinite(a).all()
    assert np.array_equal(a, b)
    img = drawing(120, 90, seed=7)
    ea, eb = llm.embed_image(img), back.embed_image(img)
    assert ea.shape == (llm.image_encoder.n_tokens(img.size), 576) and np.array_equal(ea, eb)
    ga = llm.generate("What is in the image?", [img], max_new_tokens=4, temperature=0)
    gb = back.generate("What is in the image?", [img], max_new_tokens=4, temperature=0)
    assert ga.token_ids == gb.token_ids and ga.prompt_ids == gb.prompt_ids


def test_mmproj_flag_overrides_the_cached_encoder(saved, mmproj):
    _, d, _ = saved
    other = write_random_mmproj(mmproj.with_name("other.gguf"), tiny_spec(56, True, seed=4))
    llm = llava_jax.load(d, mmproj=other)
    img = drawing(60, 40, seed=1)
    assert not np.array_equal(llm.embed_image(img), saved[2].embed_image(img))


def test_cli_save_orbax_unrolled_text_only(tmp_path, smollm2_path, capsys):
    """`batch_eval.py --save-orbax DIR` (default CPU layout: unrolled layers), then load(DIR); load times."""
    spec = importlib.util.spec_from_file_location("batch_eval", REPO / "scripts" / "batch_eval.py")
    batch_eval = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(batch_eval)
    d = tmp_path / "smollm2"
    assert batch_eval.main(["--save-orbax", str(d)]) == 0
    assert "Orbax weight cache written" in capsys.readouterr().err
    times = {"gguf": [], "orbax": []}
    for _ in range(2):  # the second round: warm page cache and dequantizer programs, as a job's restart sees
        for kind, path in (("gguf", smollm2_path), ("orbax", d)):
            t0 = time.perf_counter()
            llm = llava_jax.load(path)
            times[kind].append(time.perf_counter() - t0)
    gguf = llava_jax.load(smollm2_path)
    assert llm.engine.model.scan_layers is False and "blk_0" in llm.engine.params
    assert_same_params(gguf.engine.params, llm.engine.params)
    with capsys.disabled():
        print(f"\nSmolLM2 Q4_1 -> f32, 1 CPU device: GGUF load {times['gguf'][-1]:.2f} s (first {times['gguf'][0]:.2f}), "
              f"Orbax restore {times['orbax'][-1]:.2f} s (first {times['orbax'][0]:.2f})")


def test_checkpoint_layout_conflicts_are_errors(saved):
    """The cache holds one dtype and one layer layout; asking for another is one clear error, not ignored."""
    _, d, _ = saved
    with pytest.raises(LlavaError, match="holds float32 params, not bfloat16"):
        llava_jax.load(d, dtype="bf16")
    with pytest.raises(LlavaError, match="holds scanned layers"):
        llava_jax.load(d, scan_layers=False)
    assert llava_jax.load(d, dtype="f32", scan_layers=True).engine.model.scan_layers


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "meta.json").write_text("{}")
    with pytest.raises(LlavaError, match="not a llava_jax Orbax checkpoint"):
        checkpoint.restore(tmp_path)
    (tmp_path / "params").mkdir()
    (tmp_path / "meta.json").write_text('{"text_metadata": ')
    with pytest.raises(LlavaError, match="meta.json: not valid JSON"):
        checkpoint.restore(tmp_path)


SHARDED = r"""
import json, sys
import jax, numpy as np
from llava_jax import checkpoint
from llava_jax.sharding import make_mesh
out = {"n_devices": jax.device_count()}
for name in sys.argv[1:]:
    sharded, _ = checkpoint.restore(name, make_mesh(2, 4))
    single, _ = checkpoint.restore(name, make_mesh(1, 1))
    flat = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(sharded)[0]}
    ref = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(single)[0]}
    assert flat.keys() == ref.keys()
    equal = all(np.array_equal(np.asarray(flat[k]), np.asarray(ref[k])) for k in flat)
    out[name] = {"equal": equal, "leaves": {k: {"spec": [a for a in x.sharding.spec], "shape": list(x.shape),
                 "devices": len(x.sharding.device_set), "shard": sorted({tuple(s.data.shape) for s in x.addressable_shards})}
                 for k, x in flat.items()}}
print(json.dumps(out))
"""


def test_restore_onto_8_device_mesh_shards_weights(saved, tmp_path, smollm2_path):
    _, scanned, _ = saved
    unrolled = tmp_path / "unrolled"
    llava_jax.load(smollm2_path).save_orbax(unrolled)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", SHARDED, str(scanned), str(unrolled)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["n_devices"] == 8
    for name, blk in ((str(scanned), "['text']['blk']"), (str(unrolled), "['text']['blk_0']")):
        info = out[name]
        assert info["equal"]  # the same values as restored onto one device
        lv = info["leaves"]
        lead = [None] if blk.endswith("['blk']") else []  # scanned blocks: a leading layer axis
        expect = {  # GGUF [out, in] layouts: (vocab, embed), (heads, embed), (embed, ffw), (embed,)
            "['text']['token_embd']['weight']": ([], ["model", None], [49152 // 4, 576]),
            f"{blk}['attn_q']['weight']": (lead, ["model", None], [576 // 4, 576]),
            f"{blk}['ffn_down']['weight']": (lead, [None, "model"], [576, 1536 // 4]),
            f"{blk}['attn_norm']['weight']": (lead, [None], [576]),
        }
        for key, (prefix, spec, shard) in expect.items():
            if key + "['blocks']" in lv:  # quantized: blocks [*lead, N, n_blocks, type_size], split by rows
                leaf = lv[key + "['blocks']"]
                assert leaf["spec"][:len(prefix) + 1] == prefix + spec[:1], (key, leaf)
                assert leaf["devices"] == 8 and leaf["shard"][0][len(prefix)] == shard[0], (key, leaf)
                continue
            leaf = lv[key]
            assert leaf["spec"] == prefix + spec, (key, leaf)
            assert leaf["devices"] == 8 and leaf["shard"] == [leaf["shape"][:len(prefix)] + shard], (key, leaf)
    vision = [v for k, v in out[str(scanned)]["leaves"].items() if k.startswith("['vision']")]
    assert vision and all(all(a is None for a in v["spec"]) and v["devices"] == 8 for v in vision)  # replicated
