"""Orbax weight cache: the dequantized, dtype-cast params (+ the GGUF metadata they came from).

`save(dir, params, meta)` writes an Orbax checkpoint of the params pytree and `meta.json` (GGUF
metadata and tensor names of the language model and, if loaded, the mmproj), so configs and the
tokenizer are rebuilt by the same `from_metadata` code as from GGUF. `restore(dir, mesh)` restores
every leaf straight into the sharding the partition table gives it on `mesh` — no host copy of the
model, no dequantization.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from llava_jax.errors import LlavaError
from llava_jax.sharding import ShardingRules, make_mesh, sharding_for, text_param_axes

META_FILE = "meta.json"
PARAMS_DIR = "params"


def is_checkpoint(path: str | os.PathLike) -> bool:
    p = Path(path)
    return p.is_dir() and (p / META_FILE).exists() and (p / PARAMS_DIR).exists()


def leaf_axes(path: tuple[str, ...], ndim: int) -> tuple[str | None, ...]:
    """Logical axes of a params leaf from its pytree path (text leaves by GGUF kind; vision replicated).
    A quantized matrix's blocks (`.../weight/blocks`, uint8 [*lead, N, n_blocks, type_size]) shard like the
    matrix over [N, n_blocks] (`params._block_spec` checks divisibility at restore through `sharding_for`)."""
    if path[0] == "text":
        if path[-1] == "blocks":
            axes = text_param_axes(f"{path[-3]}.weight") + (None,)
        else:
            kind = path[-2] if path[-1] in ("weight", "bias") else path[-1]
            axes = text_param_axes(f"{kind}.weight")
        return (None,) * (ndim - len(axes)) + axes  # scanned blocks carry a leading layer axis
    return ("vision",) * ndim


def split_qtensors(tree: dict) -> tuple[dict, dict]:
    """QTensor leaves → {"blocks": array} subtrees, plus {"a/b/weight": [qtype, N, K]} to rebuild them."""
    from llava_jax.qtensor import QTensor

    info: dict[str, list] = {}

    def walk(node, path):
        if isinstance(node, QTensor):
            info["/".join(path)] = [int(node.qtype), *node.matrix]
            return {"blocks": node.blocks}
        if isinstance(node, dict):
            return {k: walk(v, (*path, k)) for k, v in node.items()}
        return node

    return walk(tree, ()), info


def join_qtensors(tree: dict, info: dict) -> dict:
    """Inverse of `split_qtensors`."""
    from llava_jax.qtensor import Q, QTensor

    for key, (qtype, n, k) in info.items():
        node = tree
        *parents, last = key.split("/")
        for part in parents:
            node = node[part]
        node[last] = QTensor(node[last]["blocks"], Q(qtype), (n, k))
    return tree


def _key_names(path) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def save(directory: str | os.PathLike, params: dict, meta: dict) -> Path:
    """Write params (a pytree of jax.Arrays: {"text": ..., "vision": ...}) and meta to `directory`."""
    directory = Path(directory).absolute()
    directory.mkdir(parents=True, exist_ok=True)
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(directory / PARAMS_DIR, params, force=True)
    ckpt.wait_until_finished()
    (directory / META_FILE).write_text(json.dumps(meta))
    return directory


def restore(directory: str | os.PathLike, mesh=None, rules: ShardingRules = ShardingRules()) -> tuple[dict, dict]:
    """→ (params placed on `mesh` (default: one device) per the partition table, meta)."""
    directory = Path(directory).absolute()
    if not is_checkpoint(directory):
        raise LlavaError(f"not a llava_jax Orbax checkpoint (no {META_FILE} / {PARAMS_DIR}): {directory}")
    mesh = mesh if mesh is not None else make_mesh()
    try:
        meta = json.loads((directory / META_FILE).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LlavaError(f"{directory / META_FILE}: not valid JSON ({e}); write the cache again") from None
    ckpt = ocp.StandardCheckpointer()
    with _corrupt_as_error(directory):
        stored = ckpt.metadata(directory / PARAMS_DIR)
        tree = getattr(stored, "item_metadata", stored)
        tree = getattr(tree, "tree", tree)
        if not isinstance(meta, dict) or not tree:
            raise ValueError("no params or metadata in it")

    def target(path, leaf):
        axes = leaf_axes(_key_names(path), len(leaf.shape))
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding_for(leaf.shape, axes, mesh, rules))

    with _corrupt_as_error(directory):
        abstract = jax.tree_util.tree_map_with_path(target, tree)
        return ckpt.restore(directory / PARAMS_DIR, abstract), meta


@contextlib.contextmanager
def _corrupt_as_error(directory: Path):
    """Whatever Orbax / TensorStore raise on a damaged or incomplete checkpoint becomes one LlavaError line
    (they raise many types: ValueError, KeyError, FileNotFoundError, TensorStore's own...). Orbax's absl
    warnings about the missing pieces are kept off stderr meanwhile: the one error line says it."""
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.ERROR)
    try:
        yield
    except LlavaError:
        raise
    except Exception as e:  # noqa: BLE001 — any failure reading the files means the cache is unusable
        lines = str(e).strip().splitlines()
        why = f"{type(e).__name__}: {lines[0][:200]}" if lines else type(e).__name__
        raise LlavaError(f"{directory}: corrupt or incomplete Orbax checkpoint ({why}); write the cache again "
                         "(--save-orbax / Llava.save_orbax) or pass the GGUF file") from None
    finally:
        absl.setLevel(level)
