"""The command line: help texts, errors, and the tour end to end (slow, real model)."""

import json
import math
import os
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
    env = {**os.environ, "GEMMA_SCOPE_PZ_CACHE": str(env_cache), "JAX_PLATFORMS": "cpu"}
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

    # The other commands, on the SAE the tour trained (in-process: each loads the model once).
    (sae_dir,) = (env_cache / "tour").glob("sae-*/gemma_scope_2")
    strongest = str(summary["strongest_feature"])
    run = [
        ["inspect", "--sae", str(sae_dir), "The law of conservation of energy", "--k", "3"],
        ["eval", "--sae", str(sae_dir), "--contexts", "2"],
        [
            "steer",
            "--sae",
            str(sae_dir),
            "--feature",
            strongest,
            "--coeff",
            "0.3",
            "I think that",
            "--max-new-tokens",
            "8",
        ],
        [
            "features",
            "--sae",
            str(sae_dir),
            "--contexts",
            "8",
            "--n",
            "4",
            "--out",
            str(tmp_path / "c.html"),
        ],
        ["generate", "The capital of France is", "--max-new-tokens", "6"],
    ]
    outputs = {}
    for args in run:
        result = subprocess.run(
            [sys.executable, "-m", "gemma_scope_pz.cli", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert result.returncode == 0, (args, result.stderr[-2000:])
        outputs[args[0]] = result.stdout
    assert "' conservation'" in outputs["inspect"] and "#" in outputs["inspect"]
    metrics = json.loads(outputs["eval"])
    assert 0 < metrics["fvu"] < 1 and metrics["n_tokens"] > 0
    assert (
        outputs["steer"].startswith("without: I think that")
        and f"with #{strongest}" in outputs["steer"]
    )
    assert "Feature cards" in (tmp_path / "c.html").read_text()
    assert outputs["generate"].startswith("The capital of France is the capital of the country")
