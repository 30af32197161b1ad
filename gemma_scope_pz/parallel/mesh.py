"""Device meshes with the two axes every parallel run uses: ``"data"`` and ``"model"``.

``"data"`` splits the batch (data parallelism); ``"model"`` splits parameters (tensor parallelism
for Gemma 3, latent parallelism for wide dictionaries). ``jax.make_mesh`` orders the devices so
that the last axis (``"model"``) is the most local one (one host / one ICI ring / one NVLink node).
``mesh_shapes`` and ``check_divides`` turn shapes that do not fit into one-line errors naming the
mesh axis, the dimension, the sizes and the mesh shapes that would fit.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
from jax.sharding import AxisType, Mesh

DATA, MODEL = "data", "model"

__all__ = ["DATA", "MODEL", "check_divides", "make_mesh", "mesh_shapes", "describe"]


def make_mesh(data: int = -1, model: int = 1, devices: Sequence | None = None) -> Mesh:
    """A ``(data, model)`` mesh over ``devices`` (all of ``jax.devices()`` by default).

    Args:
      data: Size of the ``"data"`` axis; ``-1`` uses every device left after ``model``.
      model: Size of the ``"model"`` axis (devices each parameter is split over).
      devices: The devices to use; the first ``data * model`` of them form the mesh.

    Raises:
      ValueError: The sizes are not positive, or do not fit the number of devices (the message
        lists the mesh shapes that do).
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    if model < 1 or data == 0 or data < -1:
        raise ValueError(f"make_mesh: axis sizes must be positive, got data={data}, model={model}")
    if data == -1:
        if n % model:
            raise ValueError(
                f"make_mesh: {n} devices are not divisible by model={model}; "
                f"shapes that fit: {_shapes_text(mesh_shapes(n))}"
            )
        data = n // model
    if data * model > n:
        raise ValueError(
            f"make_mesh: mesh {data}x{model} needs {data * model} devices, only {n} available; "
            f"shapes that fit: {_shapes_text(mesh_shapes(n))}"
        )
    return jax.make_mesh(
        (data, model),
        (DATA, MODEL),
        axis_types=(AxisType.Auto, AxisType.Auto),
        devices=devices[: data * model],
    )


def mesh_shapes(
    n_devices: int,
    dims: Sequence[int] = (),
    near: int | None = None,
    data_dims: Sequence[int] = (),
) -> list:
    """``(data, model)`` shapes of all ``n_devices`` where ``model`` divides every one of ``dims``
    and ``data`` every one of ``data_dims``; sorted by distance of ``model`` from ``near`` (when
    given), else by ``model``.
    """
    shapes = [
        (n_devices // m, m)
        for m in range(1, n_devices + 1)
        if n_devices % m == 0
        and all(d % m == 0 for d in dims)
        and all(d % (n_devices // m) == 0 for d in data_dims)
    ]
    if near is not None:
        shapes.sort(key=lambda s: (abs(s[1] - near), -s[1]))
    return shapes


def check_divides(mesh: Mesh, dims: Mapping[str, tuple[int, str]], what: str = "model") -> None:
    """Raises if a dimension does not split evenly over its mesh axis.

    Args:
      mesh: The mesh.
      dims: ``{description: (size, mesh axis)}``, e.g. ``{"axis 'neurons'": (48, "model")}``.
      what: Names the thing being sharded in the message.

    Every entry counts for the mesh shapes suggested; only those that do not divide are named.
    """
    problems = [
        f"{name} (size {size}) over mesh axis {axis!r} of size {mesh.shape[axis]}"
        for name, (size, axis) in dims.items()
        if size % mesh.shape[axis]
    ]
    if not problems:
        return
    n = mesh.devices.size
    model_dims = [size for size, axis in dims.values() if axis == MODEL]
    data_dims = [size for size, axis in dims.values() if axis == DATA]
    fits = mesh_shapes(n, model_dims, near=mesh.shape.get(MODEL), data_dims=data_dims)
    raise ValueError(
        f"cannot shard {what} over mesh {describe(mesh)}: "
        + "; ".join(problems)
        + f" does not divide. Mesh shapes (data x model) of {n} devices that fit: "
        + _shapes_text(fits)
    )


def describe(mesh: Mesh) -> str:
    """``"(data=2, model=4)"``: the axis sizes of a mesh."""
    return "(" + ", ".join(f"{k}={v}" for k, v in mesh.shape.items()) + ")"


def _shapes_text(shapes: list) -> str:
    return ", ".join(f"{d}x{m}" for d, m in shapes) or "none"
