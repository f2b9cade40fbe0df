"""The demo's report: results table (markdown + JSON) and pictures a person can open."""

from __future__ import annotations

import json
import os
import shutil

from affect_jax import fileio, metrics
from affect_jax.data import affwild2
from affect_jax.train import loop

METRIC_NAME = {"VA": "CCC", "EXPR": "F1", "AU": "F1"}
MAIN = metrics.MAIN_METRIC


def stride_table(strides: dict, segment_len: int) -> str:
  """Markdown: one model per task predicted with overlapping vs disjoint windows.

  strides: {task: {stride: {split: scores}}} as `affect_jax.predict.compare_strides` gives.
  """
  tasks = [t for t in affwild2.TASKS if t in strides]
  lines = ["| prediction windows (TCN+Transformer, visual+audio) | " + " | ".join(
      f"{t} {METRIC_NAME[t]} val | {t} {METRIC_NAME[t]} test" for t in tasks) + " |",
           "|---|" + "---|---|" * len(tasks)]
  for stride in sorted({int(s) for t in tasks for s in strides[t]}):
    kind = ("disjoint (the authors')" if stride == segment_len
            else "overlapping, averaged (ours)")
    cells = []
    for t in tasks:
      r = strides[t].get(stride) or strides[t].get(str(stride))
      cells += [f"{r[sp][MAIN[t]]:.3f}" if r and sp in r else "-"
                for sp in (affwild2.VALIDATION_SET, affwild2.TEST_SET)]
    lines.append(f"| stride {stride} of {segment_len}, {kind} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


PIXEL_ROW = "linear model on 12x12 pixels, per frame (no learned features)"


def results_table(results: dict, oracle: dict, baseline: dict, ft_scores: dict,
                  pixels: dict | None = None) -> str:
  tasks = [t for t in affwild2.TASKS if t in results]
  head = "| model | " + " | ".join(f"{t} {METRIC_NAME[t]} val | {t} {METRIC_NAME[t]} test" for t in tasks) + " |"
  lines = [head, "|---|" + "---|---|" * len(tasks)]
  names = list(next(iter(results.values())))
  for name in names:
    cells = []
    for t in tasks:
      r = results[t][name]
      cells += [f"{r['val'][MAIN[t]]:.3f}", f"{r['test'][MAIN[t]]:.3f}" if "test" in r else "-"]
    lines.append(f"| {results[tasks[0]][name]['label']} | " + " | ".join(cells) + " |")
  if pixels:
    cells = []
    for t in tasks:
      r = pixels.get(t, {})
      cells += [f"{r[MAIN[t]]:.3f}" if MAIN[t] in r else "-",
                f"{r[affwild2.TEST_SET][MAIN[t]]:.3f}" if affwild2.TEST_SET in r else "-"]
    lines.append(f"| {PIXEL_ROW} | " + " | ".join(cells) + " |")
  cells = []
  for t in tasks:
    o = oracle[t]
    cells += [f"{o[affwild2.VALIDATION_SET][MAIN[t]]:.3f}", f"{o[affwild2.TEST_SET][MAIN[t]]:.3f}"]
  lines.append("| oracle (clean latent vs labels) | " + " | ".join(cells) + " |")
  lines.append("| ABAW6 baseline (real Aff-Wild2, reference only) | " + " | ".join(
      f"{baseline[t]:.2f} | -" for t in tasks) + " |")
  au = results.get("AU", {}).get("tcn_tf_v")
  extra = []
  if au and "f1_tuned" in au["val"]:
    extra.append(f"AU F1 with per-unit thresholds tuned on validation (TCN+Transformer, visual): "
                 f"val {au['val']['f1_tuned']:.3f}" + (f", test {au['test']['f1_tuned']:.3f}" if "test" in au else ""))
  extra.append("Frame fine-tuning, validation macro-F1 of the expression classifier: "
               + ", ".join(f"{k}-init {v:.3f}" for k, v in ft_scores.items()))
  return "\n".join(lines) + "\n\n" + "\n".join(f"- {e}" for e in extra)


def interval_table(results: dict, pixels: dict | None = None) -> str:
  """Markdown: the video-bootstrap interval of every row's headline score ('' when no
  run recorded one). With 9 or so videos per split these are wide; differences between
  rows inside them are not evidence of anything."""
  tasks = [t for t in affwild2.TASKS if t in results]
  rows = []  # (label, {task: {split key: [low, high]}})
  for name in next(iter(results.values())):
    rows.append((results[tasks[0]][name]["label"],
                 {t: results[t][name].get("intervals", {}) for t in tasks}))
  if pixels:
    rows.append((PIXEL_ROW, {t: {"val": pixels.get(t, {}).get("intervals", {}).get(affwild2.VALIDATION_SET),
                                 "test": pixels.get(t, {}).get("intervals", {}).get(affwild2.TEST_SET)}
                             for t in tasks}))
  samples = {r[t]["samples"] for _, r in rows[:1] for t in tasks if "samples" in r[t]}
  if not samples:
    return ""
  lines = [f"| {metrics.INTERVAL_LEVEL:.0%} interval, videos resampled ({samples.pop()} draws) | " + " | ".join(
      f"{t} {METRIC_NAME[t]} val | {t} {METRIC_NAME[t]} test" for t in tasks) + " |",
           "|---|" + "---|---|" * len(tasks)]
  for label, by_task in rows:
    cells = [f"{iv[0]:.2f} to {iv[1]:.2f}" if iv else "-"
             for t in tasks for iv in (by_task[t].get("val"), by_task[t].get("test"))]
    lines.append(f"| {label} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def difference_table(pairs: dict, results: dict) -> str:
  """Markdown: paired differences of headline scores, first model minus second.

  pairs: {task: {"a-b": {split: compare_models' record}}} as the demo's paired stage gives.
  """
  tasks = [t for t in affwild2.TASKS if t in pairs]
  lines = [f"| paired difference, first minus second ({metrics.INTERVAL_LEVEL:.0%} interval; share "
           "of draws the first wins) | " + " | ".join(f"{t} {METRIC_NAME[t]} val | {t} {METRIC_NAME[t]} test"
                                  for t in tasks) + " |",
           "|---|" + "---|---|" * len(tasks)]
  for key in pairs[tasks[0]]:
    a, b = key.split("-")
    cells = []
    for t in tasks:
      for split in (affwild2.VALIDATION_SET, affwild2.TEST_SET):
        r = pairs[t][key].get(split)
        cells.append(f"{r['difference']:+.3f} ({r['interval'][0]:+.2f} to {r['interval'][1]:+.2f}; "
                     f"{r['p_a_better']:.0%})" if r else "-")
    lines.append(f"| {results[tasks[0]][a]['label']} minus {results[tasks[0]][b]['label']} | "
                 + " | ".join(cells) + " |")
  return "\n".join(lines)


def _loss_curves(out_dir: str, path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  runs = [("MAE pretraining", os.path.join(out_dir, "mae", "tb"))]
  runs += [(f"fine-tune {i}-init", os.path.join(out_dir, f"finetune_{i}", "tb")) for i in ("mae", "random")]
  tdir = os.path.join(out_dir, "temporal")
  if os.path.isdir(tdir):
    runs += [(name, os.path.join(tdir, name, "tb")) for name in sorted(os.listdir(tdir))]
  runs = [(n, loop.read_metrics(d)) for n, d in runs]
  runs = [(n, m) for n, m in runs if any("loss" in r for r in m)]
  cols = 4
  rows = -(-len(runs) // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.6 * rows), squeeze=False)
  for ax, (name, m) in zip(axes.flat, runs):
    pts = [(r["step"], r["loss"]) for r in m if "loss" in r]
    ax.plot(*zip(*pts), lw=1)
    ax.set_title(name, fontsize=8)
    ax.tick_params(labelsize=7)
  for ax in list(axes.flat)[len(runs):]:
    ax.axis("off")
  plt.tight_layout()
  fileio.save_figure_atomic(path, dpi=80)


def write(out_dir: str, results: dict, oracle: dict, ft_scores: dict, data_summary: dict,
          strides: dict | None = None, segment_len: int | None = None,
          pixels: dict | None = None, pairs: dict | None = None) -> dict:
  """results.md, results.json and report/*.png under out_dir; returns {'table': markdown}."""
  from affect_jax import predict
  from affect_jax.demo import ABAW6_BASELINE
  table = results_table(results, oracle, ABAW6_BASELINE, ft_scores, pixels)
  intervals = interval_table(results, pixels)
  if intervals:
    table += "\n\n" + intervals
  if pairs:
    table += "\n\n" + difference_table(pairs, results)
  if strides:
    table += "\n\n" + stride_table(strides, segment_len)
  report = os.path.join(out_dir, "report")
  os.makedirs(report, exist_ok=True)
  fileio.write_text_atomic(os.path.join(out_dir, "results.md"),
                           "# affect-jax demo results (synthetic Aff-Wild2)\n\n" + table + "\n")
  fileio.write_text_atomic(os.path.join(out_dir, "results.json"), json.dumps(
      {"results": {t: {n: {k: v for k, v in r.items() if k != "workdir"} for n, r in rs.items()}
                   for t, rs in results.items()},
       "oracle": oracle, "abaw6_baseline": ABAW6_BASELINE, "finetune_f1": ft_scores,
       "data": data_summary, "prediction_strides": strides or {}, "pixel_baseline": pixels or {},
       "paired_differences": pairs or {}},
      indent=1))
  recon = os.path.join(out_dir, "mae", "recon", "latest.png")
  if os.path.exists(recon):
    shutil.copyfile(recon, os.path.join(report, "mae_reconstruction.png"))
  _loss_curves(out_dir, os.path.join(report, "loss_curves.png"))
  for task in ("VA", "AU"):
    run = results.get(task, {}).get("tcn_tf_v")
    if not run:
      continue
    config, fn, thresholds = predict.load(run["workdir"])
    video = affwild2.list_videos(config.data.root, task, affwild2.VALIDATION_SET)[0]
    v = affwild2.load_video(config.data.root, task, affwild2.VALIDATION_SET, video,
                            max_unmatched=affwild2.max_unmatched(config))
    out = fn({video: v.num_frames})[video]
    name = "va_prediction.png" if task == "VA" else "au_raster.png"
    predict.plot_video(os.path.join(report, name), task, out, v.labels,
                       f"{task}, validation video {video} (TCN+Transformer, visual)", config.data.fps)
  return {"table": table}
