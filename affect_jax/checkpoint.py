"""Checkpoints: orbax `CheckpointManager` holding train state, grain iterator state and the
config, saved atomically (orbax writes to a temporary folder and renames it when complete).

A restarted job calls `restore_latest` and continues with the same following losses as an
uninterrupted run: the state carries the step, per-step randomness is derived from
(seed, step), and the data iterator resumes where it stopped.
"""

from __future__ import annotations

import os
from typing import Any

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp


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
  return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def save(manager: ocp.CheckpointManager, step: int, state: Any, *,
         data_iter: grain.DatasetIterator | None = None,
         config: ml_collections.ConfigDict | None = None, metrics: dict | None = None,
         force: bool = False) -> bool:
  """Saves if `step` is due (or `force`); returns whether a checkpoint was started."""
  items = {"state": ocp.args.StandardSave(state)}
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
  items = {"state": ocp.args.StandardRestore(abstract_state)}
  if data_iter is not None:
    items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
  restored = manager.restore(step, args=ocp.args.Composite(**items))
  return restored["state"]


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
  with ocp.CheckpointManager(os.path.abspath(directory)) as manager:
    step = manager.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"{directory}: no checkpoint")
    return manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
