"""Helper for test_sharding.py, run in a subprocess: the real SmolLM2 on a mesh of simulated CPU devices.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/sharded_smollm2.py SPEC.json OUT_DIR

(the flag must be set before jax is imported, hence the separate process). SPEC.json:
`{"meshes": [[data, model], ...], "logit_prompts": [[ids], ...], "gen_prompts": [text, ...], "n": N}`.
For each mesh it loads the model, then writes to OUT_DIR `logits_{data}x{model}.npz` (teacher-forced
logits per prompt, keys p0, p1, ...) and adds to `result.json`: the partition specs and per-device shard
shapes of a few weights and of the KV cache, and the greedy `generate_batch` token ids / texts.
"""

from __future__ import annotations

import json
import os
import sys
import time


def describe(arr) -> dict:
    """Partition spec and per-device shard shapes of a weight, in its logical [N, K] terms (a QTensor's
    blocks [N, n_blocks, type_size] are reported as the rows and values they hold)."""
    from llava_jax.qtensor import QTensor

    if isinstance(arr, QTensor):
        spec = list(arr.blocks.sharding.spec) + [None] * 3
        shapes = {(s.data.shape[0], s.data.shape[1] * arr.block_size) for s in arr.blocks.addressable_shards}
        return {"spec": [list(a) if isinstance(a, tuple) else a for a in spec[:2]], "quantized": True,
                "n_devices": len(arr.blocks.sharding.device_set), "shard_shapes": sorted(shapes)}
    return {"spec": [list(a) if isinstance(a, tuple) else a for a in arr.sharding.spec],
            "n_devices": len(arr.sharding.device_set),
            "shard_shapes": sorted({tuple(s.data.shape) for s in arr.addressable_shards})}


def main(spec_path: str, out_dir: str) -> None:
    spec = json.loads(open(spec_path).read())
    import jax
    import numpy as np

    import llava_jax
    from llava_jax.sharding import make_mesh

    result = {"n_devices": jax.device_count(), "meshes": {}}
    for data, model in spec["meshes"]:
        key = f"{data}x{model}"
        t0 = time.perf_counter()
        llm = llava_jax.load(mesh=make_mesh(data, model))
        p = llm.engine.params
        info = {"load_s": time.perf_counter() - t0, "mesh_shape": dict(llm.engine.mesh.shape)}
        info["params"] = {name: describe(leaf) for name, leaf in {
            "blk_0.attn_q": p["blk_0"]["attn_q"]["weight"],
            "blk_0.attn_k": p["blk_0"]["attn_k"]["weight"],
            "blk_0.attn_output": p["blk_0"]["attn_output"]["weight"],
            "blk_0.ffn_down": p["blk_0"]["ffn_down"]["weight"],
            "blk_0.attn_norm": p["blk_0"]["attn_norm"]["weight"],
            "token_embd": p["token_embd"]["weight"],
        }.items()}
        cache = llm.engine.new_cache(2, 256)
        info["kv_cache"] = describe(cache.k)
        del cache
        t0 = time.perf_counter()
        logits = {f"p{i}": llm.logits(ids) for i, ids in enumerate(spec["logit_prompts"])}
        info["logits_s"] = time.perf_counter() - t0
        np.savez(os.path.join(out_dir, f"logits_{key}.npz"), **logits)
        t0 = time.perf_counter()
        res = llm.generate_batch(spec["gen_prompts"], max_new_tokens=spec["n"], temperature=0)
        info["generate_s"] = time.perf_counter() - t0
        info["greedy_ids"] = [r.token_ids for r in res]
        info["greedy_text"] = [r.text for r in res]
        result["meshes"][key] = info
        del llm, p
        print(f"{key}: done", flush=True)
    with open(os.path.join(out_dir, "result.json"), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
