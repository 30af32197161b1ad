"""Load and save Gemma Scope sparse autoencoders, transcoders and cross-layer transcoders.

Gemma Scope 2 publishes one folder per dictionary (e.g.
``google/gemma-scope-2-1b-pt`` / ``resid_post/layer_9_width_16k_l0_small``) holding

* ``config.json``: ``hf_hook_point_in`` / ``hf_hook_point_out`` (HF module paths such as
  ``"model.layers.9.output"``), ``width``, ``l0``, ``architecture`` ("jump_relu"),
  ``type`` ("sae", "transcoder" or "clt"), ``affine_connection`` and ``model_name``;
* ``params.safetensors``: ``w_enc`` [d_in, d_sae], ``b_enc`` [d_sae], ``w_dec`` [d_sae, d_out],
  ``b_dec`` [d_out], ``threshold`` [d_sae] and, for affine transcoders,
  ``affine_skip_connection`` [d_in, d_out].

Cross-layer transcoders use one ``params_layer_{i}.safetensors`` per source layer whose
``w_dec`` is [d_sae, n_layers, d_model]. Gemma Scope 1 used ``params.npz`` (see
`load_gemma_scope_1`).

Tensors are read one at a time into 64-byte-aligned host buffers (in chunks, casting on
the way), handed to ``jax.device_put`` (zero-copy on CPU) and the host reference dropped,
so peak host memory stays close to the file size. Safetensors headers are parsed here
(the format is a little-endian u64 header length, a JSON header, then raw bytes) so that
bfloat16 files load without torch.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import struct
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from huggingface_hub import hf_hub_download, list_repo_files
from penzai import pz
from safetensors.numpy import save_file

from gemma_scope_pz.scope.layers import (
    AutoEncoder,
    AutoEncoderSkip,
    SaeMeta,
    decode_arrays,
    encode_arrays,
)

CONFIG_FILE = "config.json"
PARAMS_FILE = "params.safetensors"
NPZ_FILE = "params.npz"
_CLT_FILE_RE = re.compile(r"^params_layer_(\d+)\.safetensors$")
_CHUNK_BYTES = 64 << 20
_FLOAT_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": jnp.bfloat16}


class CheckpointError(ValueError):
    """A checkpoint file is malformed or disagrees with its config or the caller."""


# ---------------------------------------------------------------------------------------------
# Hook points <-> site names.

# (HF module path pattern in Gemma Scope 2 configs, our site kind). The optional
# "language_model." covers the multimodal Gemma 3 module tree (4B and up).
_HOOK_TABLE: tuple[tuple[str, str], ...] = (
    (r"model\.(?:language_model\.)?layers\.(\d+)\.output", "resid_post"),
    (r"model\.(?:language_model\.)?layers\.(\d+)\.input", "resid_pre"),
    (r"model\.(?:language_model\.)?layers\.(\d+)\.self_attn\.o_proj\.input", "attn_out"),
    (r"model\.(?:language_model\.)?layers\.(\d+)\.pre_feedforward_layernorm\.output", "mlp_in"),
    (r"model\.(?:language_model\.)?layers\.(\d+)\.post_feedforward_layernorm\.output", "mlp_out"),
    (r"blocks\.(\d+)\.(?:resid_pre|resid_post|attn_out|mlp_in|mlp_out)", ""),  # already a site
)
_SITE_TO_HOOK = {
    "resid_post": "model.layers.{}.output",
    "resid_pre": "model.layers.{}.input",
    "attn_out": "model.layers.{}.self_attn.o_proj.input",
    "mlp_in": "model.layers.{}.pre_feedforward_layernorm.output",
    "mlp_out": "model.layers.{}.post_feedforward_layernorm.output",
}


def site_from_hook(name: str) -> str:
    """Our site name ("blocks.9.resid_post") for a Gemma Scope 2 hook point.

    Raises:
      ValueError: naming the hook when it is not in the table.
    """
    for pattern, kind in _HOOK_TABLE:
        match = re.fullmatch(pattern, name)
        if match:
            return name if not kind else f"blocks.{int(match.group(1))}.{kind}"
    known = ", ".join(template.format("L") for template in _SITE_TO_HOOK.values())
    raise ValueError(f"unknown Gemma Scope hook point {name!r}; known forms: {known}")


def hook_from_site(site: str) -> str:
    """Inverse of `site_from_hook`: "blocks.9.resid_post" -> "model.layers.9.output"."""
    match = re.fullmatch(r"blocks\.(\d+)\.(\w+)", site)
    if not match or match.group(2) not in _SITE_TO_HOOK:
        raise ValueError(f"unknown site {site!r}; expected 'blocks.<layer>.<kind>'")
    return _SITE_TO_HOOK[match.group(2)].format(int(match.group(1)))


# ---------------------------------------------------------------------------------------------
# Finding files (local folder or Hugging Face Hub).


def _is_local(source: str | os.PathLike) -> bool:
    text = str(source)
    return (
        isinstance(source, os.PathLike) or os.path.exists(text) or text.startswith(("/", ".", "~"))
    )


def _split_source(source: str | os.PathLike, folder: str | None) -> tuple[str, str | None, bool]:
    """(base, folder, is_local); "repo:folder" strings are split."""
    if _is_local(source):
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


def _fetch(
    source: str | os.PathLike,
    folder: str | None,
    names: Sequence[str],
    revision: str | None,
    optional: Sequence[str] = (),
) -> tuple[dict[str, Path], str]:
    """Local paths of ``names`` (downloading from the hub if needed) and a source label."""
    base, folder, local = _split_source(source, folder)
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


# ---------------------------------------------------------------------------------------------
# Tensor reading.


@dataclasses.dataclass(frozen=True)
class _TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int


def _read_header(path: Path) -> dict[str, _TensorInfo]:
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: not a safetensors file (only {size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise CheckpointError(f"{path}: header length {n} exceeds the file size {size}")
        try:
            header = json.loads(f.read(n))
        except ValueError as exc:
            raise CheckpointError(f"{path}: unreadable safetensors header: {exc}") from exc
    infos = {}
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        try:
            begin, end = (int(v) for v in entry["data_offsets"])
            infos[key] = _TensorInfo(
                str(entry["dtype"]),
                tuple(int(d) for d in entry["shape"]),
                8 + n + begin,
                8 + n + end,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{path}: malformed header entry for {key!r}: {entry!r}") from exc
        if 8 + n + end > size:
            raise CheckpointError(
                f"{path}: tensor {key!r} runs past the end of the file (truncated?)"
            )
    return infos


def _aligned_empty(shape: tuple[int, ...], dtype) -> np.ndarray:
    """An uninitialised array whose data is 64-byte aligned (jax.device_put is then zero-copy on CPU)."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    raw = np.empty(nbytes + 64, np.uint8)
    offset = (-raw.ctypes.data) % 64
    return raw[offset : offset + nbytes].view(dtype).reshape(shape)


def _read_tensor(path: Path, key: str, info: _TensorInfo, dtype, tail_start: int = 0) -> np.ndarray:
    """Reads one tensor in row chunks into a fresh aligned ``dtype`` buffer, checking finiteness.

    With ``tail_start`` > 0 only ``tensor[:, tail_start:, ...]`` is kept (used for
    cross-layer decoders). Chunks keep temporaries (casts, the isfinite mask) small.
    """
    src = np.dtype(_FLOAT_DTYPES[info.dtype])
    shape = info.shape if info.shape else (1,)
    if (info.end - info.start) != int(np.prod(shape)) * src.itemsize:
        raise CheckpointError(f"{path}: tensor {key!r} byte size does not match shape {info.shape}")
    out_shape = (shape[0], shape[1] - tail_start, *shape[2:]) if tail_start else shape
    out = _aligned_empty(out_shape, dtype)
    row_bytes = int(np.prod(shape[1:])) * src.itemsize
    rows_per_chunk = max(1, _CHUNK_BYTES // max(row_bytes, 1))
    with open(path, "rb") as f:
        f.seek(info.start)
        for r0 in range(0, shape[0], rows_per_chunk):
            r1 = min(shape[0], r0 + rows_per_chunk)
            if not tail_start and src == out.dtype:
                f.readinto(memoryview(out[r0:r1].reshape(-1).view(np.uint8)))
            else:
                chunk = np.frombuffer(f.read((r1 - r0) * row_bytes), src)
                chunk = chunk.reshape(r1 - r0, *shape[1:])
                out[r0:r1] = chunk[:, tail_start:] if tail_start else chunk
            if not np.isfinite(out[r0:r1]).all():
                raise CheckpointError(f"{path}: tensor {key!r} {info.shape} contains NaN or Inf")
    return out.reshape(info.shape) if not info.shape else out


def _load_tensors(
    path: Path,
    infos: Mapping[str, _TensorInfo],
    keys: Sequence[str],
    dtype,
    tail_start: Mapping[str, int] | None = None,
) -> dict[str, jax.Array]:
    """Loads ``keys`` one at a time onto the default device."""
    out = {}
    for key in keys:
        host = _read_tensor(path, key, infos[key], dtype, (tail_start or {}).get(key, 0))
        out[key] = jax.device_put(host)
        del host  # on CPU the device array now owns the buffer; elsewhere it is freed
    return out


def _check_header(path: Path, infos: Mapping[str, _TensorInfo], required: Sequence[str]) -> None:
    missing = [key for key in required if key not in infos]
    if missing:
        raise CheckpointError(f"{path}: missing tensor(s) {missing}; file has {sorted(infos)}")
    for key, info in infos.items():
        if key in required and info.dtype not in _FLOAT_DTYPES:
            raise CheckpointError(
                f"{path}: tensor {key!r} has dtype {info.dtype}, expected one of {sorted(_FLOAT_DTYPES)}"
            )


def _check_shapes(
    path: Path,
    actual: Mapping[str, tuple[int, ...]],
    expected: Mapping[str, tuple[int, ...]],
    why: str,
) -> None:
    for key, want in expected.items():
        if key in actual and tuple(actual[key]) != tuple(want):
            raise CheckpointError(
                f"{path}: tensor {key!r} has shape {tuple(actual[key])}, expected {tuple(want)} ({why})"
            )


# ---------------------------------------------------------------------------------------------
# Gemma Scope 2 SAEs and transcoders.

_ARCHITECTURES = {"jump_relu": "jumprelu", "jumprelu": "jumprelu", "relu": "relu", "topk": "topk"}


def _labels_from_folder(folder: str) -> dict[str, str]:
    match = re.search(r"width_([0-9]+[kmKM]?)(?:_l0_([A-Za-z0-9]+))?", folder)
    labels = {}
    if match:
        labels["width_label"] = match.group(1)
        if match.group(2):
            labels["l0_label"] = match.group(2)
    return labels


def load_sae(
    source: str | os.PathLike,
    folder: str | None = None,
    *,
    dtype: jax.typing.DTypeLike = jnp.float32,
    revision: str | None = None,
    expected_d_in: int | None = None,
    name: str = "sae",
) -> AutoEncoder | AutoEncoderSkip:
    """Loads a Gemma Scope 2 SAE or (skip) transcoder folder.

    Args:
      source: A local folder, a hub repo id ("google/gemma-scope-2-1b-pt", with
        ``folder``) or a single "repo:folder" string.
      folder: Sub-folder inside ``source`` holding config.json and params.safetensors.
      dtype: Parameter dtype (tensors are cast one at a time while reading).
      revision: Hub revision (branch, tag or commit) for hub sources.
      expected_d_in: If given, the input width must equal this (e.g. the model's d_model).
      name: Parameter label prefix.

    Returns:
      An `AutoEncoder`, or an `AutoEncoderSkip` for transcoders with an affine skip.

    Raises:
      FileNotFoundError: a file is missing. CheckpointError: tensors are missing,
        mis-shaped, non-float, non-finite, or contradict config.json / ``expected_d_in``.
    """
    paths, label = _fetch(source, folder, [CONFIG_FILE, PARAMS_FILE], revision)
    config_path, params_path = paths[CONFIG_FILE], paths[PARAMS_FILE]
    try:
        config = json.loads(config_path.read_text())
    except ValueError as exc:
        raise CheckpointError(f"{config_path}: not valid JSON: {exc}") from exc
    kind = config.get("type", "sae")
    if kind not in ("sae", "transcoder"):
        raise CheckpointError(
            f"{config_path}: type {kind!r} is not an SAE/transcoder (use load_clt for 'clt')"
        )
    arch = str(config.get("architecture", "jump_relu")).lower()
    if arch not in _ARCHITECTURES:
        raise CheckpointError(f"{config_path}: unsupported architecture {arch!r}")
    activation = _ARCHITECTURES[arch]
    k = config.get("k")
    if activation == "topk" and not isinstance(k, int):
        raise CheckpointError(f"{config_path}: architecture 'topk' needs an integer 'k', got {k!r}")

    infos = _read_header(params_path)
    required = ["w_enc", "b_enc", "w_dec", "b_dec"] + (
        ["threshold"] if activation == "jumprelu" else []
    )
    affine = bool(config.get("affine_connection", False))
    if affine:
        required.append("affine_skip_connection")
    elif "affine_skip_connection" in infos:
        raise CheckpointError(
            f"{params_path}: has 'affine_skip_connection' but {config_path} says affine_connection=false"
        )
    _check_header(params_path, infos, required)
    shapes = {key: infos[key].shape for key in required}
    if len(shapes["w_enc"]) != 2 or len(shapes["w_dec"]) != 2:
        raise CheckpointError(
            f"{params_path}: w_enc {shapes['w_enc']} and w_dec {shapes['w_dec']} must be 2-D"
        )
    d_in, d_sae = shapes["w_enc"]
    d_out = shapes["w_dec"][1]
    width = config.get("width")
    if width is not None and int(width) != d_sae:
        raise CheckpointError(
            f"{params_path}: w_enc has shape {shapes['w_enc']} but {config_path} says width={width}"
        )
    if expected_d_in is not None and d_in != expected_d_in:
        raise CheckpointError(
            f"{params_path}: w_enc has shape {shapes['w_enc']}: d_in={d_in}, expected {expected_d_in}"
        )
    if kind == "sae" and d_out != d_in:
        raise CheckpointError(
            f"{params_path}: SAE with w_enc {shapes['w_enc']} and w_dec {shapes['w_dec']}: d_in != d_out"
        )
    _check_shapes(
        params_path,
        shapes,
        {
            "b_enc": (d_sae,),
            "w_dec": (d_sae, d_out),
            "b_dec": (d_out,),
            "threshold": (d_sae,),
            "affine_skip_connection": (d_in, d_out),
        },
        f"from w_enc {shapes['w_enc']} and w_dec {shapes['w_dec']}",
    )

    hook_in = config.get("hf_hook_point_in")
    hook_out = config.get("hf_hook_point_out", hook_in)
    meta = SaeMeta(
        d_in=d_in,
        d_sae=d_sae,
        d_out=d_out,
        activation=activation,
        k=k,
        site_in=site_from_hook(hook_in) if hook_in else "",
        site_out=site_from_hook(hook_out) if hook_out else "",
        source=label,
        extra={**config, **_labels_from_folder(label)},
    )
    arrays = _load_tensors(params_path, infos, required, dtype)
    return AutoEncoder.from_arrays(
        arrays["w_enc"],
        arrays["b_enc"],
        arrays["w_dec"],
        arrays["b_dec"],
        arrays.get("threshold"),
        activation=activation,
        k=k,
        w_skip=arrays.get("affine_skip_connection"),
        dtype=dtype,
        meta=meta,
        name=name,
    )


def save_gemma_scope_2(
    sae: AutoEncoder, folder: str | os.PathLike, *, overwrite: bool = False
) -> Path:
    """Writes ``sae`` as a Gemma Scope 2 folder (config.json + params.safetensors).

    The folder is written under a temporary name next to ``folder`` and renamed into
    place, so a crash never leaves a half-written folder. JSON-serialisable entries of
    ``sae.meta.extra`` are kept in config.json; the structural keys are recomputed.
    """
    folder = Path(folder)
    if folder.exists() and not overwrite:
        raise FileExistsError(f"{folder} already exists (pass overwrite=True)")
    meta = sae.meta
    arrays = sae.to_arrays()
    tensors = {
        key: arrays[key]
        for key in ("w_enc", "b_enc", "w_dec", "b_dec", "threshold")
        if key in arrays
    }
    if "w_skip" in arrays:
        tensors["affine_skip_connection"] = arrays["w_skip"]
    config: dict[str, Any] = {}
    for key, value in dict(meta.extra).items():
        try:
            json.dumps(value)
        except TypeError:
            continue
        config[key] = value
    site_in, site_out = meta.site_in, meta.site_out or meta.site_in
    config.update(
        width=meta.d_sae,
        architecture={"jumprelu": "jump_relu"}.get(meta.activation, meta.activation),
        type="transcoder"
        if (site_out != site_in or "w_skip" in arrays or meta.d_in != meta.d_out)
        else "sae",
        affine_connection="w_skip" in arrays,
    )
    if site_in:
        config["hf_hook_point_in"] = hook_from_site(site_in)
        config["hf_hook_point_out"] = hook_from_site(site_out)
    if meta.k is not None:
        config["k"] = meta.k
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True))
        save_file(
            {key: np.ascontiguousarray(value) for key, value in tensors.items()},
            str(tmp / PARAMS_FILE),
        )
        os.chmod(tmp, 0o755)
        if folder.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old-", dir=folder.parent))
            os.replace(folder, old / "previous")
            try:
                os.replace(tmp, folder)
            except OSError:
                os.replace(old / "previous", folder)  # put the previous version back
                raise
            finally:
                shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


# ---------------------------------------------------------------------------------------------
# Gemma Scope 1 (params.npz).


def load_gemma_scope_1(
    source: str | os.PathLike,
    folder: str | None = None,
    *,
    dtype: jax.typing.DTypeLike = jnp.float32,
    revision: str | None = None,
    site: str = "",
    name: str = "sae",
) -> AutoEncoder:
    """Loads a Gemma Scope 1 JumpReLU SAE from ``params.npz`` (never unpickling).

    Keys W_enc [d_in, d_sae], b_enc, W_dec [d_sae, d_in], b_dec, threshold are matched
    case-insensitively. ``site`` defaults to one guessed from "layer_<L>" in the path and
    the repo suffix (-res -> resid_post, -mlp -> mlp_out, -att -> attn_out), else "".
    """
    paths, label = _fetch(source, folder, [NPZ_FILE], revision)
    path = paths[NPZ_FILE]
    try:
        npz = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable .npz file: {exc}") from exc
    with npz:
        by_lower = {key.lower(): key for key in npz.files}
        required = ["w_enc", "b_enc", "w_dec", "b_dec", "threshold"]
        missing = [key for key in required if key not in by_lower]
        if missing:
            raise CheckpointError(
                f"{path}: missing array(s) {missing}; file has {sorted(npz.files)}"
            )
        arrays = {}
        for key in required:
            value = npz[by_lower[key]]
            if not np.issubdtype(value.dtype, np.floating) or not np.isfinite(value).all():
                raise CheckpointError(
                    f"{path}: array {by_lower[key]!r} {value.shape} is not finite floats"
                )
            arrays[key] = jax.device_put(value.astype(dtype, copy=False))
            del value
    if not site:
        layer = re.search(r"layer_(\d+)", label)
        kind = next(
            (
                k
                for suffix, k in (("-res", "resid_post"), ("-mlp", "mlp_out"), ("-att", "attn_out"))
                if suffix in label
            ),
            None,
        )
        site = f"blocks.{layer.group(1)}.{kind}" if layer and kind else ""
    d_in, d_sae = arrays["w_enc"].shape
    meta = SaeMeta(
        d_in=d_in,
        d_sae=d_sae,
        d_out=arrays["w_dec"].shape[-1],
        site_in=site,
        site_out=site,
        source=label,
        extra={"format": "gemma_scope_1", **_labels_from_folder(label)},
    )
    try:
        return AutoEncoder.from_arrays(**arrays, dtype=dtype, meta=meta, name=name)
    except ValueError as exc:
        raise CheckpointError(f"{path}: {exc}") from exc


# ---------------------------------------------------------------------------------------------
# Cross-layer transcoders.


@pz.pytree_dataclass
class CrossLayerTranscoder(pz.Struct):
    """A Gemma Scope 2 cross-layer transcoder (CLT) on plain ``[..., d]`` arrays.

    Source layer ``i`` encodes its MLP input ``x_i`` into latents ``f_i``; the output for
    target layer ``j`` is ``sum_{i <= j} f_i @ w_dec[i][:, j - i] + b_dec[j]`` plus the
    affine skip ``x_j @ w_skip[j]`` when present.

    Attributes:
      w_enc: Per source layer, [d_model, d_sae].
      b_enc: Per source layer, [d_sae].
      threshold: Per source layer, [d_sae] (JumpReLU).
      w_dec: Per source layer i, [d_sae, n_layers - i, d_model] (targets i, i+1, ...).
      b_dec: Per target layer, [d_model].
      w_skip: Per layer [d_model, d_model], or None.
      meta: Static `SaeMeta` shared by all layers (d_in = d_out = d_model); its extra holds
        "n_layers" and the site kinds read and written ("mlp_in" / "mlp_out" by default).
    """

    w_enc: list[jax.Array]
    b_enc: list[jax.Array]
    threshold: list[jax.Array]
    w_dec: list[jax.Array]
    b_dec: list[jax.Array]
    w_skip: list[jax.Array] | None
    meta: SaeMeta = dataclasses.field(metadata={"pytree_node": False})

    @property
    def n_layers(self) -> int:
        return len(self.w_enc)

    def sites(self, layer: int) -> tuple[str, str]:
        """(input site, output site) of ``layer``, e.g. ("blocks.3.mlp_in", "blocks.3.mlp_out")."""
        kind_in = self.meta.extra.get("site_kind_in", "mlp_in")
        kind_out = self.meta.extra.get("site_kind_out", "mlp_out")
        return f"blocks.{layer}.{kind_in}", f"blocks.{layer}.{kind_out}"

    def encode(self, x: jax.Array, layer: int) -> jax.Array:
        """Latents [..., d_sae] of source layer ``layer`` for its input ``x`` [..., d_model]."""
        params = {
            "w_enc": self.w_enc[layer],
            "b_enc": self.b_enc[layer],
            "threshold": self.threshold[layer],
        }
        return encode_arrays(params, x, "jumprelu")

    def decode_to_layer(self, latents_by_layer: Sequence[jax.Array], target: int) -> jax.Array:
        """Reconstruction at ``target`` from latents of source layers 0..target (skip excluded)."""
        if len(latents_by_layer) <= target:
            raise ValueError(
                f"need latents of layers 0..{target}, got {len(latents_by_layer)} layers"
            )
        out = decode_arrays(
            {"w_dec": self.w_dec[0][:, target], "b_dec": self.b_dec[target]}, latents_by_layer[0]
        )
        for i in range(1, target + 1):
            out = out + latents_by_layer[i] @ self.w_dec[i][:, target - i]
        return out

    def skip_to_layer(self, x: jax.Array, layer: int) -> jax.Array:
        """The affine skip term ``x @ w_skip[layer]`` (zeros when there is no skip)."""
        return jnp.zeros_like(x) if self.w_skip is None else x @ self.w_skip[layer]

    def __call__(self, inputs_by_layer: Sequence[jax.Array]) -> list[jax.Array]:
        """Outputs for every layer, given the MLP inputs of every layer."""
        latents = [self.encode(x, i) for i, x in enumerate(inputs_by_layer)]
        return [
            self.decode_to_layer(latents, j) + self.skip_to_layer(inputs_by_layer[j], j)
            for j in range(len(inputs_by_layer))
        ]


def _clt_layer_files(source, folder, n_layers, revision) -> tuple[list[Path], str, dict]:
    base, folder, local = _split_source(source, folder)
    if n_layers is None:
        if local:
            root = Path(base) / folder if folder else Path(base)
            names = [p.name for p in root.glob("params_layer_*.safetensors")]
        else:
            prefix = f"{folder.strip('/')}/" if folder else ""
            names = [
                f[len(prefix) :]
                for f in list_repo_files(base, revision=revision)
                if f.startswith(prefix)
            ]
        indices = sorted(int(m.group(1)) for m in map(_CLT_FILE_RE.match, names) if m)
        if not indices or indices != list(range(len(indices))):
            raise FileNotFoundError(
                f"{source}:{folder}: expected params_layer_0..N-1.safetensors, found {indices}"
            )
        n_layers = len(indices)
    names = [f"params_layer_{i}.safetensors" for i in range(n_layers)]
    paths, label = _fetch(base, folder, names, revision, optional=[CONFIG_FILE])
    config = json.loads(paths[CONFIG_FILE].read_text()) if CONFIG_FILE in paths else {}
    return [paths[n] for n in names], label, config


def load_clt(
    source: str | os.PathLike,
    folder: str | None = None,
    *,
    n_layers: int | None = None,
    dtype: jax.typing.DTypeLike = jnp.float32,
    revision: str | None = None,
) -> CrossLayerTranscoder:
    """Loads a Gemma Scope 2 cross-layer transcoder (``params_layer_{i}.safetensors`` files).

    Only the used part ``w_dec[:, i:, :]`` of each source layer's decoder is kept.
    ``n_layers`` defaults to the number of layer files found (locally or on the hub).
    """
    files, label, config = _clt_layer_files(source, folder, n_layers, revision)
    n = len(files)
    parts: dict[str, list[jax.Array]] = {
        k: [] for k in ("w_enc", "b_enc", "threshold", "w_dec", "b_dec", "w_skip")
    }
    d_model = d_sae = None
    for i, path in enumerate(files):
        infos = _read_header(path)
        keys = ["w_enc", "b_enc", "threshold", "w_dec", "b_dec"]
        if "affine_skip_connection" in infos or parts["w_skip"]:
            keys.append("affine_skip_connection")
        _check_header(path, infos, keys)
        if d_model is None:
            if len(infos["w_enc"].shape) != 2:
                raise CheckpointError(
                    f"{path}: w_enc has shape {infos['w_enc'].shape}, expected [d_model, d_sae]"
                )
            d_model, d_sae = infos["w_enc"].shape
        _check_shapes(
            path,
            {k: infos[k].shape for k in keys},
            {
                "w_enc": (d_model, d_sae),
                "b_enc": (d_sae,),
                "threshold": (d_sae,),
                "w_dec": (d_sae, n, d_model),
                "b_dec": (d_model,),
                "affine_skip_connection": (d_model, d_model),
            },
            f"{n} layers, d_model={d_model}, d_sae={d_sae}",
        )
        arrays = _load_tensors(path, infos, keys, dtype, tail_start={"w_dec": i})
        for key, value in arrays.items():
            parts["w_skip" if key == "affine_skip_connection" else key].append(value)
    kinds = {}
    for end, default in (("in", "mlp_in"), ("out", "mlp_out")):
        hook = config.get(f"hf_hook_point_{end}")
        kinds[f"site_kind_{end}"] = site_from_hook(hook).split(".")[-1] if hook else default
    meta = SaeMeta(
        d_in=d_model,
        d_sae=d_sae,
        d_out=d_model,
        source=label,
        extra={**config, "n_layers": n, **kinds, **_labels_from_folder(label)},
    )
    return CrossLayerTranscoder(w_skip=parts.pop("w_skip") or None, meta=meta, **parts)
