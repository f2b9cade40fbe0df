"""The one place that maps arrays onto devices.

One `Mesh` with axes ('data', 'fsdp', 'model'). Parameters carry logical axis names
(`nn.with_logical_partitioning`); a single table of logical -> mesh rules (in the config)
decides how they are laid out, so changing the parallelism is a config change. Batches are
split over ('data', 'fsdp').
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "model")
BATCH_AXES = ("data", "fsdp")

# Logical axis -> mesh axis. 'embed' is the large dimension of every weight matrix, so
# sharding it over 'fsdp' shards all big matrices (and their optimizer moments) ZeRO-3 style;
# 'mlp' / 'heads' go to 'model' for tensor parallelism when the mesh has one.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH_AXES),
    ("embed", "fsdp"),
    ("mlp", "model"),
    ("heads", "model"),
)  # logical names not listed (e.g. 'patch', 'classes') are replicated


def make_mesh(shape: Sequence[int] = (-1, 1, 1), devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Mesh over `devices` (default: all) with axes ('data', 'fsdp', 'model').

  One entry of `shape` may be -1: it takes the devices left over by the others.
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = list(shape)
  if len(shape) != len(MESH_AXES):
    raise ValueError(f"mesh shape {tuple(shape)} must have one size per axis {MESH_AXES}")
  if shape.count(-1) > 1:
    raise ValueError(f"mesh shape {tuple(shape)}: at most one axis may be -1")
  if -1 in shape:
    known = int(np.prod([s for s in shape if s != -1]))
    if len(devices) % known:
      raise ValueError(f"mesh shape {tuple(shape)} does not divide {len(devices)} devices")
    shape[shape.index(-1)] = len(devices) // known
  if int(np.prod(shape)) != len(devices):
    raise ValueError(f"mesh shape {tuple(shape)} needs {int(np.prod(shape))} devices, "
                     f"have {len(devices)}")
  # mesh_utils orders devices so that inner axes use the fastest interconnect.
  from jax.experimental import mesh_utils
  device_grid = mesh_utils.create_device_mesh(shape, devices=devices)
  return Mesh(device_grid, MESH_AXES)  # Auto axes: shardings come from in/out_shardings


def rules_from_config(rules) -> tuple[tuple[str, Any], ...]:
  """Config rules (lists from ml_collections / JSON) -> hashable tuples."""
  out = []
  for name, axes in rules:
    if isinstance(axes, (list, tuple)):
      axes = tuple(axes)
    out.append((name, axes))
  return tuple(out)


def logical_shardings(abstract_tree, mesh: Mesh, rules=DEFAULT_RULES):
  """NamedShardings for a tree whose leaves may be `nn.Partitioned` boxes (e.g. the output
  of `jax.eval_shape` of an init); unboxed leaves are replicated."""
  specs = nn.get_partition_spec(abstract_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, rules)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
  """Leading (batch) dimension split over ('data', 'fsdp'); the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def shard_batch(batch, mesh: Mesh):
  """Host-local numpy batch -> global jax arrays split over ('data', 'fsdp').

  On several hosts each one passes only the rows its loader read; the global batch is the
  concatenation over processes in process order.
  """
  def put(x):
    x = np.asarray(x)
    return jax.make_array_from_process_local_data(batch_sharding(mesh, x.ndim), x)
  return jax.tree.map(put, batch)


def batch_divisor(mesh: Mesh) -> int:
  """Global batch sizes must be a multiple of this."""
  return mesh.shape["data"] * mesh.shape["fsdp"]


def pad_rows(x: np.ndarray, rows: int) -> np.ndarray:
  """Zero rows appended up to `rows`: a short last batch keeps the compiled shape and
  splits evenly over the devices; callers drop the padded outputs."""
  x = np.asarray(x)
  return np.concatenate([x, np.zeros((rows - len(x), *x.shape[1:]), x.dtype)])


def check_batch_size(batch_size: int, mesh: Mesh) -> None:
  """A global batch must split evenly over the data-parallel devices and the hosts."""
  if batch_size % batch_divisor(mesh) or batch_size % jax.process_count():
    raise ValueError(f"config.batch_size={batch_size} must divide over the {batch_divisor(mesh)} "
                     f"data-parallel devices and {jax.process_count()} hosts")


def maybe_initialize_distributed(enable: bool | None = None) -> None:
  """Joins a multi-host job (TPU pod slice, SLURM, an explicit coordinator).

  Must run before anything else touches jax. `enable=None` decides from the environment;
  jax.distributed then discovers the cluster itself.
  """
  import os
  if enable is None:
    enable = any(k in os.environ for k in ("JAX_COORDINATOR_ADDRESS", "TPU_WORKER_HOSTNAMES",
                                           "MEGASCALE_COORDINATOR_ADDRESS", "SLURM_NTASKS"))
  if enable:
    jax.distributed.initialize()
