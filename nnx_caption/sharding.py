"""Logical axis names -> mesh axes: one rules table, kept out of the model math.

Parameters carry logical names as `axes` metadata on their `nnx.Param`; activations are
constrained with `constrain(x, names)`. Both are mapped onto the mesh (data, fsdp, tensor) by
RULES. Outside a mesh context every constraint is a no-op, so the model runs unchanged on one
device.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# logical name -> mesh axes it is split over (None: replicated). Parameters use embed / mlp /
# heads / kv / vocab; activations use batch / seq and the act_* names, so that FSDP shards the
# weights' embed dim without also splitting the activations' feature dim.
RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),
    "seq": None,
    "embed": "fsdp",
    "mlp": "tensor",
    "heads": "tensor",
    "kv": None,
    "vocab": "tensor",
    "act_embed": None,
    "act_mlp": "tensor",
    "act_heads": "tensor",
    "act_vocab": "tensor",
}

Axes = Sequence[str | None]


def logical_to_spec(axes: Axes, mesh_axis_names: Sequence[str] = MESH_AXES) -> PartitionSpec:
    """Maps logical names to a PartitionSpec, dropping mesh axes the mesh does not have."""
    spec, used = [], set()
    for name in axes:
        target = RULES.get(name) if name is not None else None
        if target is None:
            spec.append(None)
            continue
        targets = (target,) if isinstance(target, str) else target
        # A mesh axis may split only one dim of an array.
        kept = tuple(t for t in targets if t in mesh_axis_names and t not in used)
        used.update(kept)
        spec.append(kept[0] if len(kept) == 1 else (kept or None))
    return PartitionSpec(*spec)


def constrain(x: jax.Array, axes: Axes) -> jax.Array:
    """Sharding constraint on an activation, by logical names; a no-op without a mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(axes, mesh.axis_names))


def mesh_shape(data: int, fsdp: int, tensor: int, devices: int) -> tuple[int, int, int]:
    """The (data, fsdp, tensor) sizes over `devices`, data -1 taking what the others leave; a
    ValueError when they do not fit."""
    if data == -1:
        if devices % (fsdp * tensor):
            raise ValueError(f"fsdp*tensor={fsdp * tensor} does not divide {devices} devices")
        data = devices // (fsdp * tensor)
    if data * fsdp * tensor != devices:
        raise ValueError(
            f"mesh data={data} fsdp={fsdp} tensor={tensor} needs {data * fsdp * tensor} "
            f"devices; there are {devices}"
        )
    return data, fsdp, tensor


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1) -> Mesh:
    """A (data, fsdp, tensor) mesh over all devices; -1 takes what the other axes leave."""
    shape = mesh_shape(data, fsdp, tensor, jax.device_count())
    auto = (jax.sharding.AxisType.Auto,) * 3
    return jax.make_mesh(shape, MESH_AXES, axis_types=auto)


def param_sharding(param: nnx.Variable, mesh: Mesh) -> NamedSharding:
    """Where one parameter lives on `mesh`, from its `axes` metadata. A dim that a mesh axis
    does not divide (GPT-2's vocabulary of 50257, say) stays replicated along that axis."""
    axes = param.get_metadata().get("axes") or (None,) * len(param.shape)
    spec = []
    for dim, entry in zip(param.shape, logical_to_spec(axes, mesh.axis_names), strict=False):
        names = (entry,) if isinstance(entry, str) else tuple(entry or ())
        divides = dim % math.prod(mesh.shape[n] for n in names) == 0
        spec.append(entry if divides else None)
    return NamedSharding(mesh, PartitionSpec(*spec))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Where a batch's leading (examples) dim lives: RULES["batch"], the split the models'
    activations are constrained to, so that inputs and activations agree whatever the rules."""
    return NamedSharding(mesh, logical_to_spec(("batch",), mesh.axis_names))


def put_rows(rows: np.ndarray, mesh: Mesh) -> jax.Array:
    """This process's contiguous block of a global batch's rows (data.process_rows) onto the
    mesh's batch axis: the global batch holds every process's block, in process order."""
    shape = (len(rows) * jax.process_count(), *rows.shape[1:])
    return jax.make_array_from_process_local_data(batch_sharding(mesh), rows, shape)


def place(value: np.ndarray, sharding: jax.sharding.Sharding) -> jax.Array:
    """A host array onto `sharding`, each process putting only its own shards, so the same
    call serves one device, a mesh and a multi-host mesh."""
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def scalar(x: jax.Array) -> float:
    """A replicated scalar's value, also when it spans other processes' devices."""
    return float(np.asarray(x.addressable_data(0)))


def to_host(x: jax.Array) -> np.ndarray:
    """The whole array on the host, as a new numpy array (not the one jax would keep cached on
    `x`: an export reads every parameter once, and the copies would add up to the model).
    Every process must call it for an array sharded across processes (an all-gather); a
    replicated one is read from this process's own copy."""
    if x.is_fully_replicated:
        return np.array(x.addressable_data(0))
    if not x.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    out = np.empty(x.shape, x.dtype)
    for shard in x.addressable_shards:  # each block once, from one device that holds it
        if shard.replica_id == 0:
            out[shard.index] = np.asarray(shard.data)
    return out
