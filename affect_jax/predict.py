"""Per-frame predictions of trained temporal models: ABAW submission files and plots.

  predictions = predict(workdir, split)            # {video: merged outputs [T, K]}
  write_submission(out_dir, {task: workdir}, split)
  compare_strides(workdir, [200, 300])             # the task metric per split and stride
  compare_models(workdir_a, workdir_b)             # paired difference over resampled videos
  decided(workdir) / paired_difference(task, a, b, labels)   # the same, for any two models
  evaluate(workdir, data={"root": ..., ...})       # a trained model on another dataset's videos
  plot_video(path, task, outputs, labels)          # predictions vs labels over time (PNG)
"""

from __future__ import annotations

from collections.abc import Mapping
import functools
import json

import jax
import numpy as np

from affect_jax import checkpoint, fileio, metrics, sharding, tasks
from affect_jax.data import affwild2
from affect_jax.train import temporal


def _run_config(workdir: str, data: Mapping[str, str] | None = None):
  config = checkpoint.run_config(workdir)
  for key, value in (data or {}).items():
    if key not in config.data:
      raise KeyError(f"{workdir}: its config.data has no field {key!r} to replace")
    config.data[key] = value
  return config


def load(workdir: str, stride: int | None = None, data: Mapping[str, str] | None = None):
  """(config, predict function {video: T} -> {video: [T, K]}, AU thresholds or None) of the
  best state of a temporal run, on all devices of all processes (any layout may have
  trained it). The function predicts with windows every `stride` frames (default: the
  run's predict_stride), or every `stride=` frames given at the call. `data` replaces
  fields of the run's config.data (root, visual_features, audio_features): the same model
  on another dataset's videos, through that dataset's feature stores."""
  config = _run_config(workdir, data)
  mesh = sharding.make_mesh(config.mesh_shape)
  loaded = checkpoint.load_params(workdir, "best")
  variables = jax.device_put({"params": loaded["params"], "batch_stats": loaded.get("batch_stats", {})},
                             sharding.replicated(mesh))
  model = temporal.create_model(config)
  stores = temporal.open_stores(config)
  fn = temporal.make_predict_fn(model, config.task, mesh)

  def predict(videos: dict[str, int], stride: int | None = stride) -> dict[str, np.ndarray]:
    return temporal.predict_videos(
        fn, variables, stores, videos, segment_len=config.data.segment_len,
        stride=stride or config.data.predict_stride, merge=config.data.merge,
        batch_size=64, mesh=mesh)

  results = fileio.path(workdir) / "results.json"
  thresholds = json.loads(results.read_text()).get("au_thresholds") if results.exists() else None
  return config, predict, thresholds


def plot_run_video(path, workdir: str, split: str, video: str, title: str = "",
                   stride: int | None = None) -> bool:
  """Plots what the trained run in `workdir` predicts for one video of `split` against its
  labels (`plot_video`; test labels where the dataset has them). False, and nothing
  plotted, when the run's task does not list `video` in `split`."""
  config = _run_config(workdir, None)
  if video not in affwild2.list_videos(config.data.root, config.task, split):
    return False
  config, fn, _ = load(workdir, stride)
  v = affwild2.load_video(config.data.root, config.task, split, video, True,
                          affwild2.max_unmatched(config))
  out = fn({video: v.num_frames})[video]
  plot_video(path, config.task, out, v.labels, title or f"{config.task} {video}", config.data.fps)
  return True


def split_frames(root: str, task: str, split: str,
                 max_unmatched: float = affwild2.MAX_UNMATCHED_FRAMES) -> dict[str, int]:
  """{video: num_frames} of a split (test videos: from their images)."""
  return {v.video: v.num_frames for v in affwild2.load_split(root, task, split,
                                                             max_unmatched=max_unmatched)}


def write_submission(out_dir: str, workdirs: dict[str, str], split: str = affwild2.TEST_SET,
                     stride: int | None = None) -> dict[str, str]:
  """One ABAW CSV per task under out_dir; returns {task: path}."""
  paths = {}
  for task, workdir in workdirs.items():
    config, predict, thresholds = load(workdir, stride)
    outputs = predict(split_frames(config.data.root, task, split, affwild2.max_unmatched(config)))
    decisions = {v: temporal.decide(task, o, 0.5 if thresholds is None else thresholds)
                 for v, o in outputs.items()}
    path = fileio.path(out_dir) / f"{affwild2.TASK_DIRS[task][0]}_{split}.csv"
    affwild2.write_predictions(path, task, decisions)
    paths[task] = path
  return paths


def compare_strides(workdir: str, strides, splits=(affwild2.VALIDATION_SET, affwild2.TEST_SET)
                    ) -> dict[int, dict[str, dict[str, float]]]:
  """{stride: {split: scores}} of one trained model predicted with each window stride.

  A stride below the segment length overlaps windows and averages them (ours); a stride equal
  to it cuts the video into disjoint windows (the authors' prediction setting). Test-split
  scores need labels, which only the synthetic set ships (`test_labels/`).
  """
  config, predict, thresholds = load(workdir)
  unmatched = affwild2.max_unmatched(config)
  labels = {split: {v.video: v for v in affwild2.load_split(config.data.root, config.task, split,
                                                            True, unmatched)}
            for split in splits}
  return {int(stride): {split: temporal.score(config.task, predict(
      {v: l.num_frames for v, l in labels[split].items()}, stride=int(stride)), labels[split],
      thresholds) for split in splits} for stride in strides}


def paired_difference(task: str, a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray],
                      labels: Mapping[str, np.ndarray], *, num_samples: int = 1000,
                      level: float = metrics.INTERVAL_LEVEL) -> dict:
  """Two models' decided predictions of the same videos ({video: [T, ...]}, as `decided`
  gives them) against the labels: both headline scores, their difference a - b, its `level`
  interval when the videos are resampled (the same draws for both, so what the videos share
  cancels) and the share of draws in which a scores higher."""
  if not set(a) == set(b) == set(labels):
    raise ValueError(f"{task}: the two models' predictions and the labels cover different "
                     f"videos ({sorted(set(a) ^ set(b) | set(a) ^ set(labels))[:5]} ...)")
  videos = sorted(a)
  a, b, labels = ([x[v] for v in videos] for x in (a, b, labels))
  score = functools.partial(metrics.main_score, task)
  draws = metrics.video_bootstrap_draws(
      lambda x, y, l: score(x, l) - score(y, l), a, b, labels, num_samples=num_samples)
  sa, sb = score(np.concatenate(a), np.concatenate(labels)), score(np.concatenate(b), np.concatenate(labels))
  return {"a": sa, "b": sb, "difference": sa - sb,
          "interval": list(metrics.percentile_interval(draws, level)),
          "level": level, "p_a_better": float(np.mean(draws > 0))}


def _labelled(config, split: str) -> dict[str, affwild2.VideoLabels]:
  return {v.video: v for v in affwild2.load_split(config.data.root, config.task, split, True,
                                                  affwild2.max_unmatched(config))}


def _predicted(workdir: str, splits, data: Mapping[str, str] | None):
  """(config, tuned thresholds, {split: ({video: merged outputs}, {video: VideoLabels})})
  of a trained model on labelled splits (`data` as for `load`)."""
  config, predict, thresholds = load(workdir, data=data)
  out = {}
  for split in splits:
    videos = _labelled(config, split)
    out[split] = predict({n: v.num_frames for n, v in videos.items()}), videos
  return config, thresholds, out


def _by_video(task: str, preds, videos) -> tuple[dict, dict]:
  decisions, labels = temporal.per_video(task, preds, videos)
  return dict(zip(sorted(preds), decisions)), dict(zip(sorted(preds), labels))


def decided(workdir: str, splits=(affwild2.VALIDATION_SET, affwild2.TEST_SET), *,
            data: Mapping[str, str] | None = None) -> dict[str, tuple[dict, dict]]:
  """{split: ({video: decided predictions}, {video: labels})} of a trained model on labelled
  splits (AU at 0.5; `data` as for `load`): what `paired_difference` pairs up by video."""
  config, _, predicted = _predicted(workdir, splits, data)
  return {split: _by_video(config.task, *pv) for split, pv in predicted.items()}


def median_video(workdir: str, split: str = affwild2.VALIDATION_SET) -> tuple[str, float]:
  """(video, its score): the labelled video of `split` whose own headline score (the task's
  metric on that video alone) is the median of the split's, the lower middle one for an even
  count. A typical example to plot, neither the best video nor the worst."""
  preds, labels = decided(workdir, (split,))[split]
  task = _run_config(workdir, None).task
  ranked = sorted((s, v) for v in preds
                  if np.isfinite(s := metrics.main_score(task, preds[v], labels[v])))
  if not ranked:
    raise ValueError(f"{workdir}: no video of {split} has a finite {task} score")
  score, video = ranked[(len(ranked) - 1) // 2]
  return video, float(score)


def compare_models(workdir_a: str, workdir_b: str,
                   splits=(affwild2.VALIDATION_SET, affwild2.TEST_SET), *,
                   num_samples: int = 1000, level: float = metrics.INTERVAL_LEVEL,
                   data_a: Mapping[str, str] | None = None,
                   data_b: Mapping[str, str] | None = None) -> dict[str, dict]:
  """Paired comparison of two trained models of one task on the same videos: per split,
  `paired_difference` (AU at the 0.5 threshold). Every split needs labels: Test_Set only in
  the synthetic set (`test_labels/`), as for compare_strides. `data_a`/`data_b` score the
  models on another dataset (as for `load`); both must name the same one."""
  config_a, config_b = _run_config(workdir_a, data_a), _run_config(workdir_b, data_b)
  if (config_b.task, config_b.data.root) != (config_a.task, config_a.data.root):
    raise ValueError(f"{workdir_a} ({config_a.task}, {config_a.data.root}) and {workdir_b} "
                     f"({config_b.task}, {config_b.data.root}) are not the same task and data")
  a, b = decided(workdir_a, splits, data=data_a), decided(workdir_b, splits, data=data_b)
  out = {}
  for split in splits:
    (pa, labels), (pb, _) = a[split], b[split]
    out[split] = paired_difference(config_a.task, pa, pb, labels, num_samples=num_samples,
                                   level=level)
  return out


def evaluate(workdir: str, splits=(affwild2.TEST_SET,), *, data: Mapping[str, str] | None = None,
             num_samples: int = 1000, with_decided: bool = False):
  """{split: the task's scores (AU: at 0.5 and at the run's tuned thresholds) and the
  headline score's interval over resampled videos} of a trained model, e.g. on a fresh
  draw of videos no decision saw (`data`: that dataset's root and feature stores).

  With `with_decided`, (those scores, what `decided` gives) from the one prediction.
  """
  config, thresholds, predicted = _predicted(workdir, splits, data)
  scores, by_video = {}, {}
  for split, (preds, videos) in predicted.items():
    by_video[split] = _by_video(config.task, preds, videos)
    decisions, labels = (list(d.values()) for d in by_video[split])
    scores[split] = temporal.score(config.task, preds, videos, thresholds)
    scores[split]["interval"] = metrics.score_interval(config.task, decisions, labels,
                                                       num_samples=num_samples)
  return (scores, by_video) if with_decided else scores


def plot_video(path: str, task: str, outputs: np.ndarray, labels: np.ndarray | None,
               title: str = "", fps: float = 30.0) -> None:
  """By the task's kind: predicted vs labelled values over time (VA), the class over time
  (Expr), or an activation raster (AU: probabilities, labels below). Process 0 writes it."""
  if jax.process_index() != 0:
    return
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  spec = tasks.get(task)
  t = np.arange(len(outputs)) / fps
  if spec.kind == tasks.REGRESSION:
    fig, axes = plt.subplots(spec.out_dim, 1, figsize=(10, 4.5), sharex=True)
    lo, hi = spec.value_range
    for d, ax in enumerate(axes):
      if labels is not None:
        lab = np.where(labels[:, d] == spec.invalid, np.nan, labels[:, d])
        ax.plot(t, lab, color="black", lw=1.2, label="label")
      ax.plot(t, np.clip(outputs[:, d], lo, hi), color="tab:red", lw=1.0, label="prediction")
      ax.set_ylim(lo - 0.05, hi + 0.05)
      ax.set_ylabel(spec.columns[d])
    axes[0].legend(loc="upper right", fontsize=8)
  elif spec.kind == tasks.MULTICLASS:
    fig, ax = plt.subplots(figsize=(10, 3.5))
    if labels is not None:
      ax.plot(t, np.where(labels < 0, np.nan, labels), color="black", lw=2, label="label")
    ax.plot(t, outputs.argmax(-1), color="tab:red", lw=1, label="prediction")
    ax.set_yticks(range(spec.out_dim), spec.columns)
    ax.legend(loc="upper right", fontsize=8)
  else:
    rows = 2 if labels is not None else 1
    fig, axes = plt.subplots(rows, 1, figsize=(10, 2.2 * rows + 0.8), sharex=True, squeeze=False)
    extent = (0, t[-1] if len(t) else 1, spec.out_dim - 0.5, -0.5)
    axes[0, 0].imshow(outputs.T, aspect="auto", cmap="magma", vmin=0, vmax=1, extent=extent,
                      interpolation="nearest")
    axes[0, 0].set_title(f"predicted P({spec.name} active)", fontsize=9)
    if labels is not None:
      axes[1, 0].imshow(np.where(labels < 0, np.nan, labels).T, aspect="auto", cmap="Greys",
                        vmin=0, vmax=1, extent=extent, interpolation="nearest")
      axes[1, 0].set_title("labels", fontsize=9)
    for ax in axes[:, 0]:
      ax.set_yticks(range(spec.out_dim), spec.columns, fontsize=7)
  plt.xlabel("time (s)")
  if title:
    plt.suptitle(title, fontsize=10)
  plt.tight_layout()
  fileio.save_figure_atomic(path, dpi=90)
