"""Per-frame predictions of trained temporal models: ABAW submission files and plots.

  predictions = predict(workdir, split)            # {video: merged outputs [T, K]}
  write_submission(out_dir, {task: workdir}, split)
  compare_strides(workdir, [200, 300])             # the task metric per split and stride
  compare_models(workdir_a, workdir_b)             # paired difference over resampled videos
  plot_video(path, task, outputs, labels)          # predictions vs labels over time (PNG)
"""

from __future__ import annotations

import functools
import json

import jax
import numpy as np

from affect_jax import checkpoint, fileio, metrics, sharding
from affect_jax.data import affwild2
from affect_jax.train import temporal


def load(workdir: str, stride: int | None = None):
  """(config, predict function {video: T} -> {video: [T, K]}, AU thresholds or None) of the
  best state of a temporal run, on all devices of all processes (any layout may have
  trained it). The function predicts with windows every `stride` frames (default: the
  run's predict_stride), or every `stride=` frames given at the call."""
  config = checkpoint.run_config(workdir)
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


def compare_models(workdir_a: str, workdir_b: str,
                   splits=(affwild2.VALIDATION_SET, affwild2.TEST_SET), *,
                   num_samples: int = 1000, level: float = metrics.INTERVAL_LEVEL) -> dict[str, dict]:
  """Paired comparison of two trained models of one task on the same videos.

  Per split: both headline scores (AU at the 0.5 threshold), their difference a - b, its
  `level` interval when the videos are resampled (the same draws for both models, so what
  the videos share cancels) and the share of draws in which a scores higher. Every split
  needs labels: Test_Set only in the synthetic set (`test_labels/`), as for compare_strides.
  """
  (config_a, predict_a, _), (config_b, predict_b, _) = load(workdir_a), load(workdir_b)
  task = config_a.task
  if (config_b.task, config_b.data.root) != (task, config_a.data.root):
    raise ValueError(f"{workdir_a} ({task}, {config_a.data.root}) and {workdir_b} "
                     f"({config_b.task}, {config_b.data.root}) are not the same task and data")
  score = functools.partial(metrics.main_score, task)
  out = {}
  for split in splits:
    videos = {v.video: v for v in affwild2.load_split(config_a.data.root, task, split, True,
                                                      affwild2.max_unmatched(config_a))}
    frames = {name: v.num_frames for name, v in videos.items()}
    a, labels = temporal.per_video(task, predict_a(frames), videos)
    b, _ = temporal.per_video(task, predict_b(frames), videos)
    draws = metrics.video_bootstrap_draws(
        lambda x, y, l: score(x, l) - score(y, l), a, b, labels, num_samples=num_samples)
    sa, sb = score(np.concatenate(a), np.concatenate(labels)), score(np.concatenate(b), np.concatenate(labels))
    out[split] = {"a": sa, "b": sb, "difference": sa - sb,
                  "interval": list(metrics.percentile_interval(draws, level)),
                  "level": level, "p_a_better": float(np.mean(draws > 0))}
  return out


def plot_video(path: str, task: str, outputs: np.ndarray, labels: np.ndarray | None,
               title: str = "", fps: float = 30.0) -> None:
  """VA: predicted vs labelled valence and arousal over time; Expr: class over time; AU:
  an activation raster (probabilities, labels outlined below). Process 0 writes it."""
  if jax.process_index() != 0:
    return
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  t = np.arange(len(outputs)) / fps
  if task == "VA":
    fig, axes = plt.subplots(2, 1, figsize=(10, 4.5), sharex=True)
    for d, ax in enumerate(axes):
      if labels is not None:
        lab = np.where(labels[:, d] == affwild2.INVALID_VA, np.nan, labels[:, d])
        ax.plot(t, lab, color="black", lw=1.2, label="label")
      ax.plot(t, np.clip(outputs[:, d], -1, 1), color="tab:red", lw=1.0, label="prediction")
      ax.set_ylim(-1.05, 1.05)
      ax.set_ylabel(affwild2.VA_NAMES[d])
    axes[0].legend(loc="upper right", fontsize=8)
  elif task == "EXPR":
    fig, ax = plt.subplots(figsize=(10, 3.5))
    if labels is not None:
      ax.plot(t, np.where(labels < 0, np.nan, labels), color="black", lw=2, label="label")
    ax.plot(t, outputs.argmax(-1), color="tab:red", lw=1, label="prediction")
    ax.set_yticks(range(len(affwild2.EXPR_NAMES)), affwild2.EXPR_NAMES)
    ax.legend(loc="upper right", fontsize=8)
  else:
    rows = 2 if labels is not None else 1
    fig, axes = plt.subplots(rows, 1, figsize=(10, 2.2 * rows + 0.8), sharex=True, squeeze=False)
    extent = (0, t[-1] if len(t) else 1, len(affwild2.AU_NAMES) - 0.5, -0.5)
    axes[0, 0].imshow(outputs.T, aspect="auto", cmap="magma", vmin=0, vmax=1, extent=extent,
                      interpolation="nearest")
    axes[0, 0].set_title("predicted P(AU active)", fontsize=9)
    if labels is not None:
      axes[1, 0].imshow(np.where(labels < 0, np.nan, labels).T, aspect="auto", cmap="Greys",
                        vmin=0, vmax=1, extent=extent, interpolation="nearest")
      axes[1, 0].set_title("labels", fontsize=9)
    for ax in axes[:, 0]:
      ax.set_yticks(range(len(affwild2.AU_NAMES)), affwild2.AU_NAMES, fontsize=7)
  plt.xlabel("time (s)")
  if title:
    plt.suptitle(title, fontsize=10)
  plt.tight_layout()
  fileio.save_figure_atomic(path, dpi=90)
