"""The real SmolLM2 on 8 simulated CPU devices (meshes data=2 x model=4 and data=1 x model=8) computes the
same logits and greedy text as on one device, with the weights really split across devices.

The sharded runs happen in a subprocess (tests/sharded_smollm2.py): XLA_FLAGS must hold
`--xla_force_host_platform_device_count=8` before jax is imported. The one-device side runs here, on the
model shared with the other test modules.

Tolerance 5e-4, not bit equality (nor the 1e-5 first hoped for): with weights split on the `model` axis,
matmuls whose contraction dimension is sharded (attn_output over heads, ffn_down over the FFN width) are
per-device partial sums followed by an all-reduce, a different summation order than one device's single
dot, and this 30-layer model amplifies rounding noise: moving every element of one norm vector
(blk_0.attn_norm) by a single f32 ulp moves the logits by 7e-5 (measured). Measured sharded-vs-one-device
max diffs: 1.1e-4 (1x2), 1.3e-4 (2x4), 1.2e-4 (1x8), on logits of magnitude ~20; a data-only mesh (8x1,
batch 1, weights replicated) is bit-exact. A real sharding bug (a missing all-reduce, a wrong shard
offset) moves logits by O(1).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from smollm2_model import shared_smollm2

REPO = Path(__file__).resolve().parents[1]
MESHES = [(2, 4), (1, 8)]
LOGIT_PROMPTS = (1, 4)  # reference prompts: ChatML chat (19 tokens) and Unicode with tabs (28 tokens)
GEN_PROMPTS = (1, 3)  # neither stops at EOS within 32 tokens, so both rows run the full length
N_NEW = 32
SHARDED_TOL = 5e-4

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sharded(smollm2_path, smollm2_reference, tmp_path_factory):
    out = tmp_path_factory.mktemp("sharded")
    spec = {"meshes": MESHES, "n": N_NEW,
            "logit_prompts": [smollm2_reference[i]["ids"] for i in LOGIT_PROMPTS],
            "gen_prompts": [smollm2_reference[i]["prompt"] for i in GEN_PROMPTS]}
    (out / "spec.json").write_text(json.dumps(spec))
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "sharded_smollm2.py"), str(out / "spec.json"), str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads((out / "result.json").read_text())
    assert result["n_devices"] == 8
    for data, model in MESHES:
        with np.load(out / f"logits_{data}x{model}.npz") as npz:
            result["meshes"][f"{data}x{model}"]["logits"] = [npz[f"p{i}"] for i in range(len(LOGIT_PROMPTS))]
    return result["meshes"]


@pytest.fixture(scope="module")
def one_device(smollm2_path, smollm2_reference):
    llm = shared_smollm2()
    assert llm.engine.mesh.devices.size == 1
    logits = [llm.logits(smollm2_reference[i]["ids"]) for i in LOGIT_PROMPTS]
    res = llm.generate_batch([smollm2_reference[i]["prompt"] for i in GEN_PROMPTS], max_new_tokens=N_NEW, temperature=0)
    return {"logits": logits, "greedy_ids": [r.token_ids for r in res], "greedy_text": [r.text for r in res]}


@pytest.mark.parametrize("mesh", [f"{d}x{m}" for d, m in MESHES])
def test_logits_equal_one_device(mesh, sharded, one_device):
    diffs = [float(np.abs(a - b).max()) for a, b in zip(sharded[mesh]["logits"], one_device["logits"], strict=True)]
    print(f"mesh {mesh}: max abs logit diff vs one device {max(diffs):.3g}")
    assert max(diffs) < SHARDED_TOL, diffs


@pytest.mark.parametrize("mesh", [f"{d}x{m}" for d, m in MESHES])
def test_greedy_equal_one_device(mesh, sharded, one_device, smollm2_reference):
    assert sharded[mesh]["greedy_ids"] == one_device["greedy_ids"]
    assert sharded[mesh]["greedy_text"] == one_device["greedy_text"]
    # and both equal llama.cpp's greedy continuations (the batch rows are left-padded: padding-invariant)
    assert one_device["greedy_ids"] == [smollm2_reference[i]["greedy_ids"] for i in GEN_PROMPTS]


@pytest.mark.parametrize("mesh,model", [("2x4", 4), ("1x8", 8)])
def test_weights_are_sharded(mesh, model, sharded):
    info = sharded[mesh]
    data = 8 // model
    assert info["mesh_shape"] == {"data": data, "model": model}
    p = info["params"]
    # [out, in] layout: q/k rows (heads) and the FFN / output matrices split on `model`
    assert p["blk_0.attn_q"]["spec"] == ["model", None]
    assert p["blk_0.attn_q"]["shard_shapes"] == [[576 // model, 576]]
    assert p["blk_0.attn_k"]["spec"] == ["model", None]  # 192 rows = 3 KV heads x 64 divide by 4 and 8
    # The default (quantized) storage shards a matrix's blocks: by rows, and over K only where the blocks
    # per row divide (attn_output's 576 values are 18 Q4_1 blocks: not by 4 or 8, so replicated)
    assert p["blk_0.attn_q"].get("quantized") and p["blk_0.ffn_down"].get("quantized")
    assert p["blk_0.attn_output"]["spec"] == [None, None]
    assert p["blk_0.ffn_down"]["spec"] == [None, "model"]
    assert p["blk_0.ffn_down"]["shard_shapes"] == [[576, 1536 // model]]
    assert p["token_embd"]["spec"] == ["model", None]
    assert p["token_embd"]["shard_shapes"] == [[49152 // model, 576]]
    assert p["blk_0.attn_norm"]["spec"] in ([], [None])  # small vectors replicated
    assert p["blk_0.attn_norm"]["shard_shapes"] == [[576]]
    for leaf in p.values():
        assert leaf["n_devices"] == 8
    # KV cache [layers, batch, seq, kv_heads, head_dim]: batch on `data` when it divides; 3 KV heads do not
    # divide 4 or 8, so the head axis stays replicated
    kv = info["kv_cache"]
    assert kv["spec"][:2] == [None, "data" if data > 1 else None]
    assert kv["shard_shapes"] == [[30, 2 // data, 256, 3, 64]]
