"""The main job: the paper's method end to end on the embedded synthetic dataset.

  MAE weights (shipped, or self-pretrained here on a synthetic face corpus of other people)
  -> data -> expression fine-tuning (MAE init, and random init for the ablation) -> visual +
  audio features -> temporal models for VA, Expr, AU (frame-wise baseline, TCN only,
  TCN+Transformer visual, TCN+Transformer visual+audio, and on the random-init features) ->
  scores beside the oracle -> results.md / results.json / report/*.png

The experiment is a config (configs/demo.py: the data, the MAE recipe, every stage's config,
the temporal variants, the paired comparisons); `run` adds the paths under `out_dir`.

MAE self-pretraining is the expensive, reusable step, as in the paper (hundreds of thousands
of faces, 500 epochs): a preset starts from the MAE weights its recipe (`config.mae`) made,
shipped in `affect_jax/weights/` as a timm-layout safetensors file with its manifest, and
loaded through the same converter as public MAE checkpoints. `mae="scratch"` re-makes them:
the face corpus, the pretraining run and the export, as stages of their own.

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
import numpy as np

from affect_jax import fileio, pixel_baseline, predict, report, tasks
from affect_jax.data import affwild2, faces, loaders, synthetic
from affect_jax.data.synthetic import corpus as corpus_lib
from affect_jax.data.synthetic.writer import MANIFEST, ORACLE
from affect_jax.models import convert
from affect_jax.report import FRESH  # the fresh draw's key beside the split names
from affect_jax.train import extract, finetune, pretrain, temporal

# Where affect-jax ships MAE weights (package data): <name>.safetensors + <name>.json.
WEIGHTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights")


def fresh_draw(config: ml_collections.ConfigDict) -> synthetic.SyntheticConfig:
  """Another draw from the dataset's generator, every video a test video: a new seed (other
  people, other affect), scored by the final table only, after every decision was taken on
  the dataset's validation split."""
  data = synthetic.SyntheticConfig(**config.data)
  return dataclasses.replace(data, seed=data.seed + config.fresh_seed_offset,
                             num_videos=config.fresh_videos, train_fraction=0.0,
                             validation_fraction=0.0)


def face_corpus(config: ml_collections.ConfigDict) -> corpus_lib.FaceCorpusConfig:
  """The MAE recipe's face corpus (config.mae.corpus)."""
  return corpus_lib.FaceCorpusConfig(**config.mae.corpus)


def heldout_corpus(config: ml_collections.ConfigDict) -> corpus_lib.FaceCorpusConfig:
  """The faces MAE weights are scored on: other people (another seed), one image each."""
  c = face_corpus(config)
  return dataclasses.replace(c, num_identities=config.mae.heldout_identities, min_images=1,
                             max_images=1, seed=c.seed + 1000)


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


def stage_configs(config: ml_collections.ConfigDict, root: str,
                  out_dir: str) -> dict[str, ml_collections.ConfigDict]:
  """config.stages with their paths: the dataset at `root`, the rest under `out_dir`."""
  cfg = {name: ml_collections.ConfigDict(c.to_dict()) for name, c in config.stages.items()}
  cfg["mae"].data.roots = os.path.join(out_dir, "faces")
  cfg["mae"].data.index_cache = os.path.join(out_dir, "cache", "face_index")
  cfg["finetune"].data.root = root
  cfg["finetune"].init.params_path = os.path.join(out_dir, "mae_params")
  for name in ("extract", *affwild2.TASKS):
    cfg[name].data.root = root
  return cfg


def _machine() -> str:
  """The CPU model (Linux: /proc/cpuinfo), else the platform's machine name."""
  import platform
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.machine()


def _file_sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def shipped_weights(name: str) -> tuple[str, dict]:
  """(path of the safetensors file, its manifest) of MAE weights affect-jax ships."""
  path = os.path.join(WEIGHTS_DIR, f"{name}.safetensors")
  manifest = os.path.join(WEIGHTS_DIR, f"{name}.json")
  if not (os.path.isfile(path) and os.path.isfile(manifest)):
    raise FileNotFoundError(f"{path} (and {name}.json): shipped MAE weights not found; "
                            "re-make them with launch/demo.py --mae=scratch")
  with open(manifest) as f:
    return path, json.load(f)


def export_mae_weights(config: ml_collections.ConfigDict, workdir: str, out_path: str,
                       heldout_root: str, manifest: dict) -> dict:
  """The newest params of the pretraining run in `workdir` as a timm-layout safetensors file
  (`out_path`) and, beside it (.json), `manifest` completed with the file's held-out
  reconstruction loss (`score_mae_weights`), sha256 and size; both written atomically."""
  import flax.linen as nn
  import jax
  import safetensors.numpy
  _, params = pretrain.load_pretrained(workdir)
  model, size = pretrain.create_model(config), config.data.image_size
  state = convert.add_position_tables(convert.export_timm_state_dict(params), size,
                                      model.patch_size)
  fileio.atomic_write(out_path, lambda tmp: safetensors.numpy.save_file(state, tmp))
  # The reference point: the same MAE at its initialisation (the pretraining run's seed).
  untrained = nn.unbox(jax.jit(lambda r: model.init(
      {"params": r, "masking": r}, jax.numpy.zeros((1, size, size, 3)), train=False))(
          jax.random.key(config.seed))["params"])
  manifest = {**manifest, "heldout_loss": score_mae_weights(out_path, config, heldout_root),
              "untrained_heldout_loss": pretrain.heldout_loss(
                  model, untrained, faces.index_images(heldout_root, cache_dir=None),
                  image_size=size),
              "sha256": _file_sha256(out_path), "bytes": os.path.getsize(out_path)}
  fileio.write_text_atomic(os.path.splitext(out_path)[0] + ".json",
                           json.dumps(manifest, indent=1) + "\n")
  return manifest


def score_mae_weights(weights: str, config: ml_collections.ConfigDict, heldout_root: str,
                      recon_png: str | None = None, frames: list[str] | None = None) -> float:
  """Held-out reconstruction loss of a timm-layout MAE file (`pretrain.heldout_loss` on the
  held-out corpus), and optionally the reconstruction picture of `frames`."""
  model = pretrain.create_model(config)
  params = convert.convert_timm_state_dict(convert.load_state_dict(weights),
                                           convert.params_shapes(model))
  size = config.data.image_size
  loss = pretrain.heldout_loss(model, params, faces.index_images(heldout_root, cache_dir=None),
                               image_size=size)
  if recon_png and frames:
    images = np.stack([np.asarray(loaders.load_rgb(f).resize((size, size))) for f in frames])
    masked, recon = pretrain.reconstruct(model, params, images)
    pretrain.save_png(recon_png, pretrain.reconstruction_grid(images, masked, recon))
  return loss


def run(out_dir: str, config: ml_collections.ConfigDict, log: Callable[[str], None] = print,
        mae: str = "auto") -> dict:
  """The whole pipeline of `config` (configs/demo.py) under `out_dir`. `mae`: 'shipped' (the
  recipe's MAE weights from affect_jax/weights), 'scratch' (self-pretrain them here: face
  corpus, pretraining, export), 'auto' (shipped where the recipe has them)."""
  if mae not in ("auto", "shipped", "scratch"):
    raise ValueError(f"mae must be 'auto', 'shipped' or 'scratch', got {mae!r}")
  preset, shipped = config.preset, config.mae.shipped
  if mae == "auto":
    mae = "shipped" if shipped else "scratch"
  if mae == "shipped" and not shipped:
    raise ValueError(f"preset {preset!r} has no shipped MAE weights: use mae='scratch'")
  out_dir = os.path.abspath(out_dir)
  root = os.path.join(out_dir, "data")
  cfg = stage_configs(config, root, out_dir)
  data_config = synthetic.SyntheticConfig(**config.data)
  variants, pairs_wanted = tuple(config.variants), tuple(config.pairs)
  segment_len, stride = cfg["VA"].data.segment_len, cfg["VA"].data.stride
  num_mae_stages = 5 if mae == "scratch" else 3
  step = Stages(out_dir, 2 + 1 + num_mae_stages + 2 + 4 + len(variants) * len(affwild2.TASKS) + 4,
                log)

  def data_stage():
    make_data(root, data_config)
    return {"summary": check_data(root)}

  data = step("data", dataclasses.asdict(data_config), data_stage, after=())
  step.made_from["data"] = data_fingerprint(root)  # the files as they are now, edits included
  # The fresh draw: new people and affect from the same generator, for the final table only.
  fresh_root = os.path.join(out_dir, "fresh", "data")
  fresh_config = fresh_draw(config)

  def fresh_stage():
    make_data(fresh_root, fresh_config)
    return {"summary": check_data(fresh_root)}

  step("fresh_data", dataclasses.asdict(fresh_config), fresh_stage, after=())
  step.made_from["fresh_data"] = data_fingerprint(fresh_root)
  with open(os.path.join(root, ORACLE)) as f:
    oracle = json.load(f)
  with open(os.path.join(fresh_root, ORACLE)) as f:
    fresh_oracle = json.load(f)
  for task in oracle:
    oracle[task][FRESH] = fresh_oracle[task][affwild2.TEST_SET]

  # Headroom reference: a per-frame linear model on raw downsampled pixels (regularisation
  # chosen on validation, then scored on test and the fresh draw) tells what the learned
  # features must beat; its per-video predictions go to the paired comparisons.
  pixel_dir = os.path.join(out_dir, "pixel_baseline")
  pixels = step("pixel_baseline", {"size": config.pixel_size, "v": 3}, lambda: pixel_baseline.evaluate(
      root, affwild2.VALIDATION_SET, size=config.pixel_size, report_split=affwild2.TEST_SET,
      bootstrap_samples=cfg["VA"].bootstrap_samples,
      others={FRESH: (fresh_root, affwild2.TEST_SET)}, predictions_dir=pixel_dir),
      after=("data", "fresh_data"))

  # MAE weights: made here (corpus -> pretraining -> export) or the shipped file; either way
  # scored on held-out faces and converted like a public checkpoint.
  name = shipped or f"mae_{preset}"
  heldout = os.path.join(out_dir, "faces_heldout")
  step("mae_heldout_faces", dataclasses.asdict(heldout_corpus(config)), lambda: {
      "images": corpus_lib.generate_corpus(heldout, heldout_corpus(config))["images"]}, after=())
  if mae == "scratch":
    faces_dir = os.path.join(out_dir, "faces")
    step("mae_face_corpus", dataclasses.asdict(face_corpus(config)), lambda: {
        k: v for k, v in corpus_lib.generate_corpus(faces_dir, face_corpus(config)).items()
        if k != "config"}, after=())

    def pretrain_stage():
      t0 = time.perf_counter()
      out = pretrain.train_and_evaluate(cfg["mae"], os.path.join(out_dir, "mae"))
      return {"losses": [h["loss"] for h in out["history"]], "images": out["num_images"],
              "wall_s": time.perf_counter() - t0}

    pretrained = step("mae_pretrain", cfg["mae"].to_dict(), pretrain_stage,
                      os.path.join(out_dir, "mae"), after=("mae_face_corpus",))

    def export_stage():
      # The run's settings as the command would make them (its folders under <out_dir>).
      mae_config = json.loads(json.dumps(cfg["mae"].to_dict()).replace(out_dir, "<out_dir>"))
      return export_mae_weights(
          cfg["mae"], os.path.join(out_dir, "mae"),
          os.path.join(out_dir, "mae_weights", f"{name}.safetensors"), heldout, {
              "name": name, "command": f"python launch/demo.py --preset={preset} --mae=scratch",
              "model": f"MaskedAutoencoder {cfg['mae'].model.variant}",
              "image_size": cfg["mae"].data.image_size, "seed": cfg["mae"].seed,
              "config": mae_config, "corpus": dataclasses.asdict(face_corpus(config)),
              "corpus_images": pretrained["images"],
              "generator_version": corpus_lib.GENERATOR_VERSION,
              "heldout_corpus": dataclasses.asdict(heldout_corpus(config)),
              "wall_s": round(pretrained["wall_s"], 1),
              "machine": _machine(),
              "cpus": os.cpu_count(), "final_losses": pretrained["losses"][-5:]})

    weights = step("mae_weights", {"name": name, "v": 2}, export_stage,
                   after=("mae_pretrain", "mae_heldout_faces"))
    weights_path = os.path.join(out_dir, "mae_weights", f"{name}.safetensors")
  else:
    weights_path, weights = shipped_weights(name)
    for key, want in (("image_size", cfg["mae"].data.image_size),
                      ("model", f"MaskedAutoencoder {cfg['mae'].model.variant}")):
      if weights.get(key) != want:
        raise ValueError(f"{weights_path}: made for {key} {weights.get(key)!r}, the {preset!r} "
                         f"preset needs {want!r}; re-make them with --mae=scratch")
    step("mae_weights", {"name": name, "sha256": _file_sha256(weights_path)},
         lambda: weights, after=())

  def params_stage():
    frames = sorted(os.path.join(dirpath, f) for dirpath, _, files in
                    os.walk(os.path.join(root, affwild2.FRAMES_DIR)) for f in files)[::97][:8]
    score = score_mae_weights(weights_path, cfg["mae"], heldout,
                              os.path.join(out_dir, "mae_weights", "reconstruction.png"), frames)
    if abs(score - weights["heldout_loss"]) > 1e-3 * max(1.0, abs(weights["heldout_loss"])):
      raise RuntimeError(f"{weights_path}: held-out reconstruction loss {score:.5f}, its "
                         f"manifest says {weights['heldout_loss']:.5f}: not the weights it describes")
    shutil.rmtree(cfg["finetune"].init.params_path, ignore_errors=True)  # an interrupted earlier try
    convert.save_params(convert.convert_checkpoint(weights_path, "mae", cfg["mae"].model.variant),
                        cfg["finetune"].init.params_path)
    return {"heldout_loss": score}

  step("mae_params", {"weights": weights["sha256"]}, params_stage, cfg["finetune"].init.params_path,
       after=("data", "mae_weights", "mae_heldout_faces"))

  ft_scores = {}
  for init in ("mae", "random"):
    c = ml_collections.ConfigDict(cfg["finetune"].to_dict())
    if init == "random":
      c.init.kind = "random"
    res = step(f"finetune_{init}_init", c.to_dict(), lambda c=c, init=init: {
        "best": finetune.train_and_evaluate(c, os.path.join(out_dir, f"finetune_{init}"))["best"]},
        os.path.join(out_dir, f"finetune_{init}"),
        after=("data", "mae_params") if init == "mae" else ("data",))
    ft_scores[init] = res["best"]["value"]

  # Features of both sets through both encoders (audio once: it does not depend on them). A
  # store refuses another encoder's features: a stage that runs again starts it afresh.
  feats, fresh_feats = {}, {}
  for prefix, data_root, data_stage_name, out, sink in (
      ("", root, "data", out_dir, feats),
      ("fresh_", fresh_root, "fresh_data", os.path.join(out_dir, "fresh"), fresh_feats)):
    for init in ("mae", "random"):
      c = ml_collections.ConfigDict(cfg["extract"].to_dict())
      c.encoder_workdir, c.data.root = os.path.join(out_dir, f"finetune_{init}"), data_root
      c.audio = init == "mae"
      store_dir = os.path.join(out, f"features_{init}")
      sink[init] = step(f"{prefix}features_{init}_init", c.to_dict(),
                        lambda c=c, d=store_dir: extract.run(c, d, log=lambda s: None), store_dir,
                        after=(data_stage_name, f"finetune_{init}_init"))
  feats["random"]["audio"] = feats["mae"]["audio"]
  # The trained models read the fresh draw through its own feature stores.
  fresh_data = {init: {"root": fresh_root, "visual_features": fresh_feats[init]["visual"],
                       "audio_features": fresh_feats["mae"]["audio"]} for init in fresh_feats}
  encoder_of = {name: encoder for name, _, encoder, _ in variants}

  results: dict = {}
  for task in affwild2.TASKS:
    for name, label, encoder, overrides in variants:
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
  compare = [stride, segment_len]
  strides = step("prediction_strides", {
      "strides": compare, "runs": {t: results[t]["tcn_tf_va"].get("best_step") for t in results}},
      lambda: {t: predict.compare_strides(results[t]["tcn_tf_va"]["workdir"], compare)
               for t in results}, after=("data", *(f"{t.lower()}_tcn_tf_va" for t in results)))

  samples = cfg["VA"].bootstrap_samples
  temporal_stages = [f"{t.lower()}_{n}" for t in results for n in results[t]]
  fresh_decided = {}  # (task, model) -> its decisions on the fresh draw, when predicted here

  def fresh_stage():
    out = {}
    for t, rs in results.items():
      out[t] = {}
      for n, r in rs.items():
        scores, by_video = predict.evaluate(r["workdir"], (affwild2.TEST_SET,),
                                            data=fresh_data[encoder_of[n]],
                                            num_samples=samples, with_decided=True)
        out[t][n], fresh_decided[t, n] = scores[affwild2.TEST_SET], by_video[affwild2.TEST_SET]
    return out

  fresh = step("fresh_scores", {"samples": samples}, fresh_stage,
               after=("fresh_data", "fresh_features_mae_init", "fresh_features_random_init",
                      *temporal_stages))
  for t, rs in results.items():
    for n, r in rs.items():
      r[FRESH] = fresh[t][n]

  scored = (affwild2.VALIDATION_SET, affwild2.TEST_SET, FRESH)

  def pairs_stage():
    out = {}
    for t in results:
      got = {}  # model -> {split key: ({video: decided}, {video: labels})}
      for n in sorted({n for pair in pairs_wanted for n in pair} - {"pixels"}):
        got[n] = predict.decided(results[t][n]["workdir"])
        got[n][FRESH] = fresh_decided.get((t, n)) or predict.decided(
            results[t][n]["workdir"], (affwild2.TEST_SET,),
            data=fresh_data[encoder_of[n]])[affwild2.TEST_SET]
      got["pixels"] = {}
      for key in scored:
        with np.load(os.path.join(pixel_dir, f"{t}_{key}.npz")) as z:
          got["pixels"][key] = ({v: z[v] for v in z.files}, None)
      out[t] = {}
      for a, b in pairs_wanted:
        out[t][f"{a}-{b}"] = {key: predict.paired_difference(
            t, got[a][key][0], got[b][key][0], got[a][key][1], num_samples=samples)
                              for key in scored}
    return out

  pairs = step("paired_differences", {"pairs": pairs_wanted, "samples": samples}, pairs_stage,
               after=("data", "fresh_data", "pixel_baseline", "fresh_features_mae_init",
                      "fresh_features_random_init", *temporal_stages))

  def report_stage():
    out = report.write(out_dir, results, oracle, ft_scores, data["summary"], strides,
                       segment_len, pixels, pairs)
    for task, png in (("VA", "va_prediction.png"), ("AU", "au_raster.png")):  # a video each
      if "tcn_tf_v" not in results.get(task, {}):  # a config without that variant
        continue
      workdir = results[task]["tcn_tf_v"]["workdir"]
      video, score = predict.median_video(workdir, affwild2.VALIDATION_SET)
      predict.plot_run_video(
          os.path.join(out_dir, "report", png), workdir, affwild2.VALIDATION_SET, video,
          f"{task}, TCN+Transformer (visual), validation video {video}: the median of the "
          f"videos' own {tasks.get(task).score_name} ({score:.2f} on this video alone)")
    return out

  summary = step("report", {"v": 5, "results": {t: {n: r.get("best_step") for n, r in v.items()}
                                                 for t, v in results.items()}, "strides": strides,
                           "pixels": pixels, "pairs": pairs}, report_stage,
                 after=tuple(step.made_from))  # the report draws on every stage
  table = summary["table"]
  log("\n" + table)
  log(f"\nresults: {os.path.join(out_dir, 'results.md')}, report: {os.path.join(out_dir, 'report')}"
      f" (total {time.perf_counter() - step.start:.0f} s)")
  return {"data_root": root, "summary": data["summary"], "oracle": oracle, "results": results,
          "finetune_f1": ft_scores, "table": table,
          "results_md": os.path.join(out_dir, "results.md")}


README_BEGIN, README_END = "<!-- demo-results:begin -->", "<!-- demo-results:end -->"


def update_readme(readme: str, results_md: str) -> None:
  """Replaces what lies between the README's demo-results markers with the tables of
  `results_md` (its heading left out), atomically."""
  with open(readme) as f:
    text = f.read()
  if text.count(README_BEGIN) != 1 or text.count(README_END) != 1 or (
      text.index(README_BEGIN) > text.index(README_END)):
    raise ValueError(f"{readme}: needs one {README_BEGIN} line followed by one {README_END} line")
  with open(results_md) as f:
    tables = f.read().split("\n", 1)[1].strip("\n")  # below the '# ...' heading
  head, rest = text.split(README_BEGIN)
  tail = rest.split(README_END)[1]
  fileio.write_text_atomic(readme, f"{head}{README_BEGIN}\n{tables}\n{README_END}{tail}")
