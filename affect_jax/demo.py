"""The main job: the paper's method end to end on the embedded synthetic dataset.

  data -> MAE pretraining -> expression fine-tuning (MAE init, and random init for the
  ablation) -> visual + audio features -> temporal models for VA, Expr, AU (frame-wise
  baseline, TCN only, TCN+Transformer visual, TCN+Transformer visual+audio, and on the
  random-init features) -> scores beside the oracle -> results.md / results.json / report/*.png

Every stage runs the real launchers' code (`affect_jax.train.*`) with the task configs at a
small size. A stage records its settings and result in `out_dir/stages/<name>.json` when it
finishes; a rerun with the same settings reuses it, so a second run is fast and an
interrupted one resumes (training stages also resume from their own checkpoints). A stage's
settings include what it is made from: the records of the stages it reads and, for those
reading the dataset, a fingerprint of its files (names, sizes, mtimes), so a changed input
reruns exactly the stages downstream of it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from typing import Callable

import ml_collections

from affect_jax import fileio
from affect_jax.data import affwild2, synthetic
from affect_jax.data.synthetic.writer import MANIFEST, ORACLE

# ABAW6 official baselines on the real Aff-Wild2 validation set: a reference point only.
ABAW6_BASELINE = {"VA": 0.22, "EXPR": 0.25, "AU": 0.39}

PRESETS = {
    # A handful of tiny videos: the CI end-to-end test.
    "micro": dict(
        data=synthetic.SyntheticConfig(num_videos=8, min_frames=60, max_frames=90, image_size=32, seed=5),
        image_size=32, mae_steps=6, ft_steps=6, segment_len=32, stride=24, temporal_steps=12,
        batch=16),
    # The 2-core CPU demo. Many short videos rather than a few long ones: with few identities
    # the encoder memorises the training faces (24 videos: 0.69 train vs 0.19 val accuracy).
    "default": dict(
        data=synthetic.SyntheticConfig(num_videos=60, min_frames=120, max_frames=240, image_size=64),
        image_size=48, mae_steps=400, ft_steps=150, segment_len=64, stride=48, temporal_steps=300,
        batch=64),
    # The paper's sizes (ViT-B/16 at 224, 300/200 segments) for a machine that can take it.
    "full": dict(
        data=synthetic.SyntheticConfig(num_videos=60, min_frames=600, max_frames=3000, image_size=224),
        image_size=224, mae_steps=20000, ft_steps=3000, segment_len=300, stride=200,
        temporal_steps=0, batch=256),
}

VARIANTS = (  # (name, row label, encoder, model overrides)
    ("frame_mlp", "frame-wise baseline (MLP, visual)", "mae", {"kind": "frame_mlp"}),
    ("tcn_v", "TCN only, visual", "mae", {"use_transformer": False}),
    ("tcn_tf_v", "TCN+Transformer, visual", "mae", {}),
    ("tcn_tf_va", "TCN+Transformer, visual+audio", "mae", {"modalities": ("visual", "audio")}),
    ("tcn_tf_v_random", "TCN+Transformer, visual, random-init backbone", "random", {}),
)


# Paired comparisons (first minus second) on the same videos: the claim that temporal
# context beats the frame-wise model, with and without audio.
PAIRS = (("tcn_tf_va", "frame_mlp"), ("tcn_tf_v", "frame_mlp"))


class Stages:
  """Runs the pipeline's stages, each unless `out_dir/stages/<name>.json` records the same
  settings and the same fingerprints of what it is made from (`after`: earlier stages, or
  "data", whose fingerprint `made_from["data"]` the caller sets). Logs one line per stage
  with an estimate of the time left."""

  def __init__(self, out_dir: str, total: int, log: Callable[[str], None]):
    self.out_dir, self.total, self.log = out_dir, total, log
    self.made_from: dict[str, str] = {}  # stage -> the fingerprint later stages key on
    self.start, self.done, self.ran_s = time.perf_counter(), 0, []

  def __call__(self, name: str, settings: dict, fn: Callable[[], dict],
               workdir: str | None = None, after=("data",)) -> dict:
    t0 = time.perf_counter()
    settings = {**settings, "after": {n: self.made_from[n] for n in after}}
    result, ran = _stage(self.out_dir, name, settings, fn, workdir)
    self.made_from[name] = _record_fingerprint(self.out_dir, name)
    took = time.perf_counter() - t0
    self.done += 1
    if ran:
      self.ran_s.append(took)
    # Reused stages take no time: estimate the rest from the stages that ran (a resumed run's
    # first lines have none yet).
    eta = (f"{sum(self.ran_s) / len(self.ran_s) * (self.total - self.done):5.0f} s"
           if self.ran_s else "    ? s")
    self.log(f"[{self.done:2d}/{self.total}] {name:34s} {'ran' if ran else 'reused':6s} "
             f"{took:6.1f} s | elapsed {time.perf_counter() - self.start:6.1f} s | ETA {eta}")
    return result


def _stage(out_dir: str, name: str, settings: dict, fn: Callable[[], dict],
           workdir: str | None = None) -> tuple[dict, bool]:
  """Runs fn unless out_dir/stages/name.json records the same settings; (result, ran). A
  stage whose settings changed starts over in an emptied `workdir` (a training stage
  refuses to continue a run of another config)."""
  path = os.path.join(out_dir, "stages", f"{name}.json")
  settings = json.loads(json.dumps(settings, default=str))
  if os.path.exists(path):
    with open(path) as f:
      saved = json.load(f)
    if saved["settings"] == settings:
      return saved["result"], False
    if workdir is not None:
      shutil.rmtree(workdir, ignore_errors=True)
  result = fn()
  fileio.write_text_atomic(path, json.dumps({"settings": settings, "result": result},
                                            indent=1, default=float))
  return result, True


def _record_fingerprint(out_dir: str, name: str) -> str:
  """What a later stage keys on: the hash of a finished stage's record."""
  with open(os.path.join(out_dir, "stages", f"{name}.json"), "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()[:16]


def data_fingerprint(root: str) -> str:
  """`fileio.stat_fingerprint` of every file of the dataset."""
  files = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames.sort()
    files += [os.path.join(dirpath, n) for n in sorted(filenames)]
  return fileio.stat_fingerprint(files, root)


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


def _configs(p: dict, root: str, out_dir: str) -> dict[str, ml_collections.ConfigDict]:
  from configs import common, expr_finetune, extract, mae_pretrain
  tiny = p["image_size"] < 224
  mae = mae_pretrain.get_config("tiny" if tiny else "base")
  mae.data.root, mae.data.image_size, mae.batch_size = root, p["image_size"], p["batch"]
  mae.data.index_cache = os.path.join(out_dir, "cache", "face_index")
  mae.num_steps = p["mae_steps"]
  mae.recon_every, mae.log_every = max(p["mae_steps"] // 2, 1), max(p["mae_steps"] // 10, 1)
  ft = expr_finetune.get_config("tiny" if tiny else "base")
  ft.data.root, ft.data.image_size, ft.batch_size = root, p["image_size"], p["batch"]
  ft.num_steps, ft.log_every = p["ft_steps"], max(p["ft_steps"] // 10, 1)
  ft.eval_every_epochs = 100.0  # evaluate once, at the end (the run is shorter than an epoch)
  ft.init.mae_workdir = os.path.join(out_dir, "mae")
  ext = extract.get_config()
  ext.data.root = root
  configs = {"mae": mae, "ft": ft, "extract": ext}
  for task in affwild2.TASKS:
    t = common.get_temporal_config(task, "tiny" if tiny else "paper")
    t.data.root = root
    t.data.segment_len, t.data.stride, t.data.predict_stride = p["segment_len"], p["stride"], p["stride"]
    if p["temporal_steps"]:
      t.num_steps = p["temporal_steps"]
    t.log_every = max(t.num_steps // 10, 1) if t.num_steps > 0 else 50
    configs[task] = t
  return configs


def run(out_dir: str, preset: str = "default", log: Callable[[str], None] = print) -> dict:
  if preset not in PRESETS:
    raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
  from affect_jax import pixel_baseline, predict, report
  from affect_jax.train import extract, finetune, pretrain, temporal
  p = PRESETS[preset]
  out_dir = os.path.abspath(out_dir)
  root = os.path.join(out_dir, "data")
  cfg = _configs(p, root, out_dir)
  step = Stages(out_dir, 1 + 1 + 1 + 2 + 2 + len(VARIANTS) * len(affwild2.TASKS) + 3, log)

  def data_stage():
    make_data(root, p["data"])
    return {"summary": check_data(root)}

  data = step("data", dataclasses.asdict(p["data"]), data_stage, after=())
  step.made_from["data"] = data_fingerprint(root)  # the files as they are now, edits included
  with open(os.path.join(root, ORACLE)) as f:
    oracle = json.load(f)

  # Headroom reference: a per-frame linear model on raw downsampled pixels (regularisation
  # chosen on validation, then scored on test) tells what the learned features must beat.
  pixels = step("pixel_baseline", {"size": 12, "v": 2}, lambda: pixel_baseline.evaluate(
      root, affwild2.VALIDATION_SET, size=12, report_split=affwild2.TEST_SET,
      bootstrap_samples=cfg["VA"].bootstrap_samples))

  step("mae_pretrain", cfg["mae"].to_dict(), lambda: {
      "losses": [h["loss"] for h in pretrain.train_and_evaluate(cfg["mae"], os.path.join(out_dir, "mae"))["history"]]},
       os.path.join(out_dir, "mae"))

  ft_scores = {}
  for init in ("mae", "random"):
    c = ml_collections.ConfigDict(cfg["ft"].to_dict())
    c.init.kind = init
    res = step(f"finetune_{init}_init", c.to_dict(), lambda c=c, init=init: {
        "best": finetune.train_and_evaluate(c, os.path.join(out_dir, f"finetune_{init}"))["best"]},
        os.path.join(out_dir, f"finetune_{init}"),
        after=("data", "mae_pretrain") if init == "mae" else ("data",))
    ft_scores[init] = res["best"]["value"]

  feats = {}
  for init in ("mae", "random"):
    c = ml_collections.ConfigDict(cfg["extract"].to_dict())
    c.encoder_workdir = os.path.join(out_dir, f"finetune_{init}")
    c.audio = init == "mae"  # audio features do not depend on the encoder
    feats[init] = step(f"features_{init}_init", c.to_dict(), lambda c=c, init=init: extract.run(
        c, os.path.join(out_dir, f"features_{init}"), log=lambda s: None),
        after=("data", f"finetune_{init}_init"))
  feats["random"]["audio"] = feats["mae"]["audio"]

  results: dict = {}
  for task in affwild2.TASKS:
    for name, label, encoder, overrides in VARIANTS:
      c = ml_collections.ConfigDict(cfg[task].to_dict())
      c.data.visual_features, c.data.audio_features = feats[encoder]["visual"], feats[encoder]["audio"]
      for k, v in overrides.items():
        c.model[k] = v
      workdir = os.path.join(out_dir, "temporal", f"{task}_{name}")
      res = step(f"{task.lower()}_{name}", c.to_dict(), lambda c=c, w=workdir: {
          k: v for k, v in temporal.train_and_evaluate(c, w).items() if k != "history"}, workdir,
          after=("data", f"features_{encoder}_init", "features_mae_init"))
      results.setdefault(task, {})[name] = {"label": label, "workdir": workdir, **res}

  # The authors predict with disjoint windows (stride = segment length); ours overlaps them
  # at the training stride and averages. Same trained models, both ways.
  compare = [p["stride"], p["segment_len"]]
  strides = step("prediction_strides", {
      "strides": compare, "runs": {t: results[t]["tcn_tf_va"].get("best_step") for t in results}},
      lambda: {t: predict.compare_strides(results[t]["tcn_tf_va"]["workdir"], compare)
               for t in results}, after=("data", *(f"{t.lower()}_tcn_tf_va" for t in results)))

  samples = cfg["VA"].bootstrap_samples
  pairs = step("paired_differences", {
      "pairs": PAIRS, "samples": samples,
      "runs": {t: {n: results[t][n].get("best_step") for pair in PAIRS for n in pair} for t in results}},
      lambda: {t: {f"{a}-{b}": predict.compare_models(
          results[t][a]["workdir"], results[t][b]["workdir"], num_samples=samples)
                   for a, b in PAIRS} for t in results},
      after=("data", *sorted({f"{t.lower()}_{n}" for t in results for pair in PAIRS for n in pair})))

  summary = step("report", {"v": 4, "results": {t: {n: r.get("best_step") for n, r in v.items()}
                                                 for t, v in results.items()}, "strides": strides,
                           "pixels": pixels, "pairs": pairs},
                 lambda: report.write(out_dir, results, oracle, ft_scores, data["summary"],
                                      strides, p["segment_len"], pixels, pairs),
                 after=tuple(step.made_from))  # the report draws on every stage
  table = summary["table"]
  log("\n" + table)
  log(f"\nresults: {os.path.join(out_dir, 'results.md')}, report: {os.path.join(out_dir, 'report')}"
      f" (total {time.perf_counter() - step.start:.0f} s)")
  return {"data_root": root, "summary": data["summary"], "oracle": oracle, "results": results,
          "finetune_f1": ft_scores, "table": table}
