"""The training-loop skeleton every stage uses: sharded state creation, the plain Python
loop around a jitted step, checkpoint/resume, progress with ETA, metric files.

A stage is data + model + step + `Stage.run`: it supplies pure functions (init, step) and a
dataset; this module owns the rest (workdir, mesh and batch check, schedule, sharded state,
the jitted step with its shardings and donation, the loop), so pretraining, fine-tuning and
the temporal model share one copy of it:

  stage = loop.Stage.open(config, workdir, "finetune")  # workdir, mesh, batch check
  stage.plan(steps_per_epoch)                           # total steps and the LR schedule
  state, shardings = loop.create_state(config, init, key, stage.mesh)
  step_fn = loop.jit_step(step, config, stage.mesh, shardings, batch_shardings)
  state, history = stage.run(state, step_fn, dataset, items_per_step=..., eval_fn=...)
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging as logging_std
import os
import time
from typing import Any, Callable, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax.training import train_state
from jax.experimental import multihost_utils

from affect_jax import checkpoint, fileio, flops, optim, sharding
from affect_jax.data import augment, loaders


class TrainState(train_state.TrainState):
  """flax's TrainState (step, params, opt_state, apply_fn, tx) plus BatchNorm statistics."""
  batch_stats: Any = None


def create_sharded_state(init_fn: Callable[[jax.Array], Any], rng: jax.Array, mesh, rules,
                         abstract: bool = False):
  """Runs `init_fn(rng)` (which may return logically-boxed params) directly into its
  sharded layout: nothing is materialised on one device first. Returns (state, shardings).
  With `abstract`, the state's leaves are `jax.ShapeDtypeStruct`s carrying their shardings
  (nothing is computed: for compiling a step to read its memory use)."""
  shapes = jax.eval_shape(init_fn, rng)
  shardings = sharding.logical_shardings(shapes, mesh, rules)
  if abstract:
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        nn.meta.unbox(shapes), shardings), shardings
  state = jax.jit(lambda r: nn.meta.unbox(init_fn(r)), out_shardings=shardings)(rng)
  return state, shardings


def create_state(config: ml_collections.ConfigDict, init_fn: Callable[[jax.Array], Any],
                 rng: jax.Array, mesh, abstract: bool = False):
  """`create_sharded_state` with the config's logical-axis rules (config.axis_rules)."""
  return create_sharded_state(init_fn, rng, mesh, sharding.rules_from_config(config.axis_rules),
                              abstract)


class _QuietLibraries(logging_std.Filter):
  """Drops INFO chatter of orbax and jax internals (each checkpoint logs ~30 lines)."""

  NOISY = (f"{os.sep}orbax{os.sep}", f"{os.sep}jax{os.sep}_src{os.sep}", f"{os.sep}grain{os.sep}")

  def filter(self, record):
    return record.levelno >= logging_std.WARNING or not any(n in record.pathname for n in self.NOISY)


def quiet_library_logs() -> None:
  """Keep launcher output to our progress lines; libraries still report warnings."""
  logger = logging_std.getLogger("absl")
  if not any(isinstance(f, _QuietLibraries) for f in logger.filters):
    logger.addFilter(_QuietLibraries())


def enable_compilation_cache(path: str = "~/.cache/affect_jax/xla") -> None:
  """Persistent XLA compilation cache: a rerun (or a second stage with the same shapes)
  loads compiled steps instead of compiling them again."""
  jax.config.update("jax_compilation_cache_dir", os.path.expanduser(path))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def init_launcher() -> None:
  """What every launcher does once jax may start: library logs quieted, the persistent
  compilation cache on."""
  quiet_library_logs()
  enable_compilation_cache()


def format_seconds(s: float) -> str:
  s = int(max(s, 0))
  h, rem = divmod(s, 3600)
  m, sec = divmod(rem, 60)
  return f"{h}h{m:02d}m" if h else (f"{m}m{sec:02d}s" if m else f"{sec}s")


class MetricWriter:
  """Scalars to TensorBoard event files (tensorboardX: no TensorFlow; it writes gs:// too)
  and to `metrics.jsonl` (one JSON object per logged step; the demo's report plots it).
  Process 0 writes; the others' calls do nothing."""

  def __init__(self, logdir: str | os.PathLike, enabled: bool = True):
    self.enabled = enabled and jax.process_index() == 0
    self.logdir = fileio.path(logdir)
    self._tb = None
    if self.enabled:
      self.logdir.mkdir(parents=True, exist_ok=True)
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(str(self.logdir))
      self._jsonl = self.logdir / "metrics.jsonl"
      # Cloud storage cannot append: there the file is rewritten whole (it stays small).
      self._lines = None
      if fileio.is_remote(self._jsonl):
        self._lines = self._jsonl.read_text().splitlines() if self._jsonl.exists() else []

  def write(self, step: int, scalars: dict[str, float]) -> None:
    if not self.enabled:
      return
    for k, v in scalars.items():
      self._tb.add_scalar(k, float(v), step)
    line = json.dumps({"step": int(step), **{k: float(v) for k, v in scalars.items()}})
    if self._lines is None:
      with open(self._jsonl, "a") as f:
        f.write(line + "\n")
    else:
      self._lines.append(line)
      fileio.write_text_atomic(self._jsonl, "\n".join(self._lines) + "\n")

  def image(self, tag: str, step: int, image_hwc: np.ndarray) -> None:
    if self.enabled:
      self._tb.add_image(tag, image_hwc, step, dataformats="HWC")

  def close(self) -> None:
    if self.enabled:
      self._tb.close()


def read_metrics(logdir: str | os.PathLike) -> list[dict]:
  path = fileio.path(logdir) / "metrics.jsonl"
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


JOB_FILE = "job.json"
# Config fields a continued run may change: they set how often to log or save, or how the
# work is laid out, not what is computed.
MAY_CHANGE_ON_RESUME = ("resume", "log_every", "checkpoint_every", "max_to_keep", "recon_every",
                        "eval_batch_size", "bootstrap_samples", "mesh_shape", "data.worker_count",
                        "data.read_threads", "data.prefetch",
                        "data.index_cache", "model.remat", "profile_steps", "steps_per_call")


def code_version() -> str:
  """affect_jax's version, with the git commit when it runs from a checkout
  ('0.1.0+3b25f18', '+...-dirty' with uncommitted changes)."""
  import subprocess
  import affect_jax
  here = os.path.dirname(os.path.abspath(affect_jax.__file__))
  try:
    commit = subprocess.run(["git", "-C", here, "describe", "--always", "--dirty", "--abbrev=7"],
                            capture_output=True, text=True, timeout=5)
  except (OSError, subprocess.SubprocessError):
    return affect_jax.__version__
  tag = commit.stdout.strip()
  return f"{affect_jax.__version__}+{tag}" if commit.returncode == 0 and tag else affect_jax.__version__


def _flat(tree, prefix: str = "") -> dict:
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def run_record(config: ml_collections.ConfigDict, job: str) -> dict:
  """What a results file records about the run: job, config and code version."""
  return {"job": job, "config": json.loads(json.dumps(config.to_dict(), default=str)),
          "version": code_version()}


def open_workdir(config: ml_collections.ConfigDict, workdir, job: str):
  """`workdir` (an epath.Path, created) after checking that this run may write into it. The
  one rule of every stage: a workdir of another job is refused; a workdir holding checkpoints
  continues only with `config.resume` and a config that differs at most in fields that do
  not change what is computed (MAY_CHANGE_ON_RESUME), else the differing fields are named.
  Process 0 records job, config and code version in `workdir/job.json`."""
  workdir = fileio.path(workdir)
  record = run_record(config, job)
  saved_path = workdir / JOB_FILE
  saved = json.loads(saved_path.read_text()) if saved_path.exists() else None
  if saved is not None and saved["job"] != job:
    raise FileExistsError(f"{workdir} holds a {saved['job']} run, not {job}: use a new --workdir")
  ckpt_dir = workdir / checkpoint.CHECKPOINTS_DIR
  if ckpt_dir.exists() and any(ckpt_dir.iterdir()):
    if not config.get("resume", True):
      raise FileExistsError(f"{workdir} already holds checkpoints of a {job} run and "
                            "config.resume=False: use a new --workdir, or --config.resume=True "
                            "to continue it")
    if saved is not None:
      old, new = _flat(saved["config"]), _flat(record["config"])
      # Only fields both configs have are compared: one added or removed by another version
      # of the code is no setting of this run's.
      differ = sorted(k for k in old.keys() & new.keys()
                      if old[k] != new[k] and k not in MAY_CHANGE_ON_RESUME)
      if differ:
        shown = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in differ[:6])
        raise FileExistsError(f"{workdir} holds a {job} run of another config ({shown}"
                              f"{', ...' if len(differ) > 6 else ''}): use a new --workdir")
  workdir.mkdir(parents=True, exist_ok=True)
  fileio.write_shared_text(saved_path, json.dumps(record, indent=1))
  return workdir


def maybe_save_best(workdir: str, step: int, state, scores: dict, metric: str, mode: str) -> bool:
  """Exports `state`'s params (and BatchNorm statistics) to `workdir/best` when
  `scores[metric]` beats the recorded best (see `checkpoint.save_best`)."""
  if metric not in scores:
    raise KeyError(f"best metric {metric!r} not among eval scalars {sorted(scores)}")
  best = checkpoint.read_best(workdir)
  value = scores[metric]
  if best is not None and not (value > best["value"] if mode == "max" else value < best["value"]):
    return False
  checkpoint.save_best(workdir, step, state,
                       {"step": step, "metric": metric, "value": value, "scores": scores})
  return True


def load_best(workdir: str, state) -> dict:
  """{'params', ['batch_stats']} of the exported best state, laid out like `state`'s."""
  if checkpoint.read_best(workdir) is None:
    raise FileNotFoundError(f"{workdir}: no {checkpoint.BEST_FILE}: no evaluated best state yet")
  keys = [k for k in checkpoint.PARAM_KEYS if getattr(state, k, None) is not None and
          jax.tree.leaves(getattr(state, k))]
  target = {k: checkpoint.abstract_like(getattr(state, k)) for k in keys}
  return checkpoint.load_params(workdir, "best", target=target)


class Preempted(RuntimeError):
  """The job saved a checkpoint at a preemption sync point and stops; a rerun resumes."""


class _Preemption:
  """Whether every process reached the step at which the job must save and stop (a
  preemption notice, SIGTERM on Cloud TPU / SLURM); always False without jax.distributed."""

  def __init__(self):
    self.enabled = True

  def __call__(self, step: int) -> bool:
    if not self.enabled:
      return False
    try:
      return multihost_utils.reached_preemption_sync_point(step)
    except RuntimeError:  # no distributed runtime, so no preemption service
      self.enabled = False
      return False


PROFILE_DIR = "profile"


def throughput(items_per_sec: float, flops_per_item: float) -> dict[str, float]:
  """{'tflops_per_device', and 'mfu' on a device of known peak} of a training rate (none
  without `flops_per_item`)."""
  if not flops_per_item:
    return {}
  tflops = items_per_sec * flops_per_item / jax.device_count() / 1e12
  peak = flops.peak_flops(jax.devices()[0])
  return {"tflops_per_device": tflops, **({"mfu": tflops * 1e12 / peak} if peak else {})}


def format_speed(speed: dict[str, float], unit: str) -> str:
  """'707.1 img/s, 0.923 TFLOP/s per device, MFU 41.2%' (the parts `speed` has)."""
  parts = [f"{speed[f'{unit}_per_sec']:.1f} {unit}/s"]
  if "tflops_per_device" in speed:
    parts.append(f"{speed['tflops_per_device']:.3g} TFLOP/s per device")
  if "mfu" in speed:
    parts.append(f"MFU {100 * speed['mfu']:.1f}%")
  return ", ".join(parts)


def _next_multiple(step: int, every: int) -> int:
  """The first multiple of `every` after `step`; none (one far off) when `every` <= 0."""
  return (step // every + 1) * every if every > 0 else step + (1 << 62)


def steps_this_call(step: int, per_call: int, marks) -> int:
  """How many steps the call after `step` runs: `per_call` when none of the `marks` (steps
  after which the loop must act: log, evaluate, save, ...) falls before its last step, else
  1, so every mark is reached exactly and only two functions are ever compiled."""
  ahead = min([m for m in marks if m > step], default=step + per_call)
  return per_call if step + per_call <= ahead else 1


def run(*, config: ml_collections.ConfigDict, workdir: str, state, step_fn: Callable,
        data_iter: Iterator, num_steps: int, mesh, items_per_step: int, unit: str = "img",
        flops_per_item: float = 0.0, log_every: int = 50, checkpoint_every: int = 500,
        max_to_keep: int = 3, writer: MetricWriter | None = None,
        hooks: tuple[Callable[[int, Any, dict], None], ...] = (),
        eval_fn: Callable[[Any], dict] | None = None, eval_every: int = 0,
        best_metric: str | None = None, best_mode: str = "max",
        early_stop_steps: int = 0) -> tuple[Any, list[dict]]:
  """Trains from the latest checkpoint in `workdir/checkpoints` (if any) up to `num_steps`.

  `step_fn(state, batch) -> (state, metrics)` is the jitted step; `data_iter` yields
  host-local numpy batches (a grain iterator: its position is checkpointed too). `hooks`
  run after every logged step with (step, state, metrics). `eval_fn(state) -> scalars` runs
  every `eval_every` steps and at the end; with `best_metric`, the state that scores best
  on it is exported to `workdir/best` (see `maybe_save_best` / `load_best`); with
  `early_stop_steps`, training stops once the best is that many steps old. Returns the
  final state and the logged metrics of this run (eval scalars prefixed 'eval/').

  Each logged step reports `<unit>_per_sec` over the steps since the last log; with
  `flops_per_item` (the model FLOPs of one item's train step, `affect_jax.flops`) also
  `tflops_per_device` and, on a device of known peak, `mfu`.

  When the job is told to stop (a preemption notice reaching every process at the same
  step), it saves a checkpoint there and raises `Preempted`.

  With `config.profile_steps` = N > 0, the N steps after the first one of this run (which
  compiles) are traced with `jax.profiler` into `workdir/profile` (TensorBoard's profile
  plugin, or Perfetto, reads it).

  With `config.steps_per_call` = n > 1, `step_fn` (a `TrainStep`) runs n steps per call
  wherever no log, eval, checkpoint, profile or early-stop point falls inside them
  (`steps_this_call`); up to such a point it goes step by step, which compiles the
  one-step function too, so intervals that are multiples of n keep to one compiled call.
  """
  manager = checkpoint.make_manager(fileio.path(workdir) / checkpoint.CHECKPOINTS_DIR,
                                    save_every=checkpoint_every, max_to_keep=max_to_keep)
  grain_iter = data_iter if hasattr(data_iter, "get_state") else None
  state, start = checkpoint.restore_latest(manager, state, data_iter=grain_iter)
  start = 0 if start is None else start
  if start:
    logging.info("resumed from step %d in %s", start, workdir)
  own_writer = writer is None
  writer = writer or MetricWriter(fileio.path(workdir) / "tb")
  history: list[dict] = []
  t_start = time.perf_counter()
  t_last, step_last = t_start, start
  best = checkpoint.read_best(workdir) if early_stop_steps and best_metric else None
  best_step = None if best is None else best["step"]
  state_step = start
  preempted = _Preemption()
  profile_steps = int(config.get("profile_steps", 0) or 0)
  profile_from = start + 1 if profile_steps else None
  tracing = False
  per_call = int(config.get("steps_per_call", 1) or 1)
  if per_call > 1 and not hasattr(step_fn, "calls"):
    raise ValueError(f"config.steps_per_call={per_call} needs a loop.TrainStep (loop.jit_step) "
                     f"as step_fn, not {type(step_fn).__name__}")
  step = start
  try:
    while step < num_steps:
      if step == profile_from:
        jax.profiler.start_trace(str(fileio.path(workdir) / PROFILE_DIR))
        tracing = True
      if best_step is not None and state_step - best_step >= early_stop_steps:
        logging.info("early stop at step %d: no better eval/%s since step %d", state_step,
                     best_metric, best_step)
        if manager.latest_step() != state_step:  # a rerun then stops here too
          checkpoint.save(manager, state_step, state, data_iter=grain_iter, config=config, force=True)
        break
      marks = [num_steps, _next_multiple(step, log_every), _next_multiple(step, checkpoint_every)]
      if eval_fn is not None and eval_every:
        marks.append(_next_multiple(step, eval_every))
      if profile_from is not None:
        marks += [profile_from, profile_from + profile_steps]
      if best_step is not None:
        marks.append(best_step + early_stop_steps)
      n = steps_this_call(step, per_call, marks)
      if n == 1:
        state, metrics = step_fn(state, sharding.shard_batch(next(data_iter), mesh))
      else:
        batches = tuple(sharding.shard_batch(next(data_iter), mesh) for _ in range(n))
        state, metrics = step_fn.calls(n)(state, batches)
      done = state_step = step + n
      if tracing and (done - profile_from >= profile_steps or done == num_steps):
        jax.block_until_ready(metrics)
        jax.profiler.stop_trace()
        tracing = False
        logging.info("profiled steps %d-%d into %s", profile_from + 1, done,
                     fileio.path(workdir) / PROFILE_DIR)
      if done % log_every == 0 or done == num_steps:
        # Pull metrics of this step only now: fetching every step would serialise host/device.
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        now = time.perf_counter()
        rate = (done - step_last) * items_per_step / max(now - t_last, 1e-9)
        eta = (num_steps - done) * (now - t_last) / max(done - step_last, 1)
        speed = {f"{unit}_per_sec": rate, **throughput(rate, flops_per_item)}
        t_last, step_last = now, done
        writer.write(done, {**metrics, **speed})
        history.append({"step": done, **metrics, **speed})
        shown = " ".join(f"{k} {v:.4g}" for k, v in metrics.items())
        logging.info("step %d/%d  %s  | %s | elapsed %s ETA %s", done, num_steps, shown,
                     format_speed(speed, unit), format_seconds(now - t_start),
                     format_seconds(eta))
      if eval_fn is not None and (done == num_steps or (eval_every and done % eval_every == 0)):
        scores = {f"eval/{k}": float(v) for k, v in eval_fn(state).items()}
        writer.write(done, scores)
        logging.info("step %d/%d  %s", done, num_steps, " ".join(f"{k} {v:.4f}" for k, v in scores.items()))
        if history and history[-1]["step"] == done:
          history[-1].update(scores)
        else:
          history.append({"step": done, **scores})
        if best_metric and maybe_save_best(workdir, done, state, scores, f"eval/{best_metric}",
                                           best_mode) and early_stop_steps:
          best_step = done
      # Every step id is reported (the sync point may fall inside a call); saved at its end.
      stop = any([preempted(i) for i in range(step + 1, done + 1)])
      if stop or done % checkpoint_every == 0 or done == num_steps:
        checkpoint.save(manager, done, state, data_iter=grain_iter, config=config, force=True)
      if stop:
        raise Preempted(f"preempted: saved step {done} in {workdir}; rerun the same command "
                        "to resume from it")
      if history and history[-1]["step"] == done:
        for hook in hooks:
          hook(done, state, history[-1])
      step = done
  finally:
    if tracing:
      jax.profiler.stop_trace()
    # Also on an exception (Ctrl-C, a failing hook): finish the checkpoint in flight, so
    # the job resumes from it rather than from the one before.
    manager.wait_until_finished()
    manager.close()
    if own_writer:
      writer.close()
  return state, history


class TrainStep:
  """A stage's jitted train step: `step(state, batch) -> (state, metrics)` runs one step;
  `step.calls(n)` is the function that runs `n` steps in one call, `(state, batches) ->
  (state, metrics of the last step)` with `batches` a tuple of n batches, the steps a
  `lax.scan` over them (one step compiled, not n). Same state, same randomness (every step
  draws from state.step), so n single calls and one call of n agree.

  Several steps per call pay the per-call costs once per n steps: the host's dispatch, and
  on XLA:CPU the executable's temporary buffers, which it allocates afresh at every call
  and the kernel faults in and zeroes again (WORKSPACE.md, Performance). config.steps_per_call
  sets n for `run`.

  Each is jitted with explicit in/out shardings, the state donated (updated in place),
  metrics replicated, and the models' logical activation constraints in force
  (config.axis_rules). `lower`/`trace` are those of the one-step function."""

  def __init__(self, step_fn: Callable, config: ml_collections.ConfigDict, mesh,
               state_shardings, batch_shardings):
    self._fn = sharding.with_rules(step_fn, mesh, sharding.rules_from_config(config.axis_rules))
    self._shardings = (state_shardings, batch_shardings)
    self._out = (state_shardings, sharding.replicated(mesh))
    self._one = jax.jit(self._fn, in_shardings=self._shardings, out_shardings=self._out,
                        donate_argnums=0)
    self._many: dict[int, Callable] = {}

  def __call__(self, state, batch):
    return self._one(state, batch)

  def lower(self, *args, **kwargs):
    return self._one.lower(*args, **kwargs)

  def trace(self, *args, **kwargs):
    return self._one.trace(*args, **kwargs)

  def calls(self, n: int) -> Callable:
    """The jitted function of `n` steps per call, `(state, batches) -> (state, metrics)`."""
    if n < 1:
      raise ValueError(f"steps per call must be >= 1, got {n}")
    if n not in self._many:
      def steps(state, batches):
        if n == 1:
          return self._fn(state, batches[0])
        stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *batches)
        state, metrics = jax.lax.scan(self._fn, state, stacked)
        return state, jax.tree.map(lambda m: m[-1], metrics)
      state_sh, batch_sh = self._shardings
      self._many[n] = jax.jit(steps, in_shardings=(state_sh, (batch_sh,) * n),
                              out_shardings=self._out, donate_argnums=0)
    return self._many[n]


def jit_step(step_fn: Callable, config: ml_collections.ConfigDict, mesh, state_shardings,
             batch_shardings) -> TrainStep:
  """The jitted train step of every stage (`TrainStep`): one step per call, or several."""
  return TrainStep(step_fn, config, mesh, state_shardings, batch_shardings)


@dataclasses.dataclass
class Stage:
  """One training run's shared setup: its checked workdir (`open_workdir`), the device mesh
  (config.mesh_shape) with the global batch checked against it, and after `plan` the total
  steps and the learning-rate schedule. `run` trains with the config's logging and
  checkpointing settings. The state comes from `create_state`, the step from `jit_step`."""
  config: ml_collections.ConfigDict
  workdir: Any  # epath.Path
  mesh: Any
  total_steps: int = 0
  schedule: Callable | None = None

  @classmethod
  def open(cls, config: ml_collections.ConfigDict, workdir, job: str) -> "Stage":
    workdir = open_workdir(config, workdir, job)
    mesh = sharding.make_mesh(config.mesh_shape)
    sharding.check_batch_size(config.batch_size, mesh, config.get("grad_accum_steps", 1))
    return cls(config, workdir, mesh)

  def plan(self, steps_per_epoch: float) -> int:
    """Total steps (config.num_steps, else num_epochs of `steps_per_epoch`) and the
    schedule over them; returns the total."""
    self.total_steps = optim.total_steps(self.config, steps_per_epoch)
    self.schedule = optim.schedule_for(self.config, self.total_steps)
    return self.total_steps

  def image_batches(self, items):
    """This process's rows of the global training batches of `items` (image paths, or
    records with a 'path' and e.g. a label), reshuffled every epoch, with MAE's crop + flip
    as config.data sets them (done on the host, or left to the step: data.augment), for the
    image stages (pretraining, fine-tuning)."""
    c = self.config
    return loaders.pretrain_dataset(
        items, image_size=c.data.image_size, batch_size=c.batch_size // jax.process_count(),
        seed=c.seed, **loaders.options(c.data), **augment.loader_options(c.data),
        crop_scale=tuple(c.data.crop_scale), flip=c.data.flip)

  def run(self, state, step_fn: Callable, dataset, *, items_per_step: int, unit: str = "img",
          prefetch: int | None = None, **kwargs) -> tuple[Any, list[dict]]:
    """`loop.run` over `dataset` (a grain dataset of host-local batches) for `total_steps`,
    logging and checkpointing as the config says; `kwargs` are run's evaluation, best-state
    and hook arguments. With `prefetch` (batches), they are put on the devices from a
    background thread ahead of the step. The dataset's worker processes are stopped at the
    end, also on an error."""
    if prefetch is not None:
      dataset = loaders.prefetch_to_device(
          dataset, functools.partial(sharding.shard_batch, mesh=self.mesh), prefetch)
    data_iter = iter(dataset)
    c = self.config
    try:
      return run(config=c, workdir=self.workdir, state=state, step_fn=step_fn,
                 data_iter=data_iter, num_steps=self.total_steps, mesh=self.mesh,
                 items_per_step=items_per_step, unit=unit, log_every=c.log_every,
                 checkpoint_every=c.checkpoint_every, max_to_keep=c.max_to_keep, **kwargs)
    finally:
      if hasattr(data_iter, "close"):
        data_iter.close()  # stops grain worker processes and frees their shared memory
