"""The one place that maps arrays onto devices and processes.

One `Mesh` with axes ('data', 'fsdp', 'model'). Parameters carry logical axis names
(`nn.with_logical_partitioning`); a single table of logical -> mesh rules (in the config)
decides how they are laid out, so changing the parallelism is a config change. Batches are
split over ('data', 'fsdp').

Several processes (one per host, or one per GPU): `join` connects them; `map_batches` runs a
model over each process's own rows and hands each its own outputs; `allgather_rows`,
`process_share` and `barrier` split work and bring results together.
"""

from __future__ import annotations

import functools
import os
import sys
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from absl import flags
from jax.experimental import multihost_utils
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


# Logical names of activations: the residual stream of a transformer block is split over the
# batch and whole along tokens and width ('length' and 'act_embed' are in no rule), so FSDP
# gathers weights rather than activations, whatever propagation would have picked.
ACTIVATION_AXES = ("batch", "length", "act_embed")


def with_rules(fn: Callable, mesh: Mesh, rules=DEFAULT_RULES) -> Callable:
  """`fn` traced with `mesh` and the logical `rules` in scope, so the models'
  `nn.with_logical_constraint` calls become sharding constraints (outside such a scope they
  are no-ops: a model applied on one device, or in numpy-facing code, is unconstrained)."""
  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(rules):
      return fn(*args, **kwargs)
  return wrapped


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
    if isinstance(x, jax.Array):  # already global (`loaders.prefetch_to_device`)
      return x
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


def check_batch_size(batch_size: int, mesh: Mesh, micro_batches: int = 1) -> None:
  """A global batch, and each of its `micro_batches` (gradient accumulation), must split
  evenly over the data-parallel devices and the hosts."""
  if micro_batches < 1 or batch_size % micro_batches:
    raise ValueError(f"config.grad_accum_steps={micro_batches} must divide config.batch_size="
                     f"{batch_size}")
  if micro_batches > 1:
    check_batch_size(batch_size // micro_batches, mesh)
  if batch_size % batch_divisor(mesh) or batch_size % jax.process_count():
    raise ValueError(f"config.batch_size={batch_size} must divide over the {batch_divisor(mesh)} "
                     f"data-parallel devices and {jax.process_count()} hosts")


# ---- Several processes ----


def batch_rows(batch_size: int, mesh: Mesh) -> int:
  """This process's rows of a global batch of (at least) `batch_size`: rounded up so the
  global batch splits evenly over the data-parallel devices of every process."""
  div = batch_divisor(mesh)
  procs = jax.process_count()
  if div % procs:
    raise ValueError(f"mesh {dict(mesh.shape)}: its {div} data-parallel devices do not split over "
                     f"{procs} processes; put the process-spanning devices on 'data' or 'fsdp'")
  return -(-batch_size // div) * div // procs


def _any_process(flag: bool) -> bool:
  """Whether `flag` holds on any process (a tiny collective; local on one process)."""
  if jax.process_count() == 1:
    return bool(flag)
  return bool(multihost_utils.process_allgather(np.int32(flag)).any())


def map_batches(fn: Callable[[dict], Any], batches: Iterable[Mapping[str, np.ndarray]], mesh: Mesh, *,
                rows: int, row_spec: Mapping[str, jax.ShapeDtypeStruct]
                ) -> Iterator[tuple[Mapping[str, np.ndarray], Any]]:
  """Runs `fn` over this process's batches; yields (batch, outputs for exactly its rows).

  `batches` are host-local dicts of numpy arrays with at most `rows` rows each (see
  `batch_rows`); the fields named in `row_spec` (the shape and dtype of one row) go to `fn`
  as one global batch split over ('data', 'fsdp'), padded with zero rows. Every process runs
  the same number of calls: one whose batches ran out feeds padding until all are done, so
  processes with different amounts of data never hang. `fn` (jitted) returns arrays with
  the batch as leading axis; each process gets back the rows it fed, as numpy.
  """
  batch_spec = P(BATCH_AXES)
  it = iter(batches)
  while True:
    batch = next(it, None)
    if not _any_process(batch is not None):
      return
    n = 0 if batch is None else len(next(iter(batch[k] for k in row_spec)))
    if n > rows:
      raise ValueError(f"a batch of {n} rows, more than this process's {rows}")
    local = {k: pad_rows(batch[k], rows) if batch is not None else
             np.zeros((rows, *spec.shape), spec.dtype) for k, spec in row_spec.items()}
    out = fn(multihost_utils.host_local_array_to_global_array(local, mesh, batch_spec))
    out = jax.tree.map(lambda o: np.asarray(
        multihost_utils.global_array_to_host_local_array(o, mesh, batch_spec))[:n], out)
    if batch is not None:
      yield batch, out


def allgather_rows(x: np.ndarray) -> np.ndarray:
  """Every process's rows of `x` (counts may differ, trailing shape equal), concatenated in
  process order, on every process. Identity on one process."""
  x = np.asarray(x)
  if jax.process_count() == 1:
    return x
  counts = multihost_utils.process_allgather(np.int64(len(x)))
  if counts.max() == 0:
    return x
  stacked = multihost_utils.process_allgather(pad_rows(x, int(counts.max())))
  return np.concatenate([stacked[p, :c] for p, c in enumerate(counts)])


def process_owners(num_items: int, sizes: Sequence[float] | None = None) -> list[int]:
  """The process each of `num_items` items belongs to, the same on every process. With
  `sizes`, items go largest first to the least loaded process (balanced work); else
  round-robin."""
  procs = jax.process_count()
  if sizes is None:
    return [i % procs for i in range(num_items)]
  load, owner = [0.0] * procs, [0] * num_items
  for i in sorted(range(num_items), key=lambda i: (-sizes[i], i)):
    owner[i] = min(range(procs), key=lambda q: (load[q], q))
    load[owner[i]] += sizes[i]
  return owner


def process_share(items: Sequence, sizes: Sequence[float] | None = None) -> list:
  """This process's part of `items` (see `process_owners`), in their order."""
  me = jax.process_index()
  return [x for x, p in zip(items, process_owners(len(items), sizes)) if p == me]


def barrier(name: str) -> None:
  """Waits until every process got here (e.g. until process 0 wrote a shared file)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


# ---- Joining a multi-process job ----

_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0's coordinator, for a multi-process job "
    "launched by hand (SLURM, Open MPI and Cloud TPU are detected without it).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the job (with "
                                      "--coordinator_address).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index, 0..num_processes-1 "
                                   "(with --coordinator_address).")
_HEARTBEAT_TIMEOUT = flags.DEFINE_integer(
    "heartbeat_timeout", 100, "Seconds without a heartbeat after which the job counts a "
    "process as dead and stops the others.")


def _int_env(env: Mapping[str, str], key: str) -> int:
  try:
    return int(env.get(key, "0") or 0)
  except ValueError:
    return 0


def _on_cloud_tpu_vm() -> bool:
  try:
    from jax._src.cloud_tpu_init import running_in_cloud_tpu_vm
    return bool(running_in_cloud_tpu_vm)
  except (ImportError, AttributeError):  # a jax without it: the TPU device files
    return os.path.exists("/dev/accel0") or os.path.exists("/dev/vfio/0")


def join_plan(env: Mapping[str, str], coordinator_address: str | None = None,
              num_processes: int | None = None, process_id: int | None = None,
              cloud_tpu: bool = False) -> tuple[str, dict | None]:
  """(how, arguments of `jax.distributed.initialize`, or None to run as one process).

  Explicit values (flags) win, then JAX_COORDINATOR_ADDRESS + JAX_NUM_PROCESSES +
  JAX_PROCESS_ID, then what jax detects by itself: SLURM, Open MPI, a Cloud TPU VM.
  """
  explicit = {"coordinator_address": coordinator_address, "num_processes": num_processes,
              "process_id": process_id}
  if any(v is not None for v in explicit.values()):
    if num_processes == 1 and coordinator_address is None:
      return "single", None
    missing = [f"--{k}" for k, v in explicit.items() if v is None]
    if missing:
      raise ValueError(f"joining a multi-process job needs {', '.join(missing)} too "
                       "(or none of them, to detect SLURM / Open MPI / Cloud TPU)")
    return "flags", explicit
  if env.get("JAX_COORDINATOR_ADDRESS"):
    names = {"num_processes": "JAX_NUM_PROCESSES", "process_id": "JAX_PROCESS_ID"}
    args = {"coordinator_address": env["JAX_COORDINATOR_ADDRESS"]}
    missing = []
    for key, var in names.items():
      if env.get(var):
        args[key] = int(env[var])
      else:
        missing.append(var)
    slurm = _int_env(env, "SLURM_NTASKS") > 0 and "SLURM_PROCID" in env
    ompi = "OMPI_COMM_WORLD_SIZE" in env
    if missing and not (slurm or ompi):
      raise ValueError(f"JAX_COORDINATOR_ADDRESS is set but {' and '.join(missing)} "
                       "is not: set them, or pass --num_processes and --process_id")
    return "env", args  # under SLURM / Open MPI jax fills in the rest itself
  if _int_env(env, "SLURM_NTASKS") > 1 and "SLURM_PROCID" in env and "SLURM_STEP_NODELIST" in env:
    return "slurm", {}
  if _int_env(env, "OMPI_COMM_WORLD_SIZE") > 1:
    return "openmpi", {}
  if cloud_tpu or env.get("MEGASCALE_COORDINATOR_ADDRESS") or len(
      [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1:
    return "cloud_tpu", {}  # jax reads the workers from the TPU metadata server
  return "single", None


def _exit_on_uncaught_exception() -> None:
  """After the traceback, leave at once: jax's exit handler would wait (minutes) at the
  shutdown barrier for processes that are themselves stuck in a collective waiting for
  this one. Exiting lets them see it gone and fail too, instead of hanging."""
  previous = sys.excepthook

  def hook(kind, value, tb):
    previous(kind, value, tb)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)

  sys.excepthook = hook


def join() -> str:
  """Joins a multi-process job (TPU pod slice, SLURM, Open MPI, or --coordinator_address
  --num_processes --process_id) before anything else touches jax; returns how it joined.
  In a multi-process job, an uncaught exception ends the process right away."""
  parsed = flags.FLAGS.is_parsed()
  how, args = join_plan(
      os.environ, _COORDINATOR.value if parsed else None, _NUM_PROCESSES.value if parsed else None,
      _PROCESS_ID.value if parsed else None, cloud_tpu=_on_cloud_tpu_vm())
  if args is not None:
    if parsed:
      args["heartbeat_timeout_seconds"] = _HEARTBEAT_TIMEOUT.value
    jax.distributed.initialize(**args)
    _exit_on_uncaught_exception()
  return how
