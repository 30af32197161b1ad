"""Locating Gemma Scope checkpoint files: a local folder or a Hugging Face Hub repo.

A source is a local folder, a hub repo id ``"owner/name"`` with a separate sub-folder, or a
single ``"owner/name:folder"`` string. All hub access of the checkpoint loaders goes through
this module (``hf_hub_download`` and ``list_repo_files``), so tests replace it here.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

from huggingface_hub import hf_hub_download, list_repo_files

__all__ = [
    "CONFIG_FILE",
    "NPZ_FILE",
    "PARAMS_FILE",
    "CheckpointError",
    "fetch_files",
    "labels_from_folder",
    "list_folder_files",
    "split_source",
]

CONFIG_FILE = "config.json"
PARAMS_FILE = "params.safetensors"
NPZ_FILE = "params.npz"


class CheckpointError(ValueError):
    """A checkpoint file is malformed or disagrees with its config or the caller."""


def is_local(source: str | os.PathLike) -> bool:
    """Whether ``source`` names a local path (a PathLike, an existing path, or "/", ".", "~")."""
    text = str(source)
    return (
        isinstance(source, os.PathLike) or os.path.exists(text) or text.startswith(("/", ".", "~"))
    )


def split_source(source: str | os.PathLike, folder: str | None) -> tuple[str, str | None, bool]:
    """(base, folder, is_local); "repo:folder" strings are split."""
    if is_local(source):
        return str(Path(source).expanduser()), folder, True
    text = str(source)
    if folder is None and ":" in text:
        text, folder = text.split(":", 1)
    if text.count("/") != 1:
        raise FileNotFoundError(
            f"{source!r} is neither an existing local folder nor a hub repo id 'owner/name' "
            "(give the folder separately or as 'owner/name:folder')"
        )
    return text, folder, False


def fetch_files(
    source: str | os.PathLike,
    folder: str | None,
    names: Sequence[str],
    revision: str | None,
    optional: Sequence[str] = (),
) -> tuple[dict[str, Path], str]:
    """Local paths of ``names`` (downloading from the hub if needed) and a source label."""
    base, folder, local = split_source(source, folder)
    paths: dict[str, Path] = {}
    if local:
        root = Path(base) / folder if folder else Path(base)
        for name in [*names, *optional]:
            path = root / name
            if path.is_file():
                paths[name] = path
            elif name not in optional:
                raise FileNotFoundError(f"{path}: missing file (expected in SAE folder {root})")
        return paths, str(root)
    prefix = f"{folder.strip('/')}/" if folder else ""
    for name in [*names, *optional]:
        try:
            paths[name] = Path(
                hf_hub_download(repo_id=base, filename=prefix + name, revision=revision)
            )
        except Exception as exc:  # the hub raises several error types
            if name in optional:
                continue
            raise FileNotFoundError(f"could not download {base}/{prefix}{name}: {exc}") from exc
    return paths, f"{base}:{folder or ''}"


def list_folder_files(
    source: str | os.PathLike, folder: str | None, revision: str | None
) -> list[str]:
    """Names (relative to the folder) of the files in a local folder or a hub repo folder."""
    base, folder, local = split_source(source, folder)
    if local:
        root = Path(base) / folder if folder else Path(base)
        return [path.name for path in root.glob("*")]
    prefix = f"{folder.strip('/')}/" if folder else ""
    return [
        name[len(prefix) :]
        for name in list_repo_files(base, revision=revision)
        if name.startswith(prefix)
    ]


def labels_from_folder(folder: str) -> dict[str, str]:
    """``width_label`` ("16k") and ``l0_label`` ("small") parsed from a folder name, if present."""
    match = re.search(r"width_([0-9]+[kmKM]?)(?:_l0_([A-Za-z0-9]+))?", folder)
    labels = {}
    if match:
        labels["width_label"] = match.group(1)
        if match.group(2):
            labels["l0_label"] = match.group(2)
    return labels
