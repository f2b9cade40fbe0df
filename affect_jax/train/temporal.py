"""The temporal model: segments of per-frame features -> per-frame VA / Expr / AU.

  state, metrics = train_step(state, batch)              # jitted, sharded, state donated
  preds = predict_videos(...)                             # windows -> overlap merge -> [T, K]
  train_and_evaluate(config, workdir)                     # launch/train_temporal.py
  cross_validate(config, workdir)                         # folds 0-4, mean +- std
"""

from __future__ import annotations

import functools
import json
import types
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from affect_jax import checkpoint, fileio, losses, metrics, optim, sharding, tasks
from affect_jax.data import affwild2, features, segments
from affect_jax.models import temporal
from affect_jax.train import loop

MAIN_METRIC = metrics.MAIN_METRIC


# ---- Data ----


def modalities(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """config.model.modalities as a tuple of names; on the command line
  `--config.model.modalities=visual,audio` arrives as the one name 'visual,audio'."""
  return temporal.modalities(config.model.modalities)


def open_stores(config: ml_collections.ConfigDict) -> dict[str, features.FeatureStore]:
  paths = {"visual": config.data.visual_features, "audio": config.data.audio_features}
  stores = {}
  for name in modalities(config):
    if not paths.get(name):
      raise ValueError(f"config.model.modalities has {name!r} but config.data.{name}_features is empty")
    stores[name] = features.FeatureStore(paths[name])
  return stores


def load_labels(root: str, task: str, videos, with_test_labels: bool = False,
                max_unmatched: float = affwild2.MAX_UNMATCHED_FRAMES) -> dict[str, affwild2.VideoLabels]:
  """Labels of named videos, from whichever split folder holds each (folds mix them)."""
  where = {}
  for split in affwild2.SPLITS:
    for v in affwild2.list_videos(root, task, split):
      where[v] = split
  if with_test_labels:
    try:
      for v in affwild2.list_videos(root, task, affwild2.TEST_SET):
        where.setdefault(v, affwild2.TEST_SET)
    except FileNotFoundError:
      pass
  missing = [v for v in videos if v not in where]
  if missing:
    raise KeyError(f"{root}: no {task} annotation for videos {missing[:5]}")
  return {v: affwild2.load_video(root, task, where[v], v, with_test_labels, max_unmatched)
          for v in videos}


def split_videos(config: ml_collections.ConfigDict) -> dict[str, list[str]]:
  """{'train', 'val'} of the config's fold, and 'test' when the dataset lists one."""
  out = affwild2.fold_videos(config.data.root, config.task, config.fold)
  try:
    out["test"] = affwild2.list_videos(config.data.root, config.task, affwild2.TEST_SET)
  except FileNotFoundError:
    out["test"] = []
  return out


# ---- Model, loss, step ----


def create_model(config: ml_collections.ConfigDict):
  """The model `config.model` describes (`models.temporal.from_config`), with the task's
  output width."""
  return temporal.from_config(config.model, tasks.get(config.task).out_dim)


def task_loss(task: str, out, label, mask, class_weights=None, pos_weight=None):
  """The loss of the task's kind: 1 - CCC, cross-entropy (class weights), BCE (positive
  weights)."""
  kind = tasks.get(task).kind
  if kind == tasks.REGRESSION:
    return losses.ccc_loss(out, label, mask)
  if kind == tasks.MULTICLASS:
    return losses.masked_cross_entropy(out, label, mask, class_weights=class_weights)
  return losses.masked_bce_with_logits(out, label, mask, pos_weight=pos_weight)


def frame_outputs(task: str, out):
  """Model outputs -> what overlap merge averages: values or probabilities."""
  return tasks.get(task).activate(out)


def create_train_state(config, model, rng, mesh, schedule, input_dims: Mapping[str, int]):
  """Sharded TrainState (params and BatchNorm statistics) for features of `input_dims`
  widths."""
  tx = optim.make_optimizer(config.optim, schedule=schedule)
  inputs, mask = temporal.example_inputs(input_dims, batch=1, length=config.data.segment_len)

  def init(r):
    variables = model.init({"params": r, "dropout": r}, inputs, mask, train=False)
    return loop.TrainState.create(apply_fn=model.apply, params=variables["params"], tx=tx,
                                  batch_stats=variables.get("batch_stats", {}))

  return loop.create_state(config, init, rng, mesh)


def train_step(state, batch, *, model, task, modalities, seed, schedule, class_weights, pos_weight):
  rng = jax.random.fold_in(jax.random.key(seed), state.step)
  inputs = {m: batch[m] for m in modalities}

  def loss_fn(params):
    out, updates = model.apply({"params": params, "batch_stats": state.batch_stats}, inputs,
                               batch["frame_mask"], train=True, rngs={"dropout": rng},
                               mutable=["batch_stats"])
    loss = task_loss(task, out, batch["label"], batch["label_mask"], class_weights, pos_weight)
    return loss, updates

  (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  state = state.apply_gradients(grads=grads).replace(
      batch_stats=updates.get("batch_stats", state.batch_stats))
  return state, {"loss": loss, "grad_norm": optim.global_norm(grads), "lr": schedule(state.step - 1)}


# ---- Whole-video prediction and scores ----


def make_predict_fn(model, task: str, mesh):
  """jitted windows [N, L, D] (+ mask [N, L]) -> per-frame outputs [N, L, K], eval mode,
  split over the batch."""
  def fn(variables, inputs, mask):
    return frame_outputs(task, model.apply(variables, inputs, mask, train=False))
  return jax.jit(fn, out_shardings=sharding.batch_sharding(mesh, 3))


def predict_videos(predict_fn, variables, stores: Mapping[str, features.FeatureStore],
                   videos: Mapping[str, int], *, segment_len: int, stride: int, merge: str,
                   batch_size: int, mesh) -> dict[str, np.ndarray]:
  """{video: [T, K]} of every video, on every process: each process cuts its share of the
  videos (balanced by frames) into windows, runs them through one sharded forward with the
  other processes', merges its outputs back to one per frame, and the merged predictions
  are gathered."""
  names = list(videos)
  if not names:
    return {}
  owners = sharding.process_owners(len(names), [videos[v] for v in names])
  mine = [v for v, p in zip(names, owners) if p == jax.process_index()]
  windows = []
  for video in mine:
    feats = {m: np.asarray(s.read(video), np.float32) for m, s in stores.items()}
    for m, f in feats.items():
      if len(f) != videos[video]:
        raise ValueError(f"{video}: {m} features have {len(f)} frames, expected {videos[video]}")
    inputs, mask, starts = segments.predict_windows(feats, segment_len, stride)
    windows.append(({"mask": mask, **inputs}, starts))
  spec = {"mask": jax.ShapeDtypeStruct((segment_len,), np.float32),
          **{m: jax.ShapeDtypeStruct((segment_len, s.dim), np.float32) for m, s in stores.items()}}
  rows = sharding.batch_rows(batch_size, mesh)
  batches = _row_batches({k: np.concatenate([w[k] for w, _ in windows]) if windows else
                          np.zeros((0, *x.shape), x.dtype) for k, x in spec.items()}, rows)
  outs = [out for _, out in sharding.map_batches(
      lambda b: predict_fn(variables, {m: b[m] for m in stores}, b["mask"]), batches, mesh,
      rows=rows, row_spec=spec)]
  out = np.concatenate(outs) if outs else None
  merged, at = [], 0
  for video, (w, starts) in zip(mine, windows):
    merged.append(segments.merge(out[at:at + len(starts)], starts, videos[video],
                                 weighting=merge, mask=w["mask"]).ravel())
    at += len(starts)
  # Gathered flat: a process without videos cannot know the output width, the total can.
  flat = sharding.allgather_rows(np.concatenate(merged) if merged else np.zeros(0, np.float32))
  width = flat.size // sum(videos.values())
  preds, at = {}, 0
  for p in range(jax.process_count()):
    for v, owner in zip(names, owners):
      if owner == p:
        preds[v] = flat[at:at + videos[v] * width].reshape(videos[v], width)
        at += videos[v] * width
  return {v: preds[v] for v in names}


def _row_batches(arrays: Mapping[str, np.ndarray], rows: int):
  n = len(next(iter(arrays.values())))
  for i in range(0, n, rows):
    yield {k: x[i:i + rows] for k, x in arrays.items()}


def decide(task: str, probs: np.ndarray, thresholds=0.5) -> np.ndarray:
  """Merged outputs -> submitted values: VA clipped to [-1, 1], Expr class, AU 0/1."""
  return tasks.get(task).decide(probs, thresholds)


def score(task: str, preds: Mapping[str, np.ndarray], labels: Mapping[str, affwild2.VideoLabels],
          au_thresholds=None) -> dict[str, float]:
  """The task's metrics over all frames of all videos (invalid labels excluded)."""
  names = sorted(preds)
  prob = np.concatenate([preds[v] for v in names])
  lab = np.concatenate([labels[v].labels for v in names])
  out = metrics.task_scores(task, decide(task, prob), lab)
  if tasks.get(task).kind != tasks.MULTILABEL:
    return out
  res = {"f1": out["f1"], **{f"f1_{k}": v for k, v in out["per_au"].items()}}
  if au_thresholds is not None:
    res["f1_tuned"] = metrics.au_f1(decide(task, prob, au_thresholds), lab)["f1"]
  return res


def per_video(task: str, preds: Mapping[str, np.ndarray],
              labels: Mapping[str, affwild2.VideoLabels]) -> tuple[list, list]:
  """(decided predictions, labels), one array per video in name order (AU at the 0.5
  threshold): the input of `metrics.interval_record`."""
  names = sorted(preds)
  return [decide(task, preds[v]) for v in names], [labels[v].labels for v in names]


def tune_thresholds(preds, labels) -> np.ndarray:
  names = sorted(preds)
  return metrics.tune_au_thresholds(np.concatenate([preds[v] for v in names]),
                                    np.concatenate([labels[v].labels for v in names]))


# ---- The loop ----


def _variables(state) -> dict:
  return {"params": state.params, "batch_stats": state.batch_stats}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains one fold, keeps the best state by the task's validation metric (whole videos,
  after overlap merge), then scores validation and, where labels exist, test with it.
  Writes `workdir/results.json`; returns it."""
  task, root = config.task, config.data.root
  stage = loop.Stage.open(config, workdir, f"temporal {task}")
  workdir, mesh = stage.workdir, stage.mesh
  stores = open_stores(config)
  splits = split_videos(config)
  unmatched = affwild2.max_unmatched(config)
  labels = load_labels(root, task, splits["train"] + splits["val"], max_unmatched=unmatched)
  train_labels = {v: labels[v].labels for v in splits["train"]}
  source = segments.SegmentSource(stores, train_labels, task, segment_len=config.data.segment_len,
                                  stride=config.data.stride)
  steps_per_epoch = max(len(source) // config.batch_size, 1)
  total = stage.plan(steps_per_epoch)
  model = create_model(config)
  state, shardings = create_train_state(config, model, jax.random.key(config.seed), mesh,
                                        stage.schedule, {m: s.dim for m, s in stores.items()})
  cw = jnp.asarray(config.class_weights, jnp.float32) if len(config.class_weights) else None
  pw = jnp.asarray(config.pos_weight, jnp.float32) if len(config.pos_weight) else None
  step = functools.partial(train_step, model=model, task=task, modalities=tuple(stores),
                           seed=config.seed, schedule=stage.schedule, class_weights=cw,
                           pos_weight=pw)
  step_fn = loop.jit_step(step, config, mesh, shardings, {
      k: sharding.batch_sharding(mesh, np.ndim(v) + 1) for k, v in source[0].items()})
  predict_fn = make_predict_fn(model, task, mesh)
  predict = functools.partial(predict_videos, predict_fn, stores=stores,
                              segment_len=config.data.segment_len, stride=config.data.predict_stride,
                              merge=config.data.merge, batch_size=max(config.batch_size, 32), mesh=mesh)
  val_frames = {v: labels[v].num_frames for v in splits["val"]}

  def evaluate(st):
    return score(task, predict(_variables(st), videos=val_frames), labels)

  data = segments.segment_dataset(
      source, batch_size=config.batch_size // jax.process_count(), seed=config.seed, shuffle=True,
      num_epochs=None, drop_remainder=True)
  logging.info("%s %s fold %d: %d train videos (%d segments), %d val, %d steps of %d",
               task, config.model.kind, config.fold, len(splits["train"]), len(source),
               len(splits["val"]), total, config.batch_size)
  state, history = stage.run(
      state, step_fn, data, items_per_step=config.batch_size * config.data.segment_len,
      unit="frames", eval_fn=evaluate,
      eval_every=max(int(round(config.eval_every_epochs * steps_per_epoch)), 1),
      best_metric=MAIN_METRIC[task], best_mode="max",
      early_stop_steps=int(config.early_stopping_epochs * steps_per_epoch))

  best = loop.load_best(workdir, state)
  best = {"params": best["params"], "batch_stats": best.get("batch_stats", state.batch_stats)}
  val_preds = predict(best, videos=val_frames)
  results = {"task": task, "fold": config.fold, "run": loop.run_record(config, f"temporal {task}"),
             "model": config.model.to_dict(),
             "best_step": checkpoint.read_best(workdir)["step"], "num_steps": total}
  thresholds = (tune_thresholds(val_preds, labels)
                if tasks.get(task).kind == tasks.MULTILABEL else None)
  results["val"] = score(task, val_preds, labels, thresholds)
  if thresholds is not None:
    results["au_thresholds"] = thresholds.tolist()
  test_labels = {}
  if splits["test"]:
    try:
      test_labels = load_labels(root, task, splits["test"], True, unmatched)
    except (FileNotFoundError, KeyError):
      test_labels = {}  # real ABAW: test labels are not public
  if test_labels:
    test_preds = predict(best, videos={v: l.num_frames for v, l in test_labels.items()})
    results["test"] = score(task, test_preds, test_labels, thresholds)
  if config.get("bootstrap_samples", 0):
    scored = {"val": per_video(task, val_preds, labels)}
    if test_labels:
      scored["test"] = per_video(task, test_preds, test_labels)
    results["intervals"] = metrics.interval_record(task, scored, config.bootstrap_samples)
  fileio.write_shared_text(workdir / "results.json", json.dumps(results, indent=1))
  return {**results, "history": history}


def cross_validate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Folds 0-4 (each in workdir/fold_k); per-metric mean and std over folds."""
  per_fold = []
  for k in range(affwild2.NUM_FOLDS):
    c = ml_collections.ConfigDict(config.to_dict())
    c.fold = k
    per_fold.append(train_and_evaluate(c, fileio.path(workdir) / f"fold_{k}")["val"])
  keys = [k for k in per_fold[0] if not k.startswith("f1_AU")]
  summary = {k: {"mean": float(np.mean([f[k] for f in per_fold])),
                 "std": float(np.std([f[k] for f in per_fold]))} for k in keys}
  table = ["| fold | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
  for i, f in enumerate(per_fold):
    table.append(f"| {i} | " + " | ".join(f"{f[k]:.4f}" for k in keys) + " |")
  table.append("| mean ± std | " + " | ".join(
      f"{summary[k]['mean']:.4f} ± {summary[k]['std']:.4f}" for k in keys) + " |")
  out = {"task": config.task, "run": loop.run_record(config, f"temporal {config.task} 5-fold"),
         "folds": per_fold, "summary": summary, "table": "\n".join(table)}
  fileio.write_shared_text(fileio.path(workdir) / "cross_validation.json", json.dumps(out, indent=1))
  fileio.write_shared_text(fileio.path(workdir) / "cross_validation.md", out["table"] + "\n")
  return out


def import_weights(config: ml_collections.ConfigDict, variables: Mapping[str, Any], workdir: str,
                   source: str) -> None:
  """Writes converted weights ({'params', 'batch_stats'}, e.g. from
  `models.temporal.params_from_torch_state_dict`) as a run of `config` in `workdir`: its
  config with a checkpoint, its best state and best.json, so `predict.load`,
  launch/predict.py and launch/analyze_video.py take it like a trained run. The weights
  must have exactly the names and shapes `create_model(config)` has."""
  import flax.linen as nn
  if (fileio.path(workdir) / checkpoint.CHECKPOINTS_DIR).exists():
    raise FileExistsError(f"{workdir}: already holds a run; convert into a new folder")
  model = create_model(config)
  tcn = variables["params"].get(f"tcn_{modalities(config)[0]}", {})
  if "level_0" not in tcn:
    raise ValueError(f"{source}: no TCN for modality {modalities(config)[0]!r} in the weights")
  dims = {m: int(variables["params"][f"tcn_{m}"]["level_0"]["conv1"]["v"].shape[1])
          for m in modalities(config)}
  want = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), *temporal.example_inputs(dims)))
  want = {k: want[k] for k in ("params", "batch_stats") if k in want}
  flat = lambda t: {jax.tree_util.keystr(p): tuple(np.shape(x))  # noqa: E731
                    for p, x in jax.tree_util.tree_leaves_with_path(t)}
  fw, fg = flat(want), flat(dict(variables))
  if fw != fg:
    diff = sorted(k for k in set(fw) | set(fg) if fw.get(k) != fg.get(k))
    raise ValueError(
        f"{source}: the weights do not fit config.model (tcn_channels "
        f"{tuple(config.model.tcn_channels)}, d_model {config.model.d_model}, {len(diff)} "
        "names or shapes differ, e.g. "
        + ", ".join(f"{k}: weights {fg.get(k)}, model {fw.get(k)}" for k in diff[:3]) + ")")
  arrays = {k: jax.tree.map(np.asarray, v) for k, v in variables.items()}
  with checkpoint.make_manager(fileio.path(workdir) / checkpoint.CHECKPOINTS_DIR, save_every=1) as m:
    checkpoint.save(m, 0, arrays, config=config, force=True)
    m.wait_until_finished()
  checkpoint.save_best(workdir, 0, types.SimpleNamespace(**arrays),  # save_best reads attributes
                       {"step": 0, "metric": None, "value": None, "scores": {},
                        "imported_from": source})
