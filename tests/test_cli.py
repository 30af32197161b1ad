"""The command line: help texts, errors, and the tour end to end (slow, real model)."""

import json
import math
import subprocess
import sys

import pytest

from gemma_scope_pz import cli

COMMANDS = ["tour", "generate", "inspect", "train", "eval", "features", "steer"]


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for command in COMMANDS:
        assert command in out


@pytest.mark.parametrize("command", COMMANDS)
def test_each_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, "--help"])
    assert exit_info.value.code == 0
    assert "--model" in capsys.readouterr().out


def test_train_with_missing_config_says_what_to_do(tmp_path):
    with pytest.raises(SystemExit, match="not found"):
        cli.main(["train", "--config", str(tmp_path / "nope.yaml")])


def test_sae_is_required_for_inspect(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["inspect", "some text"])
    assert exit_info.value.code == 2
    assert "--sae" in capsys.readouterr().err


@pytest.mark.slow
def test_quick_tour_end_to_end_and_cached_rerun(tmp_path):
    env_cache = tmp_path / "cache"
    out = tmp_path / "report"
    cmd = [sys.executable, "-m", "gemma_scope_pz.cli", "tour", "--quick", "--out", str(out)]
    env = {"GEMMA_SCOPE_PZ_CACHE": str(env_cache), "JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"}
    import os

    env = {**os.environ, **env}
    first = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1500)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "SAE: trained" in first.stdout and "transcoder: trained" in first.stdout
    summary = json.loads((out / "summary.json").read_text())
    for key in ("sae_metrics", "transcoder_metrics"):
        metrics = summary[key]
        assert 0 < metrics["fvu"] < 1, metrics
        assert math.isfinite(metrics["delta_loss"]) and metrics["l0"] > 0
    assert summary["greedy"].startswith(" the capital of the country of France")
    report = (out / "report.html").read_text()
    assert "Reconstruction metrics" in report and "feature_cards.html" in report
    assert (out / "feature_cards.html").stat().st_size > 10_000
    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1500)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "SAE: reused" in second.stdout and "transcoder: reused" in second.stdout
    again = json.loads((out / "summary.json").read_text())
    assert again["sae_metrics"] == summary["sae_metrics"]
