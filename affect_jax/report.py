"""The demo's report: results table (markdown + JSON) and pictures a person can open."""

from __future__ import annotations

import json
import os
import shutil

from affect_jax import fileio, metrics, tasks
from affect_jax.data import affwild2
from affect_jax.train import loop

METRIC_NAME = {t.name: t.score_name for t in tasks.REGISTRY.values()}
ABAW6_BASELINE = {t.name: t.abaw6_baseline for t in tasks.REGISTRY.values()}
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
FRESH = "fresh"  # the key of the fresh draw's scores, beside the split names
# Scored sets, as columns: the key of their scores and their heading.
COLUMNS = ((affwild2.VALIDATION_SET, "val"), (affwild2.TEST_SET, "test"), (FRESH, "fresh draw"))


def _columns(present) -> list[tuple[str, str]]:
  return [(k, h) for k, h in COLUMNS if k in present]


def _head(first: str, tasks, columns) -> list[str]:
  return ["| " + first + " | " + " | ".join(f"{t} {METRIC_NAME[t]} {h}" for t in tasks
                                            for _, h in columns) + " |",
          "|---|" + "---|" * (len(tasks) * len(columns))]


def _run_scores(r: dict) -> dict:
  """{split key: scores} of a temporal run's record ('val', 'test', FRESH)."""
  keys = {"val": affwild2.VALIDATION_SET, "test": affwild2.TEST_SET, FRESH: FRESH}
  return {keys[k]: r[k] for k in keys if k in r}


def _pixel_scores(r: dict) -> dict:
  return {affwild2.VALIDATION_SET: r, **{k: r[k] for k in (affwild2.TEST_SET, FRESH) if k in r}}


def results_table(results: dict, oracle: dict, baseline: dict, ft_scores: dict,
                  pixels: dict | None = None) -> str:
  """Markdown: every model's headline score per task on validation, test and (where
  scored) the fresh draw, beside the pixel probe, the oracle and the ABAW6 baseline."""
  tasks = [t for t in affwild2.TASKS if t in results]
  names = list(next(iter(results.values())))
  columns = _columns(_run_scores(results[tasks[0]][names[0]]))
  lines = _head("model", tasks, columns)

  def row(label, by_task):
    cells = [f"{by_task[t][k][MAIN[t]]:.3f}" if k in by_task.get(t, {}) and MAIN[t] in by_task[t][k]
             else "-" for t in tasks for k, _ in columns]
    lines.append(f"| {label} | " + " | ".join(cells) + " |")

  for name in names:
    row(results[tasks[0]][name]["label"], {t: _run_scores(results[t][name]) for t in tasks})
  if pixels:
    row(PIXEL_ROW, {t: _pixel_scores(pixels[t]) for t in tasks if t in pixels})
  row("oracle (clean latent vs labels)", oracle)
  lines.append("| ABAW6 baseline (real Aff-Wild2, reference only) | " + " | ".join(
      f"{baseline[t]:.2f}" if k == affwild2.VALIDATION_SET else "-" for t in tasks
      for k, _ in columns) + " |")
  extra = []
  full = "tcn_tf_va" if "tcn_tf_va" in names else None
  if full:
    extra.append(f"Share of the oracle reached by {results[tasks[0]][full]['label']}: " + "; ".join(
        f"{t} " + ", ".join(f"{h} {_run_scores(results[t][full])[k][MAIN[t]] / oracle[t][k][MAIN[t]]:.0%}"
                            for k, h in columns if oracle[t].get(k, {}).get(MAIN[t], 0) > 0)
        for t in tasks))
  au = results.get("AU", {}).get("tcn_tf_v")
  if au and "f1_tuned" in au["val"]:
    extra.append("AU F1 with per-unit thresholds tuned on validation (TCN+Transformer, visual): "
                 + ", ".join(f"{h} {_run_scores(au)[k]['f1_tuned']:.3f}" for k, h in columns
                             if "f1_tuned" in _run_scores(au).get(k, {})))
  extra.append("Frame fine-tuning, validation macro-F1 of the expression classifier: "
               + ", ".join(f"{k}-init {v:.3f}" for k, v in ft_scores.items()))
  return "\n".join(lines) + "\n\n" + "\n".join(f"- {e}" for e in extra)


def _run_intervals(r: dict) -> dict:
  iv = r.get("intervals", {})
  out = {affwild2.VALIDATION_SET: iv.get("val"), affwild2.TEST_SET: iv.get("test")}
  if FRESH in r:
    out[FRESH] = r[FRESH].get("interval")
  return out


def interval_table(results: dict, pixels: dict | None = None) -> str:
  """Markdown: the video-bootstrap interval of every row's headline score ('-' when no
  run recorded one). With a dozen or so videos per split these are wide; differences between
  rows inside them are not evidence of anything (the paired table is)."""
  tasks = [t for t in affwild2.TASKS if t in results]
  rows = []  # (label, {task: {split key: [low, high]}})
  for name in next(iter(results.values())):
    rows.append((results[tasks[0]][name]["label"],
                 {t: _run_intervals(results[t][name]) for t in tasks}))
  if pixels:
    rows.append((PIXEL_ROW, {t: pixels.get(t, {}).get("intervals", {}) for t in tasks}))
  samples = {results[t][n]["intervals"]["samples"] for t in tasks for n in results[t]
             if "intervals" in results[t][n]}
  if not samples:
    return ""
  columns = _columns({k for _, r in rows for t in tasks for k, v in r[t].items() if v})
  lines = _head(f"{metrics.INTERVAL_LEVEL:.0%} interval, videos resampled ({samples.pop()} draws)",
                tasks, columns)
  for label, by_task in rows:
    cells = [f"{iv[0]:.2f} to {iv[1]:.2f}" if iv else "-"
             for t in tasks for iv in (by_task[t].get(k) for k, _ in columns)]
    lines.append(f"| {label} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def difference_table(pairs: dict, results: dict) -> str:
  """Markdown: paired differences of headline scores, first model minus second ('pixels':
  the pixel probe), on the same videos resampled alike.

  pairs: {task: {"a-b": {split key: `predict.paired_difference` record}}} as the demo's
  paired stage gives (results.json keeps each record's share of draws the first wins).
  """
  tasks = [t for t in affwild2.TASKS if t in pairs]
  first = next(iter(pairs[tasks[0]].values()))
  columns = _columns(first)
  lines = _head(f"paired difference, first minus second ({metrics.INTERVAL_LEVEL:.0%} interval)",
                tasks, columns)

  def label(name):
    return PIXEL_ROW if name == "pixels" else results[tasks[0]][name]["label"]

  for key in pairs[tasks[0]]:
    a, b = key.split("-")
    cells = []
    for t in tasks:
      for split, _ in columns:
        r = pairs[t][key].get(split)
        cells.append(f"{r['difference']:+.3f} ({r['interval'][0]:+.2f} to {r['interval'][1]:+.2f})"
                     if r else "-")
    lines.append(f"| {label(a)} minus {label(b)} | " + " | ".join(cells) + " |")
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
  """results.md, results.json, report/loss_curves.png (from the runs' metric logs) and
  report/mae_reconstruction.png under out_dir, from the result records alone (no model is
  loaded); returns {'table': markdown}."""
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
  recon = os.path.join(out_dir, "mae_weights", "reconstruction.png")  # the demo's own frames
  if os.path.exists(recon):
    shutil.copyfile(recon, os.path.join(report, "mae_reconstruction.png"))
  _loss_curves(out_dir, os.path.join(report, "loss_curves.png"))
  return {"table": table}
