"""Throughput benchmarks (what launch/bench.py runs). Never used as timed tests.

Each benchmark warms up (compilation), then times steps one by one, blocking on the
result, and reports the median: img/s, step time, peak device memory where the backend
reports it, and model FLOPs utilisation: the model's FLOPs (`affect_jax.flops`) over a peak
FLOP/s figure (given, or known for the device kind). `op_profile` traces a few steps with
`jax.profiler` and sums the time of each XLA operation, for finding where a step's time goes.

The benchmarks of a training stage take that stage's config (an `ml_collections.ConfigDict`
as `configs/mae_pretrain.py`, `configs/expr_finetune.py`, `configs/common.py:
get_temporal_config` make it; launch/bench.py builds them from its --preset) and never
change it: what a benchmark overrides (batch, dtype, image size, ...) it sets on a copy.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import statistics
import time
from typing import Callable, Mapping, Sequence

import jax
import ml_collections
import numpy as np

from affect_jax import flops, optim, sharding
from affect_jax.data import loaders, segments
from affect_jax.models import cpu_kernels
from affect_jax.train import finetune, pretrain, temporal


def compiled_flops(compiled, num_devices: int = 1) -> float | None:
  """FLOPs of one call of a compiled jitted function, from XLA's cost analysis.

  The analysis is of the per-device (SPMD-partitioned) program; `num_devices` sums it over
  the mesh, so work replicated on every device (e.g. a data-parallel optimizer update) is
  counted on each.
  """
  try:
    cost = compiled.cost_analysis()
  except Exception:  # noqa: BLE001 - some backends do not implement it
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  return float(cost["flops"]) * num_devices if cost and "flops" in cost else None


def peak_memory_bytes(device: jax.Device) -> int | None:
  stats = device.memory_stats() if hasattr(device, "memory_stats") else None
  return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


def time_steps(run_step: Callable[[], object], steps: int, warmup: int) -> list[float]:
  """Seconds per call of `run_step` (which must block on its result), after warm-up."""
  for _ in range(warmup):
    run_step()
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    run_step()
    times.append(time.perf_counter() - t0)
  return times


def _hlo_op_names(hlo_text: str) -> dict[str, str]:
  """{instruction: its jax op_name metadata} of a compiled module's HLO text."""
  names = {}
  for line in hlo_text.splitlines():
    head, sep, _ = line.partition(" = ")
    name = head.strip().removeprefix("ROOT ").lstrip("%")
    if sep and name and " " not in name:
      at = line.find('op_name="')
      if at >= 0:
        names[name] = line[at + 9:line.index('"', at + 9)]
  return names


def op_profile(run_step: Callable[[], object], calls: int, trace_dir: str, hlo_text: str = "",
               top: int = 30, steps_per_call: int = 1) -> dict:
  """Where a step's time goes: `calls` calls of `run_step` (blocking; each runs
  `steps_per_call` steps) traced by `jax.profiler` into `trace_dir` (a Perfetto trace, and
  TensorBoard's profile files), and the traced time of each XLA operation summed per step.

  The operations are the trace's events that name one (`hlo_op`: a fusion, a library call,
  a GPU kernel's operation), so host-side work between them is not counted; operations that
  run side by side each count their own time. `hlo_text`: the compiled module's text
  (written beside the trace as `step.hlo.txt`), whose op_name metadata says which model
  code each operation comes from.

  Returns {'steps' (traced), 'trace' (its path), 'op_ms_per_step' (all operations), 'ops' (distinct),
  'top': the `top` most costly as {'op', 'ms' per step, 'calls' per step, 'op_name'}}, the
  times and calls summed over the devices.
  """
  import glob
  import gzip
  import json

  os.makedirs(trace_dir, exist_ok=True)
  if hlo_text:
    with open(os.path.join(trace_dir, "step.hlo.txt"), "w") as f:
      f.write(hlo_text)
  pattern = os.path.join(trace_dir, "**", "perfetto_trace.json.gz")
  before = set(glob.glob(pattern, recursive=True))  # an earlier run's, in the same folder
  with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
    for _ in range(calls):
      run_step()
  traces = sorted(set(glob.glob(pattern, recursive=True)) - before, key=os.path.getmtime)
  if not traces:
    raise RuntimeError(f"jax.profiler wrote no Perfetto trace under {trace_dir}")
  with gzip.open(traces[-1]) as f:
    events = json.load(f)
  events = events.get("traceEvents", []) if isinstance(events, dict) else events
  # On a GPU or TPU the operations' own time is on the device lanes ('/device:GPU:0', ...),
  # which the host's launch events must not add to; a CPU has its host lanes alone.
  lanes = {e.get("pid"): (e.get("args") or {}).get("name", "") for e in events
           if e.get("ph") == "M" and e.get("name") == "process_name"}
  ops = [e for e in events if e.get("ph") == "X" and (e.get("args") or {}).get("hlo_op")]
  on_devices = [e for e in ops if lanes.get(e.get("pid"), "").startswith("/device:")]
  total_us, runs = {}, {}
  for e in on_devices or ops:
    op = e["args"]["hlo_op"]
    total_us[op] = total_us.get(op, 0.0) + float(e.get("dur", 0.0))
    runs[op] = runs.get(op, 0) + 1
  names = _hlo_op_names(hlo_text)
  ranked = sorted(total_us, key=total_us.get, reverse=True)
  steps = calls * steps_per_call
  return {"steps": steps, "trace": traces[-1],
          "op_ms_per_step": sum(total_us.values()) / steps / 1e3, "ops": len(total_us),
          "top": [{"op": op, "ms": total_us[op] / steps / 1e3, "calls": runs[op] / steps,
                   "op_name": names.get(op, "")} for op in ranked[:top]]}


def _copy(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A deep copy of `config` for a benchmark to override fields of (the caller's is kept)."""
  return config.copy_and_resolve_references()


def bench_mae(config: ml_collections.ConfigDict, batch: int, *, dtype: str = "float32",
              image_size: int | None = None, steps: int = 10, warmup: int = 2,
              peak_tflops: float | None = None, mesh_shape=(-1, 1, 1),
              scan_layers: bool | None = None, profile_dir: str | None = None,
              profile_steps: int = 3, steps_per_call: int = 1) -> dict:
  """The jitted, sharded MAE train step of affect_jax.train.pretrain on random images.

  `config`: the MAE pretraining config (configs/mae_pretrain.py), run with `batch`, `dtype`
  and, where given, `image_size` and `scan_layers` (None = the config's).

  TFLOP/s and MFU count the model's FLOPs (`affect_jax.flops`), not XLA's cost analysis
  (`hlo_flops_per_step`, for comparison): the analysis counts a scanned stack of blocks
  once, not once per block (and so the loop of several steps per call once: one step), and
  nothing inside a custom call such as cuDNN's attention.
  With `profile_dir`, `profile_steps` more calls are traced there (`op_profile`, under
  'profile', per step; its error instead where tracing fails, the timings kept). With
  `steps_per_call` = n > 1 each call runs n steps (`loop.TrainStep.calls`, as the trainer
  with config.steps_per_call = n); `steps` counts calls, and the figures are per step.
  """

  config = _copy(config)
  config.model.dtype = dtype
  config.batch_size = batch
  if image_size:
    config.data.image_size = image_size
  if scan_layers is not None:
    config.model.scan_layers = scan_layers
  size = config.data.image_size
  mesh = sharding.make_mesh(mesh_shape)
  model = pretrain.create_model(config)
  schedule = optim.schedule_for(config, 1000)
  state, shardings = pretrain.create_train_state(config, model, jax.random.key(0), mesh, schedule)
  step = pretrain.jit_train_step(model, config, schedule, shardings, mesh)
  images = np.random.default_rng(0).integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
  batches = (sharding.shard_batch({"image": images}, mesh),) * steps_per_call
  compiled = step.calls(steps_per_call).lower(state, batches).compile()
  model_flops = pretrain.train_flops(config, batch)
  holder = {"state": state}

  def run():
    holder["state"], metrics = compiled(holder["state"], batches)
    jax.block_until_ready(metrics["loss"])

  times = [t / steps_per_call for t in time_steps(run, steps, warmup)]
  med = statistics.median(times)
  device = jax.devices()[0]
  peak = flops.peak_flops(device, peak_tflops)
  n_params = sum(x.size for x in jax.tree.leaves(holder["state"].params))
  profile = None
  if profile_dir:
    try:
      profile = op_profile(run, profile_steps, profile_dir, compiled.as_text(),
                           steps_per_call=steps_per_call)
    except Exception as e:  # noqa: BLE001 - a failed trace (no CUPTI, say) keeps the timings
      profile = {"error": f"{type(e).__name__}: {e}"}
  return {
      "what": "mae_train_step", "variant": config.model.variant, "batch": batch,
      "steps_per_call": steps_per_call,
      "image_size": size, "dtype": dtype, "devices": jax.device_count(),
      "device_kind": device.device_kind,
      "params": int(n_params), "step_s": med, "step_s_all": times, "img_per_s": batch / med,
      "flops_per_step": model_flops, "hlo_flops_per_step": compiled_flops(compiled, mesh.size),
      "tflops_per_s": model_flops / med / 1e12,
      "mfu": model_flops / med / (peak * mesh.size) if peak else None,
      "peak_memory_bytes": peak_memory_bytes(device),
      "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
      **({"profile": profile} if profile else {}),
  }


def abstract_train_step(config: ml_collections.ConfigDict, stage: str, batch: int, mesh):
  """(jitted step, state, batch) of `stage`'s train step ('mae' pretraining or 'finetune')
  for `config` over `mesh`, the state and batch abstract (`jax.ShapeDtypeStruct`s with their
  shardings): ready to lower and compile, with nothing allocated. The step is built afresh
  at every call, so it is traced with what holds then (e.g. the backend `kernels='auto'`
  resolves for)."""
  if stage not in ("mae", "finetune"):
    raise ValueError(f"stage must be 'mae' or 'finetune', got {stage!r}")
  size = config.data.image_size
  schedule = optim.schedule_for(config, 1000)
  batch_arrays = {"image": jax.ShapeDtypeStruct((batch, size, size, 3), np.uint8,
                                                sharding=sharding.batch_sharding(mesh, 4))}
  rng = jax.random.key(0)
  if stage == "mae":
    model = pretrain.create_model(config)
    state, shardings = pretrain.create_train_state(config, model, rng, mesh, schedule,
                                                   abstract=True)
    return pretrain.jit_train_step(model, config, schedule, shardings, mesh), state, batch_arrays
  model = finetune.create_model(config)
  state, shardings = finetune.create_train_state(config, model, rng, mesh, schedule, None,
                                                 abstract=True)
  batch_arrays["label"] = jax.ShapeDtypeStruct((batch,), np.int32,
                                               sharding=sharding.batch_sharding(mesh, 1))
  return finetune.jit_train_step(model, config, schedule, shardings, mesh), state, batch_arrays


# HBM per device that XLA:TPU may use (GiB, as its out-of-memory errors give it) for the
# TPU kinds a topology can name: v5e, v5p, v6e.
TPU_MEMORY_GIB = {"TPU v5 lite": 15.75, "TPU v5": 95.74, "TPU v6 lite": 31.25}


def tpu_topology_devices(topology: str) -> list:
  """The devices of a TPU slice named as Cloud TPU names them ('v5e:8x8' is 64 v5e chips;
  'v5p:4x4x4', 'v6e:4x4'), as libtpu describes them for compiling ahead of time on any
  host, a CPU-only one included: nothing runs on them. Needs libtpu (the `tpu` extra). v4
  slices come one device per TensorCore, two per chip (not the usual megacore)."""
  from jax.experimental import topologies
  if importlib.util.find_spec("libtpu") is None:
    raise ValueError(f"TPU topology {topology!r}: compiling for a TPU needs libtpu "
                     "(pip install -e '.[tpu]')")
  try:
    return list(topologies.get_topology_desc(topology, "tpu").devices)
  except Exception as e:  # noqa: BLE001 - jax's errors vary: a bad name, libtpu in use
    raise ValueError(f"TPU topology {topology!r}: {type(e).__name__}: {e}") from e


def bench_memory(config: ml_collections.ConfigDict, stage: str, batch: int, *,
                 dtype: str | None = None, mesh_shape=None, remat: str = "none",
                 grad_accum_steps: int = 1, image_size: int | None = None,
                 scan_layers: bool | None = None, topology: str | None = None) -> dict:
  """Per-device memory of the compiled train step of `stage` ('mae' pretraining or
  'finetune'), from XLA's `memory_analysis()`: arguments (parameters, optimizer state and
  the batch shard), temporaries (activations kept for the backward pass, gradients,
  workspace) and outputs. Nothing is allocated or run: the state is abstract.

  Compiled for this host's devices, or with `topology` for a TPU slice
  (`tpu_topology_devices`) by XLA:TPU itself, on any host: its figures, peak included, are
  the TPU's, and `fits` says whether the step fits the chip's HBM. XLA:TPU refuses to
  compile a step that does not: then the figures are None and `error` holds its account
  (what the temporaries need against what the chip has). The models' kernels 'auto' are
  then those of a TPU (stock XLA), not this host's.

  `config`: that stage's config (configs/mae_pretrain.py or configs/expr_finetune.py).
  `dtype`, `mesh_shape`, `scan_layers`, `image_size`: None = the config's (for a preset's
  config, configs.common.set_vit_scale's defaults).
  """

  config = _copy(config)
  config.batch_size, config.model.remat, config.grad_accum_steps = batch, remat, grad_accum_steps
  if dtype:
    config.model.dtype = dtype
  if mesh_shape:
    config.mesh_shape = tuple(mesh_shape)
  if image_size:
    config.data.image_size = image_size
  if scan_layers is not None:
    config.model.scan_layers = scan_layers
  devices = tpu_topology_devices(topology) if topology else jax.devices()
  if topology and config.model.kernels == "auto":
    config.model.kernels = "xla"  # what 'auto' is on a TPU; this host's backend would say 'cpu'
  size = config.data.image_size
  mesh = sharding.make_mesh(config.mesh_shape, devices)
  sharding.check_batch_size(batch, mesh, grad_accum_steps)
  step, state, batch_arrays = abstract_train_step(config, stage, batch, mesh)
  kind = devices[0].device_kind
  capacity = TPU_MEMORY_GIB.get(kind) if topology else None
  record = {
      "what": "memory", "stage": stage, "variant": config.model.variant, "batch": batch,
      "image_size": size, "dtype": config.model.dtype, "mesh_shape": list(mesh.devices.shape),
      "remat": remat, "scan_layers": bool(config.model.scan_layers),
      "grad_accum_steps": grad_accum_steps, "devices": mesh.size, "device_kind": kind,
      "topology": topology, "kernels": config.model.kernels,
      "params": int(sum(np.prod(x.shape) for x in jax.tree.leaves(state.params))),
      "device_memory_gib": capacity,
      "flops_per_step": (pretrain if stage == "mae" else finetune).train_flops(config, batch),
  }
  start = time.perf_counter()
  try:
    compiled = step.lower(state, batch_arrays).compile()
  except jax.errors.JaxRuntimeError as e:
    if not (topology and "RESOURCE_EXHAUSTED" in str(e)):
      raise
    figures = dict.fromkeys(("arguments_gib", "temporaries_gib", "outputs_gib", "aliased_gib",
                             "total_gib", "peak_gib", "hlo_flops_per_step"))
    return {**record, **figures, "fits": False, "error": str(e).strip().splitlines()[0],
            "compile_s": time.perf_counter() - start}
  compile_s = time.perf_counter() - start
  m = compiled.memory_analysis()
  gib = lambda b: None if b is None else b / 2**30
  args, temp = getattr(m, "argument_size_in_bytes", None), getattr(m, "temp_size_in_bytes", None)
  out, alias = getattr(m, "output_size_in_bytes", None), getattr(m, "alias_size_in_bytes", None)
  total = None if None in (args, temp, out, alias) else args + temp + out - alias
  peak = gib(getattr(m, "peak_memory_in_bytes", None) or None)  # XLA:TPU's; XLA:CPU has none
  return {
      **record,
      "arguments_gib": gib(args), "temporaries_gib": gib(temp), "outputs_gib": gib(out),
      "aliased_gib": gib(alias), "total_gib": gib(total), "peak_gib": peak,
      "fits": None if capacity is None or peak is None else peak <= capacity,
      "hlo_flops_per_step": compiled_flops(compiled, mesh.size), "compile_s": compile_s,
  }


def bench_matmul(n: int = 2048, repeats: int = 10) -> dict:
  """This machine's XLA matmul rate (GFLOP/s) on one n^3 product: float32, and bfloat16
  operands accumulating into float32 (the fast bf16 path on CPUs with avx512_bf16).

  The ceiling for a matmul-bound step: its XLA FLOPs over this rate is the least time it
  can take here, whatever the framework.
  """
  import jax.numpy as jnp
  out = {"what": "matmul", "n": n, "device_kind": jax.devices()[0].device_kind}
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
  for name, x, y in (("float32", a, b),
                     ("bfloat16_f32acc", a.astype(jnp.bfloat16), b.astype(jnp.bfloat16))):
    f = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
    med = statistics.median(time_steps(lambda: f(x, y).block_until_ready(), repeats, 2))
    out[f"{name}_gflops"] = 2 * n ** 3 / med / 1e9
  return out


def mae_matmul_shapes(config: ml_collections.ConfigDict, batch: int,
                      image_size: int | None = None) -> list[dict]:
  """`flops.mae_matmuls` of the MAE pretraining config `config` (configs/mae_pretrain.py: its
  ViT variant and mask ratio) at `batch` and `image_size` (None = the config's)."""
  return flops.mae_matmuls(config.model.variant, image_size or config.data.image_size,
                           config.model.mask_ratio, batch)


# The three products of one train step of a layer, as the step writes them. Dense (x [b,t,k]
# @ W [k,n]): the forward, the input gradient g W^T (W's minor axis contracted) and the
# weight gradient x^T g (batch and token axes contracted). Attention (q, k, v, dO heads-major
# [b,h,t,d], each rearranged from the token-major [b,t,h,d] inside the product, as in
# MultiHeadSelfAttention; p [b,h,t,t]): logits q k^T, output p v, and dV = p^T dO (dK = dS^T q
# is alike).
_LAYOUTS = {
    "dense": (("forward x.W", "btk,kn->btn", ("btk", "kn")),
              ("input grad g.W^T", "btn,kn->btk", ("btn", "kn")),
              ("weight grad x^T.g", "btk,btn->kn", ("btk", "btn"))),
    "attention": (("logits q.k^T", "bhqd,bhkd->bhqk", ("bhqd", "bhkd")),
                  ("output p.v", "bhqk,bhkd->bhqd", ("bhqk", "bhkd")),
                  ("dV p^T.dO", "bhqk,bhqd->bhkd", ("bhqk", "bhqd"))),
}


def bench_matmul_layouts(config: ml_collections.ConfigDict, batch: int = 8, *,
                         image_size: int | None = None, repeats: int = 10) -> dict:
  """GFLOP/s of each of the MAE step's matmuls in each operand layout its step runs.

  `config`: the MAE pretraining config (configs/mae_pretrain.py) whose step's matmuls
  (`mae_matmul_shapes`) are timed, at `batch` and `image_size` (None = the config's).

  Three rates per product: float32; bf16 operands accumulating in float32 as the step
  computes them (`cpu_kernels.einsum_f32acc`); and the same bf16 product as plain `jnp.einsum`.
  A plain n^3 product (`bench_matmul`) flatters a CPU backend: XLA:CPU takes a bf16
  product with one contracted axis that is batched or major in both operands (attention's
  products, p^T dO) off its bf16 kernel unless it is rewritten (the last two columns).
  """
  import jax.numpy as jnp

  size = image_size or config.data.image_size
  f32 = jnp.float32
  paths = (("float32", f32, lambda s, x, y: jnp.einsum(s, x, y, preferred_element_type=f32)),
           ("bfloat16_f32acc", jnp.bfloat16,
            lambda s, x, y: cpu_kernels.einsum_f32acc(s, x, y, out_dtype=f32)),
           ("bfloat16_plain", jnp.bfloat16,
            lambda s, x, y: jnp.einsum(s, x, y, preferred_element_type=f32)))
  rows = []
  for row in mae_matmul_shapes(config, batch, size):
    if row["kind"] == "dense":
      m, k, n = row["shape"]
      dims = {"b": batch, "t": m // batch, "k": k, "n": n}
    else:
      b, h, t, d = row["shape"]
      dims = {"b": b, "h": h, "q": t, "k": t, "d": d}
    for label, spec, operands in _LAYOUTS[row["kind"]]:
      # Per-head operands arrive token-major and are rearranged inside, as in the model.
      heads_major = [row["kind"] == "attention" and op.endswith("d") for op in operands]
      shapes = [tuple(dims[c] for c in (op[0] + op[2] + op[1] + op[3] if hm else op))
                for op, hm in zip(operands, heads_major)]
      letters = sorted(set(spec) - {",", "-", ">"})
      product_flops = 2 * int(np.prod([dims[c] for c in letters]))
      rates = {}
      for name, dtype, product in paths:
        x, y = (jax.random.normal(jax.random.key(i), s, f32).astype(dtype)
                for i, s in enumerate(shapes))
        def f(x, y, product=product, spec=spec, heads_major=heads_major):
          x, y = (jnp.swapaxes(z, 1, 2) if hm else z for z, hm in zip((x, y), heads_major))
          return product(spec, x, y)
        f = jax.jit(f)
        med = statistics.median(time_steps(lambda: f(x, y).block_until_ready(), repeats, 2))
        rates[f"{name}_gflops"] = product_flops / med / 1e9
      rows.append({"part": row["part"], "name": row["name"], "product": label, "einsum": spec,
                   "sizes": {c: dims[c] for c in letters}, "count": row["count"],
                   "gflop": product_flops / 1e9, **rates})
  return {"what": "matmul_layouts", "variant": config.model.variant, "batch": batch,
          "image_size": size, "device_kind": jax.devices()[0].device_kind, "rows": rows}


def write_fake_faces(root: str, count: int, size: int, seed: int = 0) -> list[str]:
  """JPEGs of smooth random colour fields (decode cost like a real face crop)."""
  from PIL import Image
  rng = np.random.default_rng(seed)
  paths = []
  os.makedirs(root, exist_ok=True)
  existing = sorted(os.listdir(root))
  if len(existing) == count:
    return [os.path.join(root, n) for n in existing]
  for i in range(count):
    low = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    img = Image.fromarray(low).resize((size, size), Image.Resampling.BILINEAR)
    path = os.path.join(root, f"{i:05d}.jpg")
    img.save(path, quality=90)
    paths.append(path)
  return paths


LOADER_SOURCES = ("folders", "tfds", "tfds_rgb")


def loader_inputs(source: str, image_size: int, count: int = 256) -> Sequence:
  """The bench's face images at `image_size`: JPEG paths ('folders'), or the records of the
  face_images dataset built from them, the files' bytes ('tfds') or their decoded pixels
  ('tfds_rgb'). Kept between runs under ~/.cache (and never deleted under a loader's
  read-ahead threads)."""
  if source not in LOADER_SOURCES:
    raise ValueError(f"loader source {source!r}: expected one of {LOADER_SOURCES}")
  base = os.path.expanduser("~/.cache/affect_jax")
  root = os.path.join(base, "bench_faces", str(image_size))
  paths = write_fake_faces(root, count, image_size)
  if source == "folders":
    return paths
  from affect_jax.data import tfds_builders
  out = tfds_builders.build(tfds_builders.FACE_IMAGES, os.path.join(base, "bench_tfds", str(image_size)),
                            roots=[root], overwrite=True,
                            pixels=image_size if source == "tfds_rgb" else None)
  return tfds_builders.face_records(str(out))


def _cpu_seconds() -> float:
  """CPU time of this process and all its live children (grain's workers), user + system."""
  import psutil
  me = psutil.Process()
  procs = [me, *me.children(recursive=True)]
  total = 0.0
  for p in procs:
    try:
      t = p.cpu_times()
      total += t.user + t.system
    except psutil.NoSuchProcess:
      pass
  return total


def bench_loader(batch: int, image_size: int, *, worker_count: int = 0, num_batches: int = 20,
                 repeats: int = 7, source: str = "folders", items: Sequence | None = None,
                 read_threads: int | None = None, augment: str = "host") -> dict:
  """The grain pretraining pipeline alone: read + decode + random-resized-crop + flip + batch,
  from image files ('folders') or an ArrayRecord dataset of the same files ('tfds', or
  'tfds_rgb': decoded at build time). `augment='device'` times what the host still does when
  the step crops and flips (`affect_jax.data.augment`): read + decode + boxes + batch. Medians
  over `repeats` rounds of `num_batches`: img/s (wall clock) and img per CPU-second of the
  process and its workers (its cost per core: the in-process pipeline decodes on several
  threads, so wall-clock img/s alone does not say how many cores it took)."""
  items = loader_inputs(source, image_size) if items is None else items
  read_threads = loaders.READ_THREADS if read_threads is None else read_threads
  it = iter(loaders.pretrain_dataset(items, image_size=image_size, batch_size=batch, seed=0,
                                     worker_count=worker_count, read_threads=read_threads,
                                     augment=augment, shard_index=0, shard_count=1))
  next(it)  # start workers
  rates, per_cpu = [], []
  for _ in range(repeats):
    t0, c0 = time.perf_counter(), _cpu_seconds()
    for _ in range(num_batches):
      next(it)
    dt, dc = time.perf_counter() - t0, _cpu_seconds() - c0
    rates.append(batch * num_batches / dt)
    per_cpu.append(batch * num_batches / max(dc, 1e-9))
  if hasattr(it, "close"):
    it.close()
  return {"what": "grain_loader", "source": source, "augment": augment, "batch": batch,
          "image_size": image_size,
          "worker_count": worker_count, "read_threads": read_threads,
          "img_per_s": statistics.median(rates),
          "img_per_cpu_s": statistics.median(per_cpu), "img_per_s_all": rates}


TEMPORAL_TASKS = ("VA", "EXPR", "AU")


def bench_temporal(task_configs: Mapping[str, ml_collections.ConfigDict], *,
                   frames: int = 10_000, batch: int = 32, dtype: str = "float32",
                   steps: int = 10, warmup: int = 2, repeats: int = 5) -> dict:
  """The authors' temporal model: training frames/s (one jitted step on `batch` segments)
  and the time to predict one `frames`-frame video with the VA, Expr and AU models (windows
  of segment_len, stride = segment_len as the PyTorch reference, merged back).

  `task_configs`: the temporal config of each task in TEMPORAL_TASKS, task -> config (as
  `configs/common.py:get_temporal_config(task, preset)` makes it), each run in `dtype`; the
  VA model's is the one trained, and its segment_len the window. The record names the
  model by the VA config's widths (`tcn_channels`, `d_model`, `num_layers`).
  """
  import jax.numpy as jnp
  import optax

  missing = [t for t in TEMPORAL_TASKS if t not in task_configs]
  if missing:
    raise ValueError(f"bench_temporal needs a temporal config for each of {TEMPORAL_TASKS}; "
                     f"missing {missing}")
  va = task_configs["VA"].model
  mesh = sharding.make_mesh((-1, 1, 1))
  rng = np.random.default_rng(0)
  out: dict = {"what": "temporal", "tcn_channels": [int(w) for w in va.tcn_channels],
               "d_model": int(va.d_model), "num_layers": int(va.num_layers), "dtype": dtype,
               "frames": frames, "devices": jax.device_count(),
               "device_kind": jax.devices()[0].device_kind}
  models = {}
  for task in TEMPORAL_TASKS:
    c = _copy(task_configs[task])
    c.model.dtype = dtype
    model = temporal.create_model(c)
    state, shardings = temporal.create_train_state(c, model, jax.random.key(0), mesh,
                                                   optax.constant_schedule(1e-5), {"visual": 768})
    models[task] = (c, model, state, shardings)

  # Prediction of one long video with the three task models.
  length = models["VA"][0].data.segment_len
  feats = {"visual": rng.normal(size=(frames, 768)).astype(np.float32)}
  fns = {t: temporal.make_predict_fn(m, t, mesh) for t, (_, m, _, _) in models.items()}
  variables = {t: {"params": s.params, "batch_stats": s.batch_stats} for t, (_, _, s, _) in models.items()}

  # Windows are cut once, as the PyTorch reference does before its timed loop.
  inputs, mask, starts = segments.predict_windows(feats, length, length)
  inputs, mask_j = {"visual": jnp.asarray(inputs["visual"])}, jnp.asarray(mask)

  def predict_once():
    for task in models:
      y = np.asarray(fns[task](variables[task], inputs, mask_j))
      segments.merge(y, starts, frames, mask=mask)

  ptimes = time_steps(predict_once, repeats, 1)
  out["predict_s_all_heads"] = statistics.median(ptimes)
  out["predict_s_all"] = ptimes
  counts = [compiled_flops(fns[t].lower(variables[t], inputs, mask_j).compile()) for t in models]
  out["predict_flops"] = sum(counts) if all(counts) else None
  out["predict_tflops_per_s"] = (out["predict_flops"] / out["predict_s_all_heads"] / 1e12
                                 if out["predict_flops"] else None)
  # Training throughput (VA model); after prediction, since the step donates the state.
  c, model, state, shardings = models["VA"]
  batch_arrays = {"visual": rng.normal(size=(batch, length, 768)).astype(np.float32),
                  "label": rng.uniform(-1, 1, (batch, length, 2)).astype(np.float32),
                  "frame_mask": np.ones((batch, length), np.float32),
                  "label_mask": np.ones((batch, length), np.float32)}
  step = jax.jit(functools.partial(
      temporal.train_step, model=model, task="VA", modalities=("visual",), seed=0,
      schedule=optax.constant_schedule(1e-5), class_weights=None, pos_weight=None),
      donate_argnums=0)
  sharded = sharding.shard_batch(batch_arrays, mesh)
  holder = {"state": state}

  def train_once():
    holder["state"], m = step(holder["state"], sharded)
    jax.block_until_ready(m["loss"])

  times = time_steps(train_once, steps, warmup)
  out["train_step_s"] = statistics.median(times)
  out["train_frames_per_s"] = batch * length / out["train_step_s"]
  return out
