"""Device mesh, logical-axis rules, and helpers that place params and batches on it.

The mesh has three axes: `data` (pure data parallel, across slices), `fsdp` (params and
batch sharded) and `tensor` (heads, mlp, vocab). Model code names logical axes only
(`retrv_jax.models.axes`); the rules, which live in the config, map them to mesh axes.
A logical axis whose size the mapped mesh axes do not divide is replicated instead
(e.g. 2 kv heads on a tensor axis of 4), so any valid model runs on any mesh.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

Rules = Sequence[tuple[str, Any]]

# Logical axis -> mesh axis (or tuple of axes, or None). The config carries a copy.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH_AXES),
    ("length", None),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("layers", None),
    ("cache_length", None),
    ("vision_patches", None),
    ("vision_patch_dim", None),
    ("vision_embed", "fsdp"),
    ("vision_heads", "tensor"),
    ("vision_mlp", "tensor"),
    ("vision_qkv", None),
)


def mesh_shape(sizes: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
  """Resolves `{'data': d, 'fsdp': f, 'tensor': t}` with at most one -1 ('the rest')."""
  shape = [int(sizes[name]) for name in MESH_AXES]
  if shape.count(-1) > 1:
    given = dict(zip(MESH_AXES, shape, strict=True))
    raise ValueError(f"mesh: at most one axis may be -1, got {given}")
  known = math.prod(s for s in shape if s != -1)
  if any(s == 0 or s < -1 for s in shape) or num_devices % known:
    given = dict(zip(MESH_AXES, shape, strict=True))
    raise ValueError(f"mesh: sizes {given} do not divide {num_devices} devices")
  shape = [num_devices // known if s == -1 else s for s in shape]
  if math.prod(shape) != num_devices:
    raise ValueError(
        f"mesh: sizes {dict(zip(MESH_AXES, shape, strict=True))} use {math.prod(shape)} of "
        f"{num_devices} devices; set one axis to -1 to take the rest"
    )
  return tuple(shape)


def create_mesh(sizes: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A `Mesh` over all (or the given) devices, laid out for the physical topology."""
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(sizes, len(devices))
  try:
    grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
  except (ValueError, NotImplementedError, AssertionError):
    grid = np.asarray(devices).reshape(shape)
  return Mesh(grid, MESH_AXES)


def _mesh_axes_of(logical: str | None, rules: Rules) -> tuple[str, ...]:
  for name, target in rules:
    if name == logical:
      if target is None:
        return ()
      return (target,) if isinstance(target, str) else tuple(target)
  return ()


def logical_to_spec(
    names: Sequence[str | None], shape: Sequence[int], axis_sizes: Mapping[str, int], rules: Rules
) -> PartitionSpec:
  """PartitionSpec for an array with logical axis `names`, replicating what won't divide.

  `axis_sizes` maps mesh axis names to sizes (`mesh.shape`). A mesh axis is used at most
  once per array (the first logical axis claiming it wins).
  """
  used: set[str] = set()
  spec = []
  for name, size in zip(names, shape, strict=True):
    mesh_axes = tuple(a for a in _mesh_axes_of(name, rules) if a not in used)
    if mesh_axes and size % math.prod(axis_sizes[a] for a in mesh_axes) == 0:
      used.update(mesh_axes)
      spec.append(mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
    else:
      spec.append(None)
  return PartitionSpec(*spec)


def shardings_of(abstract_tree: Any, mesh: Mesh, rules: Rules) -> Any:
  """NamedShardings for a tree of `nn.LogicallyPartitioned` boxes (e.g. from eval_shape).

  Leaves without logical names are replicated.
  """

  def one(leaf):
    if isinstance(leaf, nn.LogicallyPartitioned):
      value = leaf.value
      return NamedSharding(mesh, logical_to_spec(leaf.names, value.shape, mesh.shape, rules))
    return NamedSharding(mesh, PartitionSpec())

  return jax.tree.map(one, abstract_tree, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def batch_shards(mesh: Mesh) -> int:
  """How many ways a batch is split: the size of mesh data x fsdp."""
  return math.prod(mesh.shape[axis] for axis in BATCH_AXES)


def batch_sharding(mesh: Mesh, ndim: int, batch_axis: int = 0) -> NamedSharding:
  """Shards dimension `batch_axis` over (data, fsdp); the rest is replicated."""
  spec = [None] * ndim
  spec[batch_axis] = BATCH_AXES
  return NamedSharding(mesh, PartitionSpec(*spec))


def shard_batch(local_batch: Any, mesh: Mesh, batch_axis: int = 0) -> Any:
  """Global arrays from each process's local slice of the batch (multi-host aware).

  Every process passes its own rows; the global batch is their concatenation in
  process order.
  """

  def one(x):
    x = np.asarray(x)
    axis = batch_axis if x.ndim > batch_axis else 0
    return jax.make_array_from_process_local_data(batch_sharding(mesh, x.ndim, axis), x)

  return jax.tree.map(one, local_batch)


def unbox(tree: Any) -> Any:
  """Leaves without their logical-axis boxes. Unlike `nn.meta.unbox` it applies no sharding
  constraint, so it also works on abstract or host values while a mesh is active."""
  boxed = lambda x: isinstance(x, nn.meta.AxisMetadata)
  return jax.tree.map(lambda x: x.unbox(apply_constraint=False) if boxed(x) else x, tree,
                      is_leaf=boxed)


def with_rules(rules: Rules):
  """Context manager installing the logical-axis rules for `nn.with_logical_constraint`."""
  return nn.logical_axis_rules(tuple((name, target) for name, target in rules))


def maybe_initialize_distributed(coordinator: str = "", num_processes: int = 1,
                                 process_id: int = 0) -> None:
  """Joins a multi-process run; on Cloud TPU all arguments are discovered automatically.

  Args:
    coordinator: 'host:port' of process 0; empty on TPU VMs (auto-detected).
    num_processes: total processes; 1 skips initialisation unless on a TPU pod.
    process_id: this process's index.
  """
  if num_processes > 1 or coordinator:
    jax.distributed.initialize(
        coordinator_address=coordinator or None,
        num_processes=num_processes,
        process_id=process_id,
    )
