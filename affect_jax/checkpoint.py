"""Checkpoints: orbax `CheckpointManager` holding train state, grain iterator state and the
config, saved atomically (orbax writes to a temporary folder and renames it when complete).

A restarted job calls `restore_latest` and continues with the same following losses as an
uninterrupted run: the state carries the step, per-step randomness is derived from
(seed, step), and the data iterator resumes where it stopped.

A stage that reads another stage's output calls `load_params`: it restores only the params
(and BatchNorm statistics) into the *current* device layout, whatever mesh or number of
processes wrote them (a checkpoint written on a pod loads on one GPU and the other way).
"""

from __future__ import annotations

import json
import os
from typing import Any

import grain
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from affect_jax import fileio

CHECKPOINTS_DIR = "checkpoints"
BEST_DIR = "best"
BEST_FILE = "best.json"
STATE_ITEM = "state"
# What a stage reads from another stage's state; the `best` export holds only these.
PARAM_KEYS = ("params", "batch_stats")


def make_manager(directory: str | os.PathLike, *, save_every: int, max_to_keep: int = 3,
                 best_metric: str | None = None, best_mode: str = "max") -> ocp.CheckpointManager:
  """Saves every `save_every` steps (and whenever forced), keeping the newest `max_to_keep`;
  with `best_metric`, keeps the best ones by that metric instead."""
  options = ocp.CheckpointManagerOptions(
      save_interval_steps=max(int(save_every), 1),
      max_to_keep=max_to_keep,
      create=True,
      best_fn=(lambda m: float(m[best_metric])) if best_metric else None,
      best_mode=best_mode,
      keep_checkpoints_without_metrics=False if best_metric else True,
  )
  return ocp.CheckpointManager(fileio.path(directory), options=options)


def save(manager: ocp.CheckpointManager, step: int, state: Any, *,
         data_iter: grain.DatasetIterator | None = None,
         config: ml_collections.ConfigDict | None = None, metrics: dict | None = None,
         force: bool = False) -> bool:
  """Saves if `step` is due (or `force`); returns whether a checkpoint was started."""
  items = {STATE_ITEM: ocp.args.StandardSave(state)}
  if data_iter is not None:
    items["data"] = grain.checkpoint.CheckpointSave(data_iter)
  if config is not None:
    items["config"] = ocp.args.JsonSave(config.to_dict())
  return manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=force)


def abstract_like(state: Any) -> Any:
  """ShapeDtypeStructs (with shardings) of a state, the target for a sharded restore."""
  def leaf(x):
    if isinstance(x, jax.Array):
      return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    return x
  return jax.tree.map(leaf, state)


def restore(manager: ocp.CheckpointManager, step: int, abstract_state: Any, *,
            data_iter: grain.DatasetIterator | None = None) -> Any:
  """Restores the state at `step` laid out as `abstract_state`; `data_iter` is set in place."""
  items = {STATE_ITEM: ocp.args.StandardRestore(abstract_state)}
  if data_iter is not None:
    items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
  restored = manager.restore(step, args=ocp.args.Composite(**items))
  return restored[STATE_ITEM]


def restore_latest(manager: ocp.CheckpointManager, state: Any, *,
                   data_iter: grain.DatasetIterator | None = None) -> tuple[Any, int | None]:
  """(restored state, step) from the newest checkpoint, or (state, None) when there is none.

  `state` is the freshly initialised state: it gives structure, dtypes and shardings.
  """
  step = manager.latest_step()
  if step is None:
    return state, None
  return restore(manager, step, abstract_like(state), data_iter=data_iter), step


def load_config(directory: str | os.PathLike, step: int | None = None) -> dict:
  """The config a checkpoint was written with (for extraction / fine-tuning provenance)."""
  with ocp.CheckpointManager(fileio.path(directory)) as manager:
    step = manager.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"{directory}: no checkpoint")
    return manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]


def run_config(workdir: str | os.PathLike) -> ml_collections.ConfigDict:
  """The config of a training run, as saved with its newest checkpoint."""
  return ml_collections.ConfigDict(load_config(fileio.path(workdir) / CHECKPOINTS_DIR))


# ---- The exported best state ----


def read_best(workdir: str | os.PathLike) -> dict | None:
  """{'step', 'metric', 'value', 'scores'} of the exported best state, or None."""
  path = fileio.path(workdir) / BEST_FILE
  return json.loads(path.read_text()) if path.exists() else None


def save_best(workdir: str | os.PathLike, step: int, state: Any, record: dict) -> None:
  """Exports the params (and BatchNorm statistics) of `state` to `workdir/best`, then
  `best.json`. Every process calls it (orbax writes each process's shards); process 0
  writes `best.json` after the export completed, so a crash in between leaves the previous
  best intact and consistent."""
  tree = {k: getattr(state, k) for k in PARAM_KEYS if getattr(state, k, None) is not None}
  with make_manager(fileio.path(workdir) / BEST_DIR, save_every=1, max_to_keep=1) as m:
    save(m, step, tree, force=True)
    m.wait_until_finished()
  fileio.write_shared_text(fileio.path(workdir) / BEST_FILE, json.dumps(record, indent=1))


# ---- Reading another stage's params into the current layout ----


def _item_dir(workdir: str | os.PathLike, which: str):
  """(path of the saved state item, step) of a run's newest (`latest`) or exported best
  (`best`) state."""
  workdir = fileio.path(workdir)
  if which == "best":
    best = read_best(workdir)
    if best is None:
      raise FileNotFoundError(f"{workdir}: no {BEST_FILE}: not a run with an evaluated best state")
    folder, step = workdir / BEST_DIR, int(best["step"])
  elif which == "latest":
    folder = workdir / CHECKPOINTS_DIR
    if not folder.exists():
      raise FileNotFoundError(f"{workdir}: no {CHECKPOINTS_DIR}/ folder: not a training workdir")
    with ocp.CheckpointManager(folder) as manager:
      step = manager.latest_step()
    if step is None:
      raise FileNotFoundError(f"{folder}: no checkpoint")
  else:
    raise ValueError(f"which={which!r}: use 'best' or 'latest'")
  item = folder / str(step) / STATE_ITEM
  if not item.exists():
    raise FileNotFoundError(f"{item}: missing (an incomplete or foreign checkpoint?)")
  return item, step


def saved_shapes(item) -> Any:
  """The tree of ShapeDtypeStructs (no sharding) stored in a pytree checkpoint item."""
  meta = ocp.PyTreeCheckpointHandler().metadata(fileio.path(item))
  tree = meta.tree if hasattr(meta, "tree") else meta
  return jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), np.dtype(m.dtype)), tree)


def _key_name(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def _check_target(target, saved, where) -> None:
  """The target must ask for exactly the saved names, shapes and dtypes: never a silent
  truncation, padding or cast."""
  flat_t = {_key_name(p): x for p, x in jax.tree_util.tree_leaves_with_path(target)}
  flat_s = {_key_name(p): x for p, x in jax.tree_util.tree_leaves_with_path(saved)}
  missing = sorted(set(flat_t) - set(flat_s))
  extra = sorted(set(flat_s) - set(flat_t))
  if missing or extra:
    raise ValueError(f"{where}: the model expects keys the checkpoint lacks {missing[:5]}, "
                     f"and the checkpoint has keys the model lacks {extra[:5]}")
  for k, t in flat_t.items():
    s = flat_s[k]
    if tuple(t.shape) != tuple(s.shape) or np.dtype(t.dtype) != np.dtype(s.dtype):
      raise ValueError(f"{where}: {k} is saved as {s.dtype}{list(s.shape)}, the model expects "
                       f"{np.dtype(t.dtype)}{list(t.shape)}")


def restore_tree(item: str | os.PathLike, target: Any = None, *, keys=None, where: str = "") -> Any:
  """Restores a pytree checkpoint item written on any device layout.

  `target` None: every leaf (or every leaf under the top-level `keys`) as a host numpy
  array. Otherwise a tree of ShapeDtypeStructs with shardings on the current mesh (e.g.
  `abstract_like` of a freshly initialised state's params): the leaves come back as jax
  Arrays laid out that way, read shard by shard. Names, shapes and dtypes are checked
  against what was saved first; a mismatch is an error naming the key.
  """
  item = fileio.path(item)
  where = where or str(item)
  saved = saved_shapes(item)
  if keys is not None:
    saved = {k: saved[k] for k in keys if k in saved}
  if target is None:
    target = saved
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target)
  else:
    _check_target(target, saved, where)
    restore_args = ocp.checkpoint_utils.construct_restore_args(target)
  return ocp.PyTreeCheckpointer().restore(item, args=ocp.args.PyTreeRestore(
      item=target, restore_args=restore_args, partial_restore=True))


def load_params(workdir: str | os.PathLike, which: str = "best", target: Any = None) -> dict:
  """{'params': ..., ['batch_stats': ...]} of a run's exported best state (`which='best'`)
  or its newest checkpoint (`'latest'`), restored into the current layout.

  `target`: None for host numpy arrays; or a dict with the same keys whose leaves are
  ShapeDtypeStructs with shardings on the current mesh (see `restore_tree`). Works whatever
  mesh and process count wrote the checkpoint, and never restores optimizer state.
  """
  item, step = _item_dir(workdir, which)
  where = f"{fileio.path(workdir)} ({which} state, step {step})"
  keys = PARAM_KEYS if target is None else tuple(target)
  out = restore_tree(item, target, keys=keys, where=where)
  if "params" not in out:
    raise ValueError(f"{where}: holds no params (keys: {sorted(saved_shapes(item))})")
  return {k: v for k, v in out.items() if v is not None and not (isinstance(v, dict) and not v)}
