"""Tiny random HF LLaVA checkpoints, built in-process with a fixed seed, for conversion and parity tests.

Builders (plain functions, usable outside pytest) write a `save_pretrained` directory and return its path:

- `build_llava15(out_dir, tokenizer="spm"|"bpe", tie_word_embeddings=False)`: `LlavaForConditionalGeneration`
- `build_llava16(out_dir, tokenizer="spm"|"bpe")`: `LlavaNextForConditionalGeneration` (pinpoints, image_newline)
- `to_original_layout(hf_dir, out_dir)`: the same weights in the original LLaVA (liuhaotian) layout; returns
  `(model_dir, clip_dir)`: for 1.5 a full CLIP directory (the vision weights live only there), for 1.6 a
  config-only CLIP directory (the weights are inside the checkpoint; the tiny tower's head count is not
  in the LLaVA config, so `--clip` supplies it).

Session-scoped pytest fixtures (`from hf_fixtures import *  # noqa: F403` in a test module, or
`pytest_plugins = ["hf_fixtures"]` in tests/conftest.py; either way each model is built once per run):
`hf_llava15_dir`, `hf_llava16_dir`, `hf_llava15_bpe_dir` (→ Path), `orig_llava15_dirs`, `orig_llava16_dirs`
(→ (model_dir, clip_dir)).

What is in each model (all f32):
- vision: CLIP, image 336, patch 14 (576 patches + class token), width 64, 4 heads, FFN 128, 3 layers,
  quick-GELU, pre-LN; LLaVA reads hidden_states[-2], so only 2 layers matter.
- projector: Linear(64→64), GELU, Linear(64→64).
- text: LLaMA, hidden 64, 2 layers, 4 query heads / 2 KV heads (GQA, head_dim 16), FFN 128, rms eps 1e-5,
  rope theta 10000, context 4096 (1.6 prompts with four tiles reach ~2.9k tokens). Untied lm_head.
- vocab (spm): a SentencePiece BPE model trained here (`SPM_PIECES` = 384 pieces: <unk>, <s>, </s>,
  256 byte pieces <0x00>…<0xFF>, merges), then `<image>` = 384 and `<pad>` = 385 as added special tokens,
  and the embedding padded to `VOCAB_SIZE` = 448 rows (like llava-hf's 32064); `IMAGE_TOKEN_ID` = 384.
- vocab (bpe): a byte-level BPE with the Llama-3 pre-tokenizer regex, specials appended at the end.
- image processor: `LlavaImageProcessor` (shortest edge 336, center crop 336, do_pad=True: pad to square
  with the mean colour as LLaVA-1.5 does) / `LlavaNextImageProcessor` (pinpoints below), OpenAI CLIP mean/std.
- weights are re-drawn after HF's init with O(1) scales (HF's std 0.02 would make every logit ~0 and a
  parity test toothless): linear weights N(0, 1/fan_in), embeddings N(0, 1), norm weights 1 + N(0, 0.1²).

Note on HF's LlamaTokenizer built from tokenizer.model (transformers 5): it drops the extra "▁" that
SentencePiece (and llama.cpp) produce for text starting with a space; use prompts without a leading space
when comparing tokenizations.
"""

from __future__ import annotations

import io
import json
import random
import shutil
from pathlib import Path

import numpy as np

SEED = 0
SPM_PIECES = 384
IMAGE_TOKEN = "<image>"
PAD_TOKEN = "<pad>"
IMAGE_TOKEN_ID = SPM_PIECES
PAD_TOKEN_ID = SPM_PIECES + 1
VOCAB_SIZE = 448
PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
LLAVA15_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: {{ message['content'] }} "
    "{% else %}ASSISTANT: {{ message['content'] }}</s>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
    r"\s+(?!\S)|\s+"
)
BPE_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                IMAGE_TOKEN, PAD_TOKEN]

_WORDS = (
    "the a of and to in is was for on that with as by at from this it be are or an have not were which but had "
    "their one all there been has when who will more no if out so said what up its about into than them can only "
    "other new some could time these two may then do first any my now such like our over man me even most made "
    "after also did many before must through back years where much your way well down should because each just "
    "those people how too little state good very make world still own see men work long get here between both "
    "life being under never day same another know while last might us great old year off come since against go "
    "came right used take three image picture photo shows cat dog red blue green describe what color shape"
).split()


def corpus(n_lines: int = 400, seed: int = SEED) -> list[str]:
    """Deterministic English-like lines (with digits, punctuation, chat markers) to train the tokenizers."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        s = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 14)))
        if rng.random() < 0.3:
            s = s.capitalize() + rng.choice([".", "?", "!", ","])
        if rng.random() < 0.2:
            s += f" {rng.randint(0, 9999)}"
        if rng.random() < 0.1:
            s = f"USER: {s} ASSISTANT:"
        lines.append(s)
    return lines


def _added(content: str) -> dict:
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
            "special": True}


def write_spm_tokenizer(out_dir: str | Path) -> Path:
    """Train a LLaMA-style SentencePiece BPE model; write tokenizer.model, tokenizer_config.json,
    special_tokens_map.json into out_dir. Ids: 0 <unk>, 1 <s>, 2 </s>, 3..258 bytes, then merges."""
    import sentencepiece as spm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus()), model_writer=buf, model_type="bpe", vocab_size=SPM_PIECES,
        byte_fallback=True, split_digits=True, add_dummy_prefix=True, remove_extra_whitespaces=False,
        normalization_rule_name="identity", allow_whitespace_only_pieces=True, unk_id=0, bos_id=1, eos_id=2,
        pad_id=-1, num_threads=1, character_coverage=1.0, input_sentence_size=0, shuffle_input_sentence=False,
        minloglevel=2,
    )
    (out / "tokenizer.model").write_bytes(buf.getvalue())
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "add_bos_token": True,
        "add_eos_token": False,
        "legacy": False,
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": PAD_TOKEN,
        "model_max_length": 4096,
        "clean_up_tokenization_spaces": False,
        "chat_template": LLAVA15_CHAT_TEMPLATE,
        "added_tokens_decoder": {
            "0": _added("<unk>"), "1": _added("<s>"), "2": _added("</s>"),
            str(IMAGE_TOKEN_ID): _added(IMAGE_TOKEN), str(PAD_TOKEN_ID): _added(PAD_TOKEN),
        },
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    specials = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": PAD_TOKEN}
    (out / "special_tokens_map.json").write_text(json.dumps(specials, indent=2))
    return out


def write_bpe_tokenizer(out_dir: str | Path, vocab_size: int = 400) -> tuple[Path, int]:
    """Train a byte-level BPE with Llama-3's pre-tokenizer; write tokenizer.json + tokenizer_config.json.
    Returns (out_dir, number of tokens incl. the specials appended at the end)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=True)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False, special_tokens=[])
    tok.train_from_iterator(corpus(), trainer=trainer)
    tok.add_special_tokens(BPE_SPECIALS)
    bos = BPE_SPECIALS[0]
    bos_id = tok.token_to_id(bos)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, bos_id)])
    tok.save(str(out / "tokenizer.json"))
    n = tok.get_vocab_size(with_added_tokens=True)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos, "eos_token": "<|eot_id|>", "pad_token": PAD_TOKEN,
        "model_max_length": 4096,
        "clean_up_tokenization_spaces": True,
        "chat_template": (
            "{{ bos_token }}{% for message in messages %}<|start_header_id|>{{ message['role'] }}<|end_header_id|>"
            "\n\n{{ message['content'] }}<|eot_id|>{% endfor %}"
            "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
        ),
        "added_tokens_decoder": {str(tok.token_to_id(t)): _added(t) for t in BPE_SPECIALS},
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return out, n


def _text_config(vocab_size: int, bos: int, eos: int, pad: int, tie: bool):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=4096, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, bos_token_id=bos, eos_token_id=eos,
        pad_token_id=pad, tie_word_embeddings=tie, hidden_act="silu",
    )


def _vision_config():
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, image_size=336,
        patch_size=14, projection_dim=32, hidden_act="quick_gelu", layer_norm_eps=1e-5, num_channels=3,
    )


def redraw_weights(model, seed: int = SEED) -> None:
    """Overwrite every parameter with O(1)-scaled values from a seeded generator (see module docstring)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    seen: set[int] = set()
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(remove_duplicate=False), key=lambda kv: kv[0]):
            if id(p) in seen:
                continue
            seen.add(id(p))
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            leaf = name.rsplit(".", 1)[-1]
            if "norm" in name and leaf == "weight":
                value = 1.0 + 0.1 * noise
            elif leaf == "bias":
                value = 0.1 * noise
            elif p.ndim >= 2 and "embed" not in name:
                fan_in = int(np.prod(p.shape[1:]))
                value = noise / fan_in**0.5
            elif "position_embedding" in name:
                value = 0.3 * noise
            else:  # token embeddings, class embedding, image_newline
                value = noise
            p.copy_(value.to(p.dtype))


def _build(out_dir: Path, kind: str, tokenizer: str, tie_word_embeddings: bool, seed: int) -> Path:
    import torch
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaNextConfig, LlavaNextForConditionalGeneration
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if tokenizer == "spm":
        write_spm_tokenizer(out)
        vocab, bos, eos, pad, image_id = VOCAB_SIZE, 1, 2, PAD_TOKEN_ID, IMAGE_TOKEN_ID
    elif tokenizer == "bpe":
        _, n = write_bpe_tokenizer(out)
        cfg = json.loads((out / "tokenizer.json").read_text())
        ids = {t["content"]: t["id"] for t in cfg["added_tokens"]}
        vocab = -(-n // 64) * 64
        bos, eos, pad, image_id = ids["<|begin_of_text|>"], ids["<|eot_id|>"], ids[PAD_TOKEN], ids[IMAGE_TOKEN]
    else:
        raise ValueError(f"tokenizer must be 'spm' or 'bpe', not {tokenizer!r}")

    text = _text_config(vocab, bos, eos, pad, tie_word_embeddings)
    common = dict(vision_config=_vision_config(), text_config=text, image_token_index=image_id,
                  projector_hidden_act="gelu", vision_feature_layer=-2, vision_feature_select_strategy="default",
                  image_seq_length=576, tie_word_embeddings=tie_word_embeddings)
    torch.manual_seed(seed)
    if kind == "llava15":
        config = LlavaConfig(**common)
        model = LlavaForConditionalGeneration(config)
        processor = LlavaImageProcessorPil(
            size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}, do_center_crop=True, do_pad=True,
            image_mean=CLIP_MEAN, image_std=CLIP_STD, resample=3)
    else:
        config = LlavaNextConfig(**common, image_grid_pinpoints=PINPOINTS)
        model = LlavaNextForConditionalGeneration(config)
        processor = LlavaNextImageProcessorPil(
            size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}, do_center_crop=True, do_pad=True,
            image_grid_pinpoints=PINPOINTS, image_mean=CLIP_MEAN, image_std=CLIP_STD, resample=3)
    config.pad_token_id = pad
    model = model.to(torch.float32).eval()
    redraw_weights(model, seed)
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    return out


def build_llava15(out_dir: str | Path, *, tokenizer: str = "spm", tie_word_embeddings: bool = False,
                  seed: int = SEED) -> Path:
    """Tiny random llava-hf `LlavaForConditionalGeneration` checkpoint in out_dir; returns out_dir."""
    return _build(Path(out_dir), "llava15", tokenizer, tie_word_embeddings, seed)


def build_llava16(out_dir: str | Path, *, tokenizer: str = "spm", seed: int = SEED) -> Path:
    """Tiny random llava-hf `LlavaNextForConditionalGeneration` checkpoint in out_dir; returns out_dir."""
    return _build(Path(out_dir), "llava16", tokenizer, False, seed)


# ---- the original LLaVA layout (haotian-liu/LLaVA checkpoints) ------------------------------------------------


def _hf_state(hf_dir: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    state: dict[str, np.ndarray] = {}
    for f in sorted(hf_dir.glob("*.safetensors")):
        state.update(load_file(str(f)))
    return state


def _strip(name: str) -> tuple[str, str]:
    """HF name (old or new llava-hf naming) → (part, rest) with part in text/lm_head/vision/projector/newline."""
    for prefix, part in (("model.language_model.", "text"), ("language_model.model.", "text"),
                         ("language_model.lm_head.", "lm_head"), ("lm_head.", "lm_head"),
                         ("model.vision_tower.", "vision"), ("vision_tower.", "vision"),
                         ("model.multi_modal_projector.", "projector"), ("multi_modal_projector.", "projector")):
        if name.startswith(prefix):
            return part, name[len(prefix):]
    if name in ("image_newline", "model.image_newline"):
        return "newline", ""
    raise KeyError(name)


def to_original_layout(hf_dir: str | Path, out_dir: str | Path) -> tuple[Path, Path]:
    """Rewrite a tiny llava-hf checkpoint in the original LLaVA layout.

    1.5 (`LlavaForConditionalGeneration`): out_dir/model holds `LlavaLlamaForCausalLM` with `model.mm_projector.*`
    in two PyTorch `.bin` shards + index (as liuhaotian/llava-v1.5-7b ships), config `mm_vision_tower` names
    "openai/clip-vit-large-patch14-336"; out_dir/clip holds that CLIP as a `CLIPModel` directory (vision tower
    keys `vision_model.*`, plus a dummy text tower); returns (model_dir, clip_dir).
    1.6 (`LlavaNextForConditionalGeneration`): out_dir/model with the vision tower inside
    (`model.vision_tower.vision_tower.vision_model.*`), `model.image_newline`, `image_grid_pinpoints` (w, h),
    `mm_patch_merge_type`, in safetensors shards; out_dir/clip holds only the CLIP config.json and
    preprocessor_config.json; returns (model_dir, clip_dir).
    The tokenizer files are copied; the vocab size stays that of the HF model.
    """
    import torch

    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    cfg = json.loads((hf_dir / "config.json").read_text())
    is_next = cfg["architectures"][0] == "LlavaNextForConditionalGeneration"
    text, vision = cfg["text_config"], cfg["vision_config"]
    model_dir = out_dir / "model"
    model_dir.mkdir(parents=True, exist_ok=True)
    for f in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (hf_dir / f).exists():
            shutil.copy(hf_dir / f, model_dir / f)

    state = _hf_state(hf_dir)
    llm: dict[str, np.ndarray] = {}
    vis: dict[str, np.ndarray] = {}
    for name, arr in state.items():
        part, rest = _strip(name)
        if part == "text":
            llm[f"model.{rest}"] = arr
        elif part == "lm_head":
            llm[f"lm_head.{rest}"] = arr
        elif part == "projector":
            rest = rest.replace("linear_1.", "0.").replace("linear_2.", "2.")
            llm[f"model.mm_projector.{rest}"] = arr
        elif part == "newline":
            llm["model.image_newline"] = arr
        else:
            rest = rest if rest.startswith("vision_model.") else f"vision_model.{rest}"
            vis[rest] = arr
    if cfg.get("tie_word_embeddings") and "lm_head.weight" not in llm:
        llm["lm_head.weight"] = llm["model.embed_tokens.weight"]

    rope = text.get("rope_parameters") or {}
    config = {
        "architectures": ["LlavaLlamaForCausalLM"],
        "model_type": "llava_llama" if is_next else "llava",
        "hidden_size": text["hidden_size"], "intermediate_size": text["intermediate_size"],
        "num_hidden_layers": text["num_hidden_layers"], "num_attention_heads": text["num_attention_heads"],
        "num_key_value_heads": text["num_key_value_heads"],
        "max_position_embeddings": text["max_position_embeddings"], "rms_norm_eps": text["rms_norm_eps"],
        "rope_theta": rope.get("rope_theta", text.get("rope_theta", 10000.0)), "rope_scaling": None,
        "vocab_size": text["vocab_size"], "hidden_act": "silu", "tie_word_embeddings": False,
        "bos_token_id": text.get("bos_token_id"), "eos_token_id": text.get("eos_token_id"),
        "pad_token_id": cfg.get("pad_token_id", text.get("pad_token_id")), "torch_dtype": "float32",
        "mm_hidden_size": vision["hidden_size"], "mm_projector_type": "mlp2x_gelu",
        "mm_vision_select_layer": cfg.get("vision_feature_layer", -2), "mm_vision_select_feature": "patch",
        "mm_vision_tower": "openai/clip-vit-large-patch14-336", "mm_use_im_start_end": False,
        "mm_use_im_patch_token": False, "image_aspect_ratio": "anyres" if is_next else "pad",
        "use_cache": True,
    }
    if is_next:
        config["image_grid_pinpoints"] = [[h_w[1], h_w[0]] for h_w in cfg["image_grid_pinpoints"]]  # HF (h, w) → (w, h)
        config["mm_patch_merge_type"] = "spatial_unpad"
        config["unfreeze_mm_vision_tower"] = True
        config["mm_vision_tower_lr"] = 2e-6
        for name, arr in vis.items():
            llm[f"model.vision_tower.vision_tower.{name}"] = arr
        _save_safetensors_shards(llm, model_dir, n_shards=2)
        (model_dir / "config.json").write_text(json.dumps(config, indent=2))
        return model_dir, _write_clip_dir(out_dir / "clip", vision, None)

    _save_bin_shards(llm, model_dir, n_shards=2, torch=torch)
    (model_dir / "config.json").write_text(json.dumps(config, indent=2))
    return model_dir, _write_clip_dir(out_dir / "clip", vision, vis)


def _write_clip_dir(clip_dir: Path, vision: dict, vis: dict[str, np.ndarray] | None) -> Path:
    """A CLIPModel directory like openai/clip-vit-large-patch14-336 (config, preprocessor, weights if given)."""
    clip_dir.mkdir(parents=True, exist_ok=True)
    if vis is not None:
        _write_clip_weights(clip_dir, vision, vis)
    clip_cfg = {"architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": vision.get("projection_dim", 32),
                "text_config": {"hidden_size": 16, "vocab_size": 64, "num_hidden_layers": 1},
                "vision_config": {k: v for k, v in vision.items() if k not in ("architectures",)}}
    clip_cfg["vision_config"]["model_type"] = "clip_vision_model"
    (clip_dir / "config.json").write_text(json.dumps(clip_cfg, indent=2))
    pre = {"image_processor_type": "CLIPImageProcessor", "crop_size": {"height": 336, "width": 336},
           "size": {"shortest_edge": 336}, "do_center_crop": True, "do_normalize": True, "do_resize": True,
           "do_rescale": True, "rescale_factor": 1 / 255, "resample": 3, "image_mean": CLIP_MEAN,
           "image_std": CLIP_STD, "do_convert_rgb": True}
    (clip_dir / "preprocessor_config.json").write_text(json.dumps(pre, indent=2))
    return clip_dir


def _write_clip_weights(clip_dir: Path, vision: dict, vis: dict[str, np.ndarray]) -> None:
    vis = dict(vis)
    rng = np.random.default_rng(1)
    vis["text_model.embeddings.token_embedding.weight"] = rng.standard_normal((64, 16), dtype=np.float32)
    vis["visual_projection.weight"] = rng.standard_normal((vision.get("projection_dim", 32), vision["hidden_size"]),
                                                          dtype=np.float32)
    vis["logit_scale"] = np.array(2.6592, dtype=np.float32)
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v) for k, v in vis.items()}, str(clip_dir / "model.safetensors"))


def _split(names: list[str], n_shards: int) -> list[list[str]]:
    per = -(-len(names) // n_shards)
    return [names[i:i + per] for i in range(0, len(names), per)]


def _save_safetensors_shards(state: dict[str, np.ndarray], out: Path, n_shards: int) -> None:
    from safetensors.numpy import save_file

    names = sorted(state)
    groups = _split(names, n_shards)
    weight_map = {}
    for i, group in enumerate(groups, 1):
        fname = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        save_file({k: np.ascontiguousarray(state[k]) for k in group}, str(out / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in group})
    index = {"metadata": {"total_size": int(sum(a.nbytes for a in state.values()))}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _save_bin_shards(state: dict[str, np.ndarray], out: Path, n_shards: int, torch) -> None:
    names = sorted(state)
    groups = _split(names, n_shards)
    weight_map = {}
    for i, group in enumerate(groups, 1):
        fname = f"pytorch_model-{i:05d}-of-{len(groups):05d}.bin"
        torch.save({k: torch.from_numpy(np.array(state[k])) for k in group}, out / fname)
        weight_map.update({k: fname for k in group})
    index = {"metadata": {"total_size": int(sum(a.nbytes for a in state.values()))}, "weight_map": weight_map}
    (out / "pytorch_model.bin.index.json").write_text(json.dumps(index, indent=2))


# ---- pytest fixtures (session-scoped; built once per pytest run even when several modules import them) --------

_BUILT: dict[tuple[str, str], object] = {}


def _once(tmp_path_factory, key: str, build):
    """Build at most once per pytest base temp dir, whichever module's fixture asks first."""
    k = (str(tmp_path_factory.getbasetemp()), key)
    if k not in _BUILT:
        _BUILT[k] = build(tmp_path_factory.mktemp(key))
    return _BUILT[k]


try:
    import pytest
except ImportError:  # pragma: no cover - builders stay usable without pytest
    pytest = None

if pytest is not None:

    @pytest.fixture(scope="session")
    def hf_llava15_dir(tmp_path_factory) -> Path:
        """Tiny llava-hf LLaVA-1.5 checkpoint (SentencePiece vocab)."""
        return _once(tmp_path_factory, "hf_llava15", build_llava15)

    @pytest.fixture(scope="session")
    def hf_llava16_dir(tmp_path_factory) -> Path:
        """Tiny llava-hf LLaVA-1.6 (LLaVA-NeXT) checkpoint (SentencePiece vocab)."""
        return _once(tmp_path_factory, "hf_llava16", build_llava16)

    @pytest.fixture(scope="session")
    def hf_llava15_bpe_dir(tmp_path_factory) -> Path:
        """Tiny llava-hf LLaVA-1.5 checkpoint with a Llama-3-style byte-level BPE vocab (tokenizer.json)."""
        return _once(tmp_path_factory, "hf_llava15_bpe", lambda d: build_llava15(d, tokenizer="bpe"))

    @pytest.fixture(scope="session")
    def orig_llava15_dirs(hf_llava15_dir, tmp_path_factory) -> tuple[Path, Path]:
        """(model_dir, clip_dir): `hf_llava15_dir`'s weights in the original LLaVA-1.5 layout + a CLIP dir."""
        return _once(tmp_path_factory, "orig_llava15", lambda d: to_original_layout(hf_llava15_dir, d))

    @pytest.fixture(scope="session")
    def orig_llava16_dirs(hf_llava16_dir, tmp_path_factory) -> tuple[Path, Path]:
        """(model_dir, clip_dir): `hf_llava16_dir`'s weights in the original LLaVA-1.6 layout (tower inside)
        + a config-only CLIP dir."""
        return _once(tmp_path_factory, "orig_llava16", lambda d: to_original_layout(hf_llava16_dir, d))


__all__ = [
    "IMAGE_TOKEN_ID", "PAD_TOKEN_ID", "PINPOINTS", "SPM_PIECES", "VOCAB_SIZE", "build_llava15", "build_llava16",
    "hf_llava15_bpe_dir", "hf_llava15_dir", "hf_llava16_dir", "orig_llava15_dirs", "orig_llava16_dirs",
    "to_original_layout", "write_bpe_tokenizer", "write_spm_tokenizer",
]
