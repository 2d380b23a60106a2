"""The image-encoder half: CLIP vision tower + mlp projector (+ image_newline) → mmproj GGUF.

Keys and tensor names are those llama.cpp's CLIP loader reads (`general.architecture = clip`,
`clip.vision.*`, `v.*`, `mm.0.*` / `mm.2.*`, `model.image_newline`). The CLIP layers past the deepest
selected hidden state are dropped and that index is written as `clip.vision.feature_layer` (LLaVA's
`vision_feature_layer = -2` on a 24-layer tower → 23: 23 blocks kept). CLIP's post-layernorm only
feeds the pooled output, which LLaVA never uses, so it is not written.

FFN naming is the current one: fc1 → `ffn_up` ([ffn, width]), fc2 → `ffn_down` ([width, ffn]).
"""

from __future__ import annotations

import os
from pathlib import Path

import gguf

from llava_jax.convert.layouts import Layout, detect_layout
from llava_jax.convert.writer import OUTTYPES, Plan, check_outtype, write_plans

_BLOCK = {  # HF CLIP encoder layer → GGUF block tensor
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.out_proj": "attn_out", "layer_norm1": "ln1", "layer_norm2": "ln2",
    "mlp.fc1": "ffn_up", "mlp.fc2": "ffn_down",
}


def plan_mmproj(layout: Layout, outtype: str) -> Plan:
    """Describe the mmproj file for `layout` (raises LlavaError if a tensor is missing)."""
    check_outtype(outtype)
    v = layout.vision
    is_next = v.pinpoints is not None

    def metadata(w: gguf.GGUFWriter) -> None:
        w.add_file_type(int(OUTTYPES[outtype][1]))
        w.add_name(layout.model_dir.name)
        w.add_description(f"image encoder for LLaVA ({layout.kind}), converted by llava_jax")
        w.add_bool("clip.has_text_encoder", False)
        w.add_bool("clip.has_vision_encoder", True)
        w.add_bool("clip.has_llava_projector", True)
        w.add_string("clip.projector_type", "mlp")
        w.add_uint32("clip.vision.image_size", v.image_size)
        w.add_uint32("clip.vision.patch_size", v.patch_size)
        w.add_uint32("clip.vision.embedding_length", v.hidden_size)
        w.add_uint32("clip.vision.feed_forward_length", v.intermediate_size)
        w.add_uint32("clip.vision.projection_dim", v.projection_dim)
        w.add_uint32("clip.vision.attention.head_count", v.n_heads)
        w.add_float32("clip.vision.attention.layer_norm_epsilon", v.layer_norm_eps)
        w.add_uint32("clip.vision.block_count", v.block_count)
        w.add_array("clip.vision.image_mean", [float(x) for x in v.image_mean])
        w.add_array("clip.vision.image_std", [float(x) for x in v.image_std])
        w.add_array("clip.vision.feature_layer", [int(x) for x in v.feature_layers])
        w.add_bool("clip.use_gelu", v.use_gelu)
        if is_next:
            w.add_array("clip.vision.image_grid_pinpoints", [int(x) for x in v.pinpoints])
            w.add_string("clip.vision.mm_patch_merge_type", v.patch_merge_type or "spatial_unpad")
            w.add_string("clip.vision.image_aspect_ratio", "anyres")
            w.add_uint32("clip.vision.image_crop_resolution", v.image_size)
            w.add_uint32("clip.vision.image_split_resolution", v.image_size)

    plan = Plan("clip", metadata)

    def add_vision(gguf_name: str, hf_name: str) -> None:
        shape, load = layout.vision_tensor(hf_name)
        plan.add(gguf_name, shape, load, outtype)

    add_vision("v.patch_embd.weight", "embeddings.patch_embedding.weight")
    if v.has_patch_bias:
        add_vision("v.patch_embd.bias", "embeddings.patch_embedding.bias")
    add_vision("v.class_embd", "embeddings.class_embedding")
    add_vision("v.position_embd.weight", "embeddings.position_embedding.weight")
    add_vision("v.pre_ln.weight", "pre_layrnorm.weight")
    add_vision("v.pre_ln.bias", "pre_layrnorm.bias")
    for i in range(v.block_count):
        for hf, short in _BLOCK.items():
            for leaf in ("weight", "bias"):
                add_vision(f"v.blk.{i}.{short}.{leaf}", f"encoder.layers.{i}.{hf}.{leaf}")
    for idx in ("0", "2"):
        for leaf in ("weight", "bias"):
            shape, load = layout.projector_tensor(f"{idx}.{leaf}")
            plan.add(f"mm.{idx}.{leaf}", shape, load, outtype)
    if is_next:
        shape, load = layout.newline_tensor()
        plan.add("model.image_newline", shape, load, outtype)
    return plan


def write_mmproj(model_dir: str | os.PathLike[str], out_path: str | os.PathLike[str], outtype: str = "f16",
                 clip_dir: str | os.PathLike[str] | None = None, progress: bool = False) -> Path:
    """Convert the image-encoder half of the LLaVA checkpoint in `model_dir` to an mmproj GGUF at `out_path`.

    `clip_dir`: the CLIP directory of an original LLaVA-1.5 checkpoint (or the config of a 1.6 tower).
    Raises LlavaError for an unknown layout, a missing shard/tensor/vision tower or an unsupported out type.
    """
    check_outtype(outtype)
    layout = detect_layout(model_dir, clip_dir)
    write_plans([(plan_mmproj(layout, outtype), Path(out_path))], progress=progress)
    return Path(out_path)
