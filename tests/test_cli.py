"""The command line: help texts, config overrides, and every command end to end (slow, real model)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import subprocess
import sys
from typing import Literal

import pytest

from gemma_scope_pz.app import cli, overrides

COMMANDS = ["tour", "generate", "inspect", "train", "eval", "features", "steer"]


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = cli.build_parser()
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def test_help_lists_every_command_and_examples(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for command in COMMANDS:
        assert f"    {command} " in out
    assert "examples:" in out and "gemma-scope-pz train --config" in out and "--sae.k 64" in out


@pytest.mark.parametrize("command", COMMANDS)
def test_every_option_has_help_and_shows_its_default(command):
    parser = _subparsers()[command]
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help, f"{command} {action.option_strings or action.dest}: no help"
        if action.option_strings and not action.required:
            text = parser._get_formatter()._expand_help(action)
            assert "(default: " in text, f"{command} {action.option_strings}: {text!r}"
    assert "--model" in parser.format_help()


def test_old_entry_points_still_work_with_a_deprecation_warning():
    for name in ("gemma_scope_pz.cli", "gemma_scope_pz.tour"):
        sys.modules.pop(name, None)
    with pytest.warns(DeprecationWarning, match="app.cli"):
        import gemma_scope_pz.cli as old_cli
    assert old_cli.main is cli.main
    with pytest.warns(DeprecationWarning, match="offline_dictionaries"):
        import gemma_scope_pz.tour as old_tour
    assert old_tour.tour_dictionaries.__module__ == "gemma_scope_pz.app.tour"


# ------------------------------------------------------------------ overrides from dataclasses
@dataclasses.dataclass(frozen=True)
class _Inner:
    k: int = dataclasses.field(default=32, metadata={"help": "Active latents."})
    kind: Literal["a", "b"] = dataclasses.field(default="a", metadata={"help": "Kind."})


@dataclasses.dataclass(frozen=True)
class _Outer:
    inner: _Inner
    lr: float | None = dataclasses.field(default=None, metadata={"help": "Learning rate."})
    sizes: tuple[int, ...] = (1, 2)
    name: str = dataclasses.field(default="x", metadata={"help": "100% a name."})


def test_dataclass_options_cover_nested_fields_with_help_and_defaults():
    parser = argparse.ArgumentParser(formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", default="cli", help="the command's own --name wins")
    added = overrides.add_dataclass_options(parser, _Outer)
    assert added == ["inner.k", "inner.kind", "lr", "sizes"]
    text = " ".join(parser.format_help().split())
    assert "--inner.k INT Active latents. (default: 32)" in text
    assert "--inner.kind {a,b} Kind. (default: 'a')" in text
    assert "--lr FLOAT Learning rate. (default: none)" in text
    assert "--sizes INT,... _Outer field sizes (tuple[int, ...]) (default: 1,2)" in text
    args = parser.parse_args(["--inner.k", "64", "--lr", "5e-4"])
    assert overrides.collect_overrides(args) == {"inner.k": "64", "lr": "5e-4"}
    assert args.name == "cli"
    assert overrides.collect_overrides(parser.parse_args([])) == {}


def test_train_options_are_the_config_fields():
    import gemma_scope_pz as gs

    parser = _subparsers()["train"]
    options = {s for a in parser._actions for s in a.option_strings}
    fields = {f"--{path}" for path, _, _ in overrides.leaf_fields(gs.TrainConfig)}
    assert {"--sae.k", "--optim.lr", "--run.total_steps", "--sae.site_in"} <= fields <= options


def test_train_config_applies_overrides_and_converts_them(tmp_path):
    path = tmp_path / "sae.yaml"
    path.write_text(
        "sae: {d_in: 64, d_sae: 128, architecture: topk, k: 8, site_in: blocks.3.resid_post}\n"
        "run: {total_steps: 10, batch_size: 32}\n"
    )
    config = cli.train_config(str(path), {"sae.k": "16", "optim.lr": "5e-4"})
    assert config.sae.k == 16 and config.optim.lr == 5e-4 and config.sae.d_sae == 128
    assert isinstance(config.optim.lr, float)
    assert cli.train_config(str(path), {}).sae.k == 8


def test_instruction_tuned_sources_are_recognised():
    assert cli.is_instruction_tuned("hf:google/gemma-3-1b-it")
    assert cli.is_instruction_tuned("/models/gemma-3-270m-it-Q8_0.gguf")
    for base in (None, "hf:google/gemma-3-1b-pt", "/data/gemma-3-4b", "hf:x/edit-model"):
        assert not cli.is_instruction_tuned(base), base


def test_chat_on_a_base_model_says_so(tmp_path, capsys):
    missing = str(tmp_path / "gemma-3-270m-pt.gguf")
    assert cli.main(["generate", "--chat", "--model", missing, "Hi"]) == 2
    err = capsys.readouterr().err
    assert "base (pretrained) model" in err and "gemma-3-270m-pt.gguf" in err


# ------------------------------------------------------------------ end to end, real model
@pytest.fixture(scope="module")
def tour_run(tmp_path_factory):
    """The quick tour, run twice (the second reuses the cache); yields its folders and outputs."""
    root = tmp_path_factory.mktemp("tour")
    out = root / "report"
    env = {**os.environ, "GEMMA_SCOPE_PZ_CACHE": str(root / "cache"), "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, "-m", "gemma_scope_pz", "tour", "--quick", "--out", str(out)]
    first = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1500)
    summary = json.loads((out / "summary.json").read_text()) if first.returncode == 0 else None
    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1500)
    sae_dirs = list((root / "cache" / "tour").glob("sae-*/gemma_scope_2"))
    return dict(
        root=root, out=out, env=env, first=first, second=second, summary=summary, sae_dirs=sae_dirs
    )


def _run(tour_run, *args) -> str:
    env = tour_run["env"] if tour_run else {**os.environ, "JAX_PLATFORMS": "cpu"}
    result = subprocess.run(
        [sys.executable, "-m", "gemma_scope_pz", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, (args, result.stderr[-2000:])
    return result.stdout


def _sae_dir(tour_run) -> str:
    assert tour_run["first"].returncode == 0, tour_run["first"].stderr[-3000:]
    (sae_dir,) = tour_run["sae_dirs"]
    return str(sae_dir)


@pytest.mark.slow
def test_quick_tour_trains_and_reports(tour_run):
    first = tour_run["first"]
    assert first.returncode == 0, first.stderr[-3000:]
    assert "SAE: trained" in first.stdout and "transcoder: trained" in first.stdout
    summary = tour_run["summary"]
    for key in ("sae_metrics", "transcoder_metrics"):
        metrics = summary[key]
        assert 0 < metrics["fvu"] < 1, metrics
        assert math.isfinite(metrics["delta_loss"]) and metrics["l0"] > 0
    assert summary["greedy"].startswith(" the capital of the country of France")
    report = (tour_run["out"] / "report.html").read_text()
    assert "Reconstruction metrics" in report and "feature_cards.html" in report
    assert (tour_run["out"] / "feature_cards.html").stat().st_size > 10_000


@pytest.mark.slow
def test_quick_tour_rerun_reuses_the_cache(tour_run):
    second = tour_run["second"]
    assert second.returncode == 0, second.stderr[-3000:]
    assert "SAE: reused" in second.stdout and "transcoder: reused" in second.stdout
    again = json.loads((tour_run["out"] / "summary.json").read_text())
    assert again["sae_metrics"] == tour_run["summary"]["sae_metrics"]


@pytest.mark.slow
def test_inspect_lists_features_per_token(tour_run):
    out = _run(
        tour_run,
        "inspect",
        "--sae",
        _sae_dir(tour_run),
        "The law of conservation of energy",
        "--k",
        "3",
    )
    assert "' conservation'" in out and "#" in out


@pytest.mark.slow
def test_eval_prints_metrics_as_json(tour_run):
    metrics = json.loads(_run(tour_run, "eval", "--sae", _sae_dir(tour_run), "--contexts", "2"))
    assert 0 < metrics["fvu"] < 1 and metrics["n_tokens"] > 0


@pytest.mark.slow
def test_steer_prints_both_continuations(tour_run):
    sae_dir = _sae_dir(tour_run)
    strongest = str(tour_run["summary"]["strongest_feature"])
    out = _run(
        tour_run, "steer", "--sae", sae_dir, "--feature", strongest, "--coeff", "0.3",
        "I think that", "--max-new-tokens", "8",
    )  # fmt: skip
    assert out.startswith("without: I think that") and f"with #{strongest}" in out


@pytest.mark.slow
def test_features_writes_cards(tour_run, tmp_path):
    page = tmp_path / "c.html"
    _run(
        tour_run,
        "features",
        "--sae",
        _sae_dir(tour_run),
        "--contexts",
        "8",
        "--n",
        "4",
        "--out",
        str(page),
    )
    assert "Feature cards" in page.read_text()


@pytest.mark.slow
def test_generate_continues_the_prompt():
    out = _run(None, "generate", "The capital of France is", "--max-new-tokens", "6")
    assert out.startswith("The capital of France is the capital of the country")
