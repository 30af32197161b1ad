"""The command line under bad input: one line ``error: …``, the right exit status, nothing written.

Exit status 2 means the input was wrong (options, files, config values, sites); 1 means a failure
while running (disk, device, shapes). ``--debug`` shows the traceback instead of the one line.
"""

from __future__ import annotations

import pytest

from gemma_scope_pz.app import cli

GOOD = "sae: {d_in: 64, d_sae: 128, architecture: topk, k: 8, site_in: blocks.3.resid_post}\nrun: {total_steps: 10, batch_size: 32}\n"


def _fail(capsys, argv: list[str], status: int = 2) -> str:
    """Runs the CLI, checks the exit status and that stderr is exactly one ``error:`` line."""
    try:
        code = cli.main(argv)
    except SystemExit as exit_info:  # argparse's own usage errors
        code = exit_info.code
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == status, captured.err
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert "Traceback" not in captured.err
    return lines[0]


@pytest.fixture
def config(tmp_path):
    def write(text: str, name: str = "sae.yaml"):
        path = tmp_path / name
        path.write_text(text)
        return str(path)

    return write


def _train(config_path: str, tmp_path, *extra: str) -> list[str]:
    return ["train", "--config", config_path, "--out", str(tmp_path / "out"), *extra]


def test_missing_config_file(capsys, tmp_path):
    line = _fail(capsys, _train(str(tmp_path / "nope.yaml"), tmp_path))
    assert "nope.yaml" in line and "not found" in line
    assert not (tmp_path / "out").exists()


def test_no_config_given(capsys, tmp_path):
    assert "--config" in _fail(capsys, ["train", "--out", str(tmp_path / "out")])


def test_bad_yaml_names_the_file(capsys, config, tmp_path):
    path = config("sae: {d_in: 64, d_sae: [128\nrun: {total_steps: 10}\n")
    line = _fail(capsys, _train(path, tmp_path))
    assert path in line and "YAML" in line
    assert not (tmp_path / "out").exists()


def test_bad_json_names_the_file(capsys, config, tmp_path):
    path = config('{"sae": {"d_in": 64,}}', name="sae.json")
    line = _fail(capsys, _train(path, tmp_path))
    assert path in line and "JSON" in line


def test_config_that_is_not_a_mapping(capsys, config, tmp_path):
    assert "sae.yaml" in _fail(capsys, _train(config("- 1\n- 2\n"), tmp_path))


def test_unknown_config_key_is_named(capsys, config, tmp_path):
    line = _fail(capsys, _train(config(GOOD + "optim: {lrr: 0.1}\n"), tmp_path))
    assert "lrr" in line


def test_bad_config_value_in_the_file(capsys, config, tmp_path):
    line = _fail(capsys, _train(config(GOOD.replace("k: 8", "k: many")), tmp_path))
    assert "sae.k" in line and "many" in line


def test_bad_site_is_named(capsys, config, tmp_path):
    path = config(GOOD.replace("blocks.3.resid_post", "blocks.3.resid_pst"))
    line = _fail(capsys, _train(path, tmp_path))
    assert "site_in" in line and "blocks.3.resid_pst" in line
    assert not (tmp_path / "out").exists()


def test_missing_site(capsys, config, tmp_path):
    path = config(GOOD.replace(", site_in: blocks.3.resid_post", ""))
    assert "site_in" in _fail(capsys, _train(path, tmp_path))


@pytest.mark.parametrize(
    ("option", "value"),
    [("--sae.k", "abc"), ("--sae.k", "0"), ("--optim.lr", "-1"), ("--run.progress_bar", "maybe"),
     ("--sae.architecture", "dense"), ("--optim.lr", "nan")],
)  # fmt: skip
def test_bad_override_value_is_named(capsys, config, tmp_path, option, value):
    line = _fail(capsys, _train(config(GOOD), tmp_path, option, value))
    assert option[2:] in line and value in line
    assert not (tmp_path / "out").exists()


def test_unknown_override_option(capsys, config, tmp_path):
    line = _fail(capsys, _train(config(GOOD), tmp_path, "--sae.kk", "3"))
    assert "--sae.kk" in line and "--help" in line


def test_missing_required_option(capsys):
    assert "--sae" in _fail(capsys, ["inspect", "some text"])


def test_option_of_the_wrong_type(capsys):
    assert "--max-new-tokens" in _fail(capsys, ["generate", "hi", "--max-new-tokens", "many"])


def test_missing_sae_folder_is_named_before_the_model_loads(capsys, tmp_path):
    missing = tmp_path / "no_such_sae"
    line = _fail(capsys, ["inspect", "--sae", str(missing), "text"])
    assert "no_such_sae" in line


def test_missing_model_file(capsys, tmp_path):
    line = _fail(capsys, ["generate", "--model", str(tmp_path / "m.gguf"), "hi"])
    assert "m.gguf" in line


def _raising(err: BaseException):
    def command(args):
        raise err

    return command


@pytest.mark.parametrize(
    ("err", "text"),
    [
        (OSError(28, "No space left on device"), "error: [Errno 28] No space left on device"),
        (PermissionError(13, "Permission denied"), "error: [Errno 13] Permission denied"),
        (RuntimeError("shape mismatch\nwith details"), "error: RuntimeError: shape mismatch with"),
        (KeyError("w_enc"), "error: KeyError: 'w_enc'"),
    ],
)
def test_runtime_failures_exit_1_with_one_line(capsys, monkeypatch, err, text):
    monkeypatch.setitem(cli.COMMANDS, "generate", _raising(err))
    line = _fail(capsys, ["generate", "hi"], status=1)
    assert line.startswith(text) and line.endswith("(rerun with --debug for the traceback)")


def test_debug_shows_the_traceback(monkeypatch):
    monkeypatch.setitem(cli.COMMANDS, "generate", _raising(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        cli.main(["generate", "hi", "--debug"])
