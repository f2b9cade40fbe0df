"""The main job: the method end to end on the embedded synthetic dataset.

Each stage writes files under `out_dir` and is skipped when its outputs already exist for
the same settings, so a rerun is fast and an interrupted run resumes. Stages so far:

  1. data      the synthetic Aff-Wild2 set (`out_dir/data`), read back through the data layer

Later stages (MAE pretraining, fine-tuning, features, temporal model, report) join here.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Callable

from affect_jax.data import affwild2, synthetic
from affect_jax.data.synthetic.writer import MANIFEST, ORACLE

PRESETS = {
    # A handful of tiny videos: the CI end-to-end test.
    "micro": synthetic.SyntheticConfig(num_videos=6, min_frames=60, max_frames=90, image_size=32),
    # The demo-size set: about 30 videos x 300-900 frames at 112 px.
    "default": synthetic.SyntheticConfig(),
}


def make_data(root: str, config: synthetic.SyntheticConfig) -> bool:
  """Writes the dataset unless `root` already holds one made with `config`; True if written."""
  manifest = os.path.join(root, MANIFEST)
  if os.path.exists(manifest) and os.path.exists(os.path.join(root, ORACLE)):
    with open(manifest) as f:
      if json.load(f)["config"] == dataclasses.asdict(config):
        return False
  synthetic.generate(root, config)
  return True


def check_data(root: str) -> dict:
  """Reads the dataset back with the Aff-Wild2 reader and checks it against the manifest."""
  with open(os.path.join(root, MANIFEST)) as f:
    totals = json.load(f)["totals"]
  summary = affwild2.summarize(root, with_test_labels=True)
  for task, splits in totals.items():
    for split, want in splits.items():
      got = summary[task][split]
      for key in ("videos", "frames", "valid", "invalid"):
        if got[key] != want[key]:
          raise RuntimeError(f"{root}: {task} {split} {key}: reader counts {got[key]}, "
                             f"generator reported {want[key]}")
  return summary


def format_data_table(summary: dict, oracle: dict) -> str:
  lines = ["| task | split | videos | frames | valid | invalid | no image | oracle |",
           "|---|---|---|---|---|---|---|---|"]
  for task, splits in summary.items():
    for split, s in splits.items():
      o = oracle[task][split]
      score = f"CCC {o['mean']:.3f}" if task == "VA" else f"F1 {o['f1']:.3f}"
      lines.append(f"| {task} | {split} | {s['videos']} | {s['frames']} | {s['valid']} | "
                   f"{s['invalid']} | {s['without_image']} | {score} |")
  return "\n".join(lines)


def run(out_dir: str, preset: str = "default", log: Callable[[str], None] = print) -> dict:
  if preset not in PRESETS:
    raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
  start = time.perf_counter()
  data_root = os.path.join(out_dir, "data")

  t0 = time.perf_counter()
  wrote = make_data(data_root, PRESETS[preset])
  summary = check_data(data_root)
  log(f"[1/1] data: {'written' if wrote else 'reused'} {data_root} "
      f"({time.perf_counter() - t0:.1f} s, elapsed {time.perf_counter() - start:.1f} s)")

  with open(os.path.join(data_root, ORACLE)) as f:
    oracle = json.load(f)
  table = format_data_table(summary, oracle)
  log("\nSynthetic Aff-Wild2, read back through affect_jax.data.affwild2 "
      "(oracle = best score achievable against the written labels):\n" + table)
  return {"data_root": data_root, "summary": summary, "oracle": oracle, "table": table}
