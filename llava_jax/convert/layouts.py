"""Which LLaVA checkpoint layout a directory holds, and where each weight lives in it.

`detect_layout(model_dir, clip_dir)` reads `config.json` and returns a `Layout`: the hyperparameters of the
text and vision halves (`TextParams`, `VisionParams`) and resolvers from a canonical weight name to the
array. Canonical names are HF's own, relative to the sub-model:

  text:      "embed_tokens.weight", "layers.3.self_attn.q_proj.weight", "norm.weight", "lm_head.weight"
  vision:    "embeddings.patch_embedding.weight", "encoder.layers.0.mlp.fc1.bias", "pre_layrnorm.weight"
  projector: "0.weight", "2.bias" (the two linear layers of the mlp2x_gelu projector)
  newline:   the LLaVA-NeXT `image_newline` vector

Layouts:
  llava-hf         `LlavaForConditionalGeneration` (both the transformers 4.x names `language_model.model.*`,
                   `vision_tower.vision_model.*` and the 5.x names `model.language_model.*`, `vision_tower.*`)
  llava-next-hf    `LlavaNextForConditionalGeneration` (+ `image_newline`, `image_grid_pinpoints` as (h, w))
  llava-1.5        original `LlavaLlamaForCausalLM` / `LlavaMistralForCausalLM`, `model.mm_projector.*`, the
                   vision tower a separate CLIP directory (`--clip`, a local `mm_vision_tower`, or the HF cache)
  llava-1.6        original checkpoint with `image_grid_pinpoints` (w, h) / anyres, the vision tower inside
                   (`model.vision_tower.vision_tower.vision_model.*`) and `model.image_newline`

Sizes (hidden, FFN, layers, vocab, patch, image) are read from the weight shapes, which cannot be wrong;
head counts, epsilons and activations from the configs, with the transformers defaults where a config
omits them (llava-hf 4.x configs only store values that differ from the defaults).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from llava_jax.convert.checkpoint import Checkpoint
from llava_jax.errors import LlavaError

OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

# transformers' defaults for keys a config may omit
_CLIP_VISION_DEFAULTS = {"num_attention_heads": 12, "layer_norm_eps": 1e-5, "hidden_act": "quick_gelu",
                         "projection_dim": 512}
_TEXT_DEFAULTS = {
    "llama": {"num_attention_heads": 32, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
              "max_position_embeddings": 2048},
    "mistral": {"num_attention_heads": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
                "max_position_embeddings": 4096 * 32},
}
# vision towers named by `mm_vision_tower` whose hyperparameters we know without their directory
_KNOWN_TOWERS = {
    "openai/clip-vit-large-patch14-336": {"hidden_size": 1024, "num_hidden_layers": 24, "image_size": 336,
                                          "num_attention_heads": 16, "layer_norm_eps": 1e-5,
                                          "hidden_act": "quick_gelu", "projection_dim": 768},
    "openai/clip-vit-large-patch14": {"hidden_size": 1024, "num_hidden_layers": 24, "image_size": 224,
                                      "num_attention_heads": 16, "layer_norm_eps": 1e-5,
                                      "hidden_act": "quick_gelu", "projection_dim": 768},
}
_ORIGINAL_ARCHS = ("LlavaLlamaForCausalLM", "LlavaMistralForCausalLM")


@dataclass(frozen=True)
class TextParams:
    hidden_size: int
    intermediate_size: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    context_length: int
    rms_eps: float
    rope_theta: float
    rope_scaling: tuple[str, float] | None  # ("linear", factor) or None
    vocab_size: int
    tied: bool
    attention_bias: bool
    token_ids: dict[str, int]  # bos/eos/pad/unk ids given by config.json


@dataclass(frozen=True)
class VisionParams:
    image_size: int
    patch_size: int
    hidden_size: int
    intermediate_size: int
    n_layers: int  # layers in the checkpoint
    n_heads: int
    layer_norm_eps: float
    use_gelu: bool  # False: quick_gelu
    projection_dim: int
    feature_layers: list[int]  # hidden_states indices (0 = embeddings), non-negative
    image_mean: list[float]
    image_std: list[float]
    pinpoints: list[int] | None  # flat (w, h) pairs; None for LLaVA-1.5
    patch_merge_type: str | None
    has_patch_bias: bool

    @property
    def block_count(self) -> int:
        """Layers kept in the mmproj file: those up to the deepest selected hidden state."""
        return max(self.feature_layers)


Getter = Callable[[], np.ndarray]


@dataclass
class Layout:
    kind: str
    model_dir: Path
    clip_dir: Path | None
    config: dict
    text: TextParams
    vision: VisionParams
    model: Checkpoint
    vision_ckpt: Checkpoint
    text_prefixes: tuple[str, ...]
    lm_head_names: tuple[str, ...]
    vision_prefixes: tuple[str, ...]
    projector_prefixes: tuple[str, ...]
    projector_rename: dict[str, str]
    newline_names: tuple[str, ...] = field(default=())

    # ---- resolvers: canonical name → (shape, loader) --------------------------------------------------------
    def _find(self, ckpt: Checkpoint, candidates: list[str], what: str) -> tuple[tuple[int, ...], Getter]:
        for name in candidates:
            if name in ckpt:
                return ckpt.shape(name), (lambda n=name: ckpt.get(n))
        raise LlavaError(f"missing tensor {what} in {ckpt.dir} (looked for {', '.join(candidates[:3])})")

    def text_tensor(self, name: str) -> tuple[tuple[int, ...], Getter]:
        if name == "lm_head.weight":
            return self._find(self.model, list(self.lm_head_names), name)
        return self._find(self.model, [p + name for p in self.text_prefixes], name)

    def has_text_tensor(self, name: str) -> bool:
        names = self.lm_head_names if name == "lm_head.weight" else [p + name for p in self.text_prefixes]
        return any(n in self.model for n in names)

    def vision_tensor(self, name: str) -> tuple[tuple[int, ...], Getter]:
        return self._find(self.vision_ckpt, [p + name for p in self.vision_prefixes], f"vision {name}")

    def has_vision_tensor(self, name: str) -> bool:
        return any(p + name in self.vision_ckpt for p in self.vision_prefixes)

    def projector_tensor(self, name: str) -> tuple[tuple[int, ...], Getter]:
        index, leaf = name.split(".", 1)
        index = self.projector_rename.get(index, index)
        return self._find(self.model, [f"{p}{index}.{leaf}" for p in self.projector_prefixes], f"projector {name}")

    def newline_tensor(self) -> tuple[tuple[int, ...], Getter]:
        return self._find(self.model, list(self.newline_names), "image_newline")


# ---- detection --------------------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise LlavaError(f"cannot read {path}: {str(e).splitlines()[0][:200]}") from None


def detect_layout(model_dir: str | os.PathLike[str], clip_dir: str | os.PathLike[str] | None = None,
                  text_only: bool = False) -> Layout:
    """Read MODEL_DIR/config.json, find the vision tower, and index the weights. Raises LlavaError.

    text_only: skip the vision half (`Layout.vision` is None); an original LLaVA-1.5 then needs no CLIP dir.
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise LlavaError(f"model directory not found: {model_dir}")
    if clip_dir is not None and not Path(clip_dir).is_dir():
        raise LlavaError(f"--clip directory not found: {clip_dir}")
    cfg_path = model_dir / "config.json"
    if not cfg_path.is_file():
        raise LlavaError(f"no config.json in {model_dir}: not a LLaVA checkpoint directory")
    config = _read_json(cfg_path)
    arch = (config.get("architectures") or [None])[0]
    if arch == "LlavaForConditionalGeneration":
        return _hf_layout(model_dir, config, "llava-hf", clip_dir, text_only)
    if arch == "LlavaNextForConditionalGeneration":
        return _hf_layout(model_dir, config, "llava-next-hf", clip_dir, text_only)
    if arch in _ORIGINAL_ARCHS:
        return _original_layout(model_dir, config, clip_dir, text_only)
    raise LlavaError(
        f"unknown checkpoint layout in {model_dir}: architectures={config.get('architectures')!r}, "
        f"model_type={config.get('model_type')!r} (expected LlavaForConditionalGeneration, "
        "LlavaNextForConditionalGeneration or LlavaLlamaForCausalLM/LlavaMistralForCausalLM)")


def _hf_layout(model_dir: Path, config: dict, kind: str, clip_dir, text_only: bool) -> Layout:
    text_cfg = config.get("text_config") or {}
    vision_cfg = config.get("vision_config") or {}
    if vision_cfg.get("model_type", "clip_vision_model") != "clip_vision_model":
        raise LlavaError(f"unsupported vision tower {vision_cfg.get('model_type')!r} in {model_dir}: only CLIP is supported")
    strategy = config.get("vision_feature_select_strategy", "default")
    if strategy != "default":
        raise LlavaError(f"unsupported vision_feature_select_strategy {strategy!r} (only 'default' is supported)")
    act = config.get("projector_hidden_act", "gelu")
    if act != "gelu":
        raise LlavaError(f"unsupported projector_hidden_act {act!r} (LLaVA's mlp projector uses gelu)")
    model = Checkpoint(model_dir)
    layout = Layout(
        kind=kind, model_dir=model_dir, clip_dir=Path(clip_dir) if clip_dir else None, config=config,
        text=None, vision=None, model=model, vision_ckpt=model,  # type: ignore[arg-type]
        text_prefixes=("model.language_model.", "language_model.model."),
        lm_head_names=("lm_head.weight", "language_model.lm_head.weight"),
        vision_prefixes=("model.vision_tower.vision_model.", "vision_tower.vision_model.", "model.vision_tower.",
                         "vision_tower."),
        projector_prefixes=("model.multi_modal_projector.", "multi_modal_projector."),
        projector_rename={"0": "linear_1", "2": "linear_2"},
        newline_names=("model.image_newline", "image_newline"),
    )
    pinpoints = merge = None
    if kind == "llava-next-hf":
        pairs = config.get("image_grid_pinpoints") or [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
        pinpoints = _flatten_pinpoints(pairs, swap=True)  # transformers stores (height, width)
        merge = "spatial_unpad"
    layout.text = _text_params(layout, text_cfg, config)
    if text_only:
        return layout
    mean, std = _mean_std([model_dir] + ([Path(clip_dir)] if clip_dir else []))
    layout.vision = _vision_params(layout, vision_cfg, config.get("vision_feature_layer", -2), mean, std,
                                   pinpoints, merge)
    return layout


def _original_layout(model_dir: Path, config: dict, clip_dir, text_only: bool) -> Layout:
    select = config.get("mm_vision_select_feature", "patch")
    if select != "patch":
        raise LlavaError(f"unsupported mm_vision_select_feature {select!r} (only 'patch' is supported)")
    proj = config.get("mm_projector_type", "linear")
    if proj != "mlp2x_gelu":
        raise LlavaError(f"unsupported mm_projector_type {proj!r} (only mlp2x_gelu is supported)")
    model = Checkpoint(model_dir)
    inside = "model.vision_tower.vision_tower.vision_model."
    tower_inside = inside + "embeddings.patch_embedding.weight" in model
    anyres = str(config.get("image_aspect_ratio", "")).startswith("anyres") or "image_grid_pinpoints" in config
    tower_name = config.get("mm_vision_tower") or config.get("vision_tower")
    found = Path(clip_dir) if clip_dir else _find_tower_dir(tower_name, model_dir)
    if text_only:
        layout = Layout(kind="llava-1.6" if anyres else "llava-1.5", model_dir=model_dir, clip_dir=found,
                        config=config, text=None, vision=None, model=model, vision_ckpt=model,  # type: ignore[arg-type]
                        text_prefixes=("model.",), lm_head_names=("lm_head.weight",), vision_prefixes=(),
                        projector_prefixes=(), projector_rename={})
        layout.text = _text_params(layout, config, config)
        return layout
    if found is None and not tower_inside:
        raise LlavaError(f"vision tower {tower_name!r} not found: pass its local CLIP directory with --clip")
    if found is not None:
        clip_cfg = _clip_vision_config(found)
    elif tower_name in _KNOWN_TOWERS:
        clip_cfg = dict(_KNOWN_TOWERS[tower_name])
    else:
        raise LlavaError(f"vision tower {tower_name!r} not found (its weights are in the checkpoint but its "
                         "config is not): pass its local CLIP directory with --clip")
    if tower_inside:
        vision_ckpt, vision_prefixes = model, (inside,)
    else:
        assert found is not None
        vision_ckpt = Checkpoint(found)
        vision_prefixes = ("vision_model.", "vision_tower.vision_model.", "model.vision_tower.vision_tower.vision_model.",
                           "")
    kind = "llava-1.6" if anyres else "llava-1.5"
    layout = Layout(
        kind=kind, model_dir=model_dir, clip_dir=found, config=config, text=None, vision=None,  # type: ignore[arg-type]
        model=model, vision_ckpt=vision_ckpt, text_prefixes=("model.",), lm_head_names=("lm_head.weight",),
        vision_prefixes=vision_prefixes, projector_prefixes=("model.mm_projector.",), projector_rename={},
        newline_names=("model.image_newline",),
    )
    pinpoints = merge = None
    if anyres:
        pairs = config.get("image_grid_pinpoints")
        if pairs is None:
            raise LlavaError("image_aspect_ratio is anyres but config.json has no image_grid_pinpoints")
        pinpoints = _flatten_pinpoints(pairs, swap=False)  # LLaVA stores (width, height)
        merge = config.get("mm_patch_merge_type", "flat")
        if merge not in ("flat", "spatial_unpad"):
            raise LlavaError(f"unsupported mm_patch_merge_type {merge!r} (flat or spatial_unpad)")
    layout.text = _text_params(layout, config, config)
    mean, std = _mean_std([model_dir] + ([found] if found else []))
    layout.vision = _vision_params(layout, clip_cfg, config.get("mm_vision_select_layer", -2), mean, std,
                                   pinpoints, merge)
    if found is None:  # hyperparameters from the table of known towers: the weights must be that tower
        v = layout.vision
        if (v.hidden_size, v.n_layers, v.image_size) != tuple(clip_cfg[k] for k in ("hidden_size",
                                                                                   "num_hidden_layers",
                                                                                   "image_size")):
            raise LlavaError(f"the vision tower in the checkpoint is not {tower_name} (width {v.hidden_size}, "
                             f"{v.n_layers} layers): pass its local CLIP directory with --clip")
    return layout


def _flatten_pinpoints(pairs, swap: bool) -> list[int]:
    if not isinstance(pairs, list) or not all(isinstance(p, (list, tuple)) and len(p) == 2 for p in pairs):
        raise LlavaError(f"unsupported image_grid_pinpoints {str(pairs)[:80]!r}: expected a list of [w, h] pairs")
    flat: list[int] = []
    for a, b in pairs:
        flat += [int(b), int(a)] if swap else [int(a), int(b)]
    return flat


def _hf_cache_dirs() -> list[Path]:
    roots = []
    if os.environ.get("HF_HUB_CACHE"):
        roots.append(Path(os.environ["HF_HUB_CACHE"]))
    home = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface"))
    roots.append(home / "hub")
    return roots


def _find_tower_dir(name: str | None, model_dir: Path) -> Path | None:
    """A local directory for `mm_vision_tower`: the path itself, relative to the model, or in the HF cache."""
    if not name:
        return None
    for cand in (Path(name), model_dir / name):
        if (cand / "config.json").is_file():
            return cand
    if re.fullmatch(r"[\w.-]+/[\w.-]+", name):
        for root in _hf_cache_dirs():
            snaps = sorted((root / f"models--{name.replace('/', '--')}" / "snapshots").glob("*/config.json"))
            if snaps:
                return snaps[-1].parent
    return None


def _clip_vision_config(clip_dir: Path) -> dict:
    path = clip_dir / "config.json"
    if not path.is_file():
        raise LlavaError(f"no config.json in the vision tower directory {clip_dir}")
    cfg = _read_json(path)
    if cfg.get("model_type") == "clip":
        cfg = cfg.get("vision_config") or cfg.get("vision_config_dict") or {}
    elif cfg.get("model_type") not in (None, "clip_vision_model"):
        raise LlavaError(f"unsupported vision tower {cfg.get('model_type')!r} in {clip_dir}: only CLIP is supported")
    return cfg


def _mean_std(dirs: list[Path]) -> tuple[list[float], list[float]]:
    for d in dirs:
        path = d / "preprocessor_config.json"
        if path.is_file():
            pre = _read_json(path)
            mean, std = pre.get("image_mean"), pre.get("image_std")
            if mean is not None and std is not None:
                return [float(x) for x in _triple(mean)], [float(x) for x in _triple(std)]
    return list(OPENAI_CLIP_MEAN), list(OPENAI_CLIP_STD)


def _triple(v) -> list:
    return list(v) * 3 if isinstance(v, (list, tuple)) and len(v) == 1 else (list(v) if isinstance(v, (list, tuple))
                                                                              else [v] * 3)


def _count_layers(has: Callable[[str], bool], pattern: str) -> int:
    n = 0
    while has(pattern.format(n)):
        n += 1
    return n


def _text_params(layout: Layout, cfg: dict, top: dict) -> TextParams:
    model_type = cfg.get("model_type", "llama")
    if model_type in ("llava", "llava_llama"):
        model_type = "llama"
    if model_type in ("llava_mistral",):
        model_type = "mistral"
    if model_type not in _TEXT_DEFAULTS:
        raise LlavaError(f"unsupported language model {model_type!r}: only llama and mistral bases are supported")
    d = dict(_TEXT_DEFAULTS[model_type])
    d.update({k: v for k, v in cfg.items() if v is not None})

    embed_shape, _ = layout.text_tensor("embed_tokens.weight")
    vocab, hidden = int(embed_shape[0]), int(embed_shape[1])
    n_layers = _count_layers(layout.has_text_tensor, "layers.{}.self_attn.q_proj.weight")
    if n_layers == 0:
        raise LlavaError(f"missing tensor layers.0.self_attn.q_proj.weight in {layout.model_dir}")
    ffn = int(layout.text_tensor("layers.0.mlp.gate_proj.weight")[0][0])
    n_heads = int(d["num_attention_heads"])
    head_dim = int(d.get("head_dim") or hidden // n_heads)
    q_rows = int(layout.text_tensor("layers.0.self_attn.q_proj.weight")[0][0])
    k_rows = int(layout.text_tensor("layers.0.self_attn.k_proj.weight")[0][0])
    if q_rows != n_heads * head_dim or k_rows % head_dim:
        raise LlavaError(f"attention shapes do not match the config: q_proj has {q_rows} rows for {n_heads} heads "
                         f"of {head_dim}")
    n_kv = int(d.get("num_key_value_heads") or k_rows // head_dim)
    if n_kv * head_dim != k_rows:
        raise LlavaError(f"k_proj has {k_rows} rows but the config says {n_kv} KV heads of {head_dim}")
    if "vocab_size" in cfg and int(cfg["vocab_size"]) != vocab:
        raise LlavaError(f"vocab_size {cfg['vocab_size']} in config.json but embed_tokens has {vocab} rows")

    rope = d.get("rope_parameters") or {}
    theta = float(rope.get("rope_theta", d.get("rope_theta", 10000.0)))
    scaling = d.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
    rope_scaling = None
    if scaling:
        rtype = scaling.get("rope_type", scaling.get("type"))
        if rtype not in ("linear", "default"):
            raise LlavaError(f"unsupported rope scaling {rtype!r} (only linear is supported)")
        if rtype == "linear":
            rope_scaling = ("linear", float(scaling["factor"]))
    tied = bool(cfg.get("tie_word_embeddings", top.get("tie_word_embeddings", False)))
    if not tied and not layout.has_text_tensor("lm_head.weight"):
        tied = True  # no separate head stored: the output projection is the embedding
    ids = {}
    for key in ("bos", "eos", "pad", "unk"):
        v = cfg.get(f"{key}_token_id", top.get(f"{key}_token_id"))
        if isinstance(v, list):
            v = v[0] if v else None
        if isinstance(v, int) and 0 <= v < vocab:
            ids[key] = v
    return TextParams(
        hidden_size=hidden, intermediate_size=ffn, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv,
        head_dim=head_dim, context_length=int(d["max_position_embeddings"]), rms_eps=float(d["rms_norm_eps"]),
        rope_theta=theta, rope_scaling=rope_scaling, vocab_size=vocab, tied=tied,
        attention_bias=layout.has_text_tensor("layers.0.self_attn.q_proj.bias"), token_ids=ids,
    )


def _vision_params(layout: Layout, cfg: dict, feature_layer, mean, std, pinpoints, merge) -> VisionParams:
    d = dict(_CLIP_VISION_DEFAULTS)
    d.update({k: v for k, v in cfg.items() if v is not None})
    patch_shape, _ = layout.vision_tensor("embeddings.patch_embedding.weight")
    pos_shape, _ = layout.vision_tensor("embeddings.position_embedding.weight")
    hidden, patch = int(patch_shape[0]), int(patch_shape[-1])
    n_pos = int(pos_shape[0]) - 1
    side = int(round(n_pos**0.5))
    if side * side != n_pos:
        raise LlavaError(f"vision position embedding has {n_pos + 1} rows: not a square grid plus a class token")
    n_layers = _count_layers(layout.has_vision_tensor, "encoder.layers.{}.self_attn.q_proj.weight")
    if n_layers == 0:
        raise LlavaError(f"missing tensor vision encoder.layers.0.self_attn.q_proj.weight in {layout.vision_ckpt.dir}")
    ffn = int(layout.vision_tensor("encoder.layers.0.mlp.fc1.weight")[0][0])
    n_heads = int(d["num_attention_heads"])
    if hidden % n_heads:
        raise LlavaError(f"vision width {hidden} is not divisible by {n_heads} heads")
    act = d.get("hidden_act", "quick_gelu")
    if act not in ("quick_gelu", "gelu"):
        raise LlavaError(f"unsupported vision activation {act!r} (quick_gelu or gelu)")
    layers = feature_layer if isinstance(feature_layer, list) else [feature_layer]
    feature_layers = [int(x) if int(x) >= 0 else n_layers + int(x) + 1 for x in layers]
    if not feature_layers or not all(1 <= x <= n_layers for x in feature_layers):
        raise LlavaError(f"vision feature layer {feature_layer!r} is out of range for a {n_layers}-layer tower")
    return VisionParams(
        image_size=side * patch, patch_size=patch, hidden_size=hidden, intermediate_size=ffn, n_layers=n_layers,
        n_heads=n_heads, layer_norm_eps=float(d["layer_norm_eps"]), use_gelu=act == "gelu",
        projection_dim=int(d.get("projection_dim") or 0), feature_layers=feature_layers, image_mean=mean,
        image_std=std, pinpoints=pinpoints, patch_merge_type=merge,
        has_patch_bias=layout.has_vision_tensor("embeddings.patch_embedding.bias"),
    )
