"""`configs/*.toml` and `--config`: every shipped file parses with both CLIs' parsers (`python -m llava_jax.run`
and `scripts/batch_eval.py`) into the values it holds, flags override them, and any mistake in a config file
(unknown key, unknown table, bad value, missing file) is a one-line `error:` with exit status 1.
"""

from __future__ import annotations

import importlib.util
import tomllib
from pathlib import Path

import pytest

from llava_jax.cli_config import parse_with_config
from llava_jax.prompts import TEMPLATES
from llava_jax.run import build_parser as run_parser
from llava_jax.sharding import parse_mesh

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.toml"))
RUN_SECTIONS = ("model", "generation", "mesh")  # what llava_jax.run.main passes
VARIANTS = ("llava-v1.5-7b", "llava-v1.5-13b", "llava-v1.6-vicuna-7b", "llava-v1.6-vicuna-13b",
            "llava-v1.6-mistral-7b", "llava-v1.6-34b")


def _batch_eval():
    spec = importlib.util.spec_from_file_location("batch_eval", REPO / "scripts" / "batch_eval.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


batch_eval = _batch_eval()


def parse_run(argv):
    return parse_with_config(run_parser(), argv, sections=RUN_SECTIONS)


def parse_batch(argv):
    return parse_with_config(batch_eval.build_parser(), argv)


def test_every_variant_and_mesh_has_a_config():
    names = {p.stem for p in CONFIGS}
    assert set(VARIANTS) <= names
    assert {"mesh-1x1", "mesh-1x8", "mesh-2x4", "mesh-8x1"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_parses_with_both_clis(path):
    data = tomllib.loads(path.read_text())
    run_args = parse_run(["--config", str(path)])
    batch_args = parse_batch(["--config", str(path)])
    for table, values in data.items():
        for key, value in values.items():
            dest = key.replace("-", "_")
            assert getattr(batch_args, dest) == value, (table, key)
            if table in RUN_SECTIONS:
                assert getattr(run_args, dest) == value, (table, key)
            else:  # [batch]: batch_eval only
                assert not hasattr(run_args, dest), (table, key)
    if path.stem in VARIANTS:  # a model config says everything a job needs
        assert batch_args.chat_template in TEMPLATES
        assert batch_args.ctx_size >= 2048 and batch_args.dtype in ("f32", "bf16", "f16")
        assert batch_args.batch_size >= 1 and batch_args.max_new_tokens >= 1 and batch_args.temp == 0.0
    data_axis, model_axis = (int(x) for x in batch_args.mesh.split("x"))
    assert data_axis * model_axis in (1, 2, 8)
    if data_axis * model_axis == 1:
        parse_mesh(batch_args.mesh)  # and the run CLI's mesh parser takes it


def test_later_config_and_flags_override():
    model, mesh = str(REPO / "configs" / "llava-v1.5-7b.toml"), str(REPO / "configs" / "mesh-2x4.toml")
    args = parse_batch(["--config", model, "--config", mesh])
    assert (args.mesh, args.batch_size, args.chat_template, args.temp) == ("2x4", 16, "vicuna", 0.0)
    args = parse_batch(["--config", model, "--config", mesh, "--mesh", "1x1", "--batch-size", "3", "--temp", "0.7",
                        "--conv-mode", "chatml", "-n", "5", "--ctx-size", "512", "--dtype", "f32"])
    assert (args.mesh, args.batch_size, args.temp, args.chat_template, args.max_new_tokens, args.ctx_size,
            args.dtype) == ("1x1", 3, 0.7, "chatml", 5, 512, "f32")
    args = parse_run(["--config", model, "--temp", "0.5", "-c", "1024", "--chat-template", "raw"])
    assert (args.temp, args.ctx_size, args.chat_template, args.dtype) == (0.5, 1024, "raw", "bf16")
    assert parse_run([]).temp == 0.2  # no config: the flag's own default


def test_repeatable_flags_replace_the_config_list(tmp_path):
    cfg = tmp_path / "stop.toml"
    cfg.write_text('[generation]\nstop = ["###", "USER:"]\ntemp = 1\n')
    assert parse_run(["--config", str(cfg)]).stop == ["###", "USER:"]
    assert parse_run(["--config", str(cfg), "--stop", "a", "--stop", "b"]).stop == ["a", "b"]
    assert parse_run(["--config", str(cfg)]).temp == 1.0  # an int where the flag is float


def _one_line_error(capsys, parse, argv, *needles):
    with pytest.raises(SystemExit) as exc:
        parse(argv)
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    for needle in needles:
        assert needle in err, err
    return err


@pytest.mark.parametrize("parse", [parse_run, parse_batch], ids=["run", "batch_eval"])
def test_unknown_key_is_a_one_line_error(tmp_path, capsys, parse):
    cfg = tmp_path / "typo.toml"
    cfg.write_text('[model]\nchat_template = "vicuna"\nctx_sise = 4096\n')
    _one_line_error(capsys, parse, ["--config", str(cfg)], "unknown keys ctx_sise", str(cfg))


@pytest.mark.parametrize("parse", [parse_run, parse_batch], ids=["run", "batch_eval"])
@pytest.mark.parametrize("text, needle", [
    ('[modle]\nctx_size = 1\n', "unknown table [modle]"),
    ('ctx_size = 1\n', "must sit in a table"),
    ('[model]\ndtype = "f64"\n', "choose from"),
    ('[model]\nctx_size = "big"\n', "expected int"),
    ('[model]\nctx_size = 1.5\n', "expected int"),
    ('[model]\ndefault_mmproj = "yes"\n', "expected true or false"),
    ('[model\n', "not valid TOML"),
], ids=["table", "top-level", "choices", "str-int", "float-int", "bool", "toml"])
def test_bad_config_is_a_one_line_error(tmp_path, capsys, parse, text, needle):
    cfg = tmp_path / "bad.toml"
    cfg.write_text(text)
    _one_line_error(capsys, parse, ["--config", str(cfg)], needle)


def test_batch_table_is_ignored_by_run_only(tmp_path, capsys):
    cfg = tmp_path / "batch.toml"
    cfg.write_text("[batch]\nbatch_size = 4\nbatch_sise = 2\n")
    parse_run(["--config", str(cfg)])  # run does not read [batch]
    _one_line_error(capsys, parse_batch, ["--config", str(cfg)], "unknown keys batch_sise")


def test_missing_config_file(capsys):
    _one_line_error(capsys, parse_run, ["--config", "/nonexistent/x.toml"], "config file not found")
    _one_line_error(capsys, parse_batch, ["--config=/nonexistent/x.toml"], "config file not found")


def test_batch_eval_bad_flags_are_one_line_errors(capsys, tmp_path):
    for argv, needle in [(["--mesh", "2by4"], "bad mesh shape"), (["--batch-size", "0"], "--batch-size"),
                         (["--num-processes", "2", "--process-id", "2"], "--process-id")]:
        assert batch_eval.main(argv + ["--questions", "q", "--answers", str(tmp_path / "a")]) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: ") and needle in err and err.count("\n") == 1, err
