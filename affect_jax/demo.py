"""The main job: the paper's method end to end on the embedded synthetic dataset.

  MAE weights (shipped, or self-pretrained here on a synthetic face corpus of other people)
  -> data -> expression fine-tuning (MAE init, and random init for the ablation) -> visual +
  audio features -> temporal models for VA, Expr, AU (frame-wise baseline, TCN only,
  TCN+Transformer visual, TCN+Transformer visual+audio, and on the random-init features) ->
  scores beside the oracle -> results.md / results.json / report/*.png

MAE self-pretraining is the expensive, reusable step, as in the paper (hundreds of thousands
of faces, 500 epochs): a preset starts from the MAE weights its recipe (`MAE_RECIPES`) made,
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

from affect_jax import fileio
from affect_jax.report import FRESH  # the fresh draw's key beside the split names
from affect_jax.data import affwild2, synthetic
from affect_jax.data.synthetic import corpus as corpus_lib
from affect_jax.data.synthetic.writer import MANIFEST, ORACLE

# Where affect-jax ships MAE weights (package data): <name>.safetensors + <name>.json.
WEIGHTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights")


PRESETS = {
    # A handful of tiny videos: the CI end-to-end test.
    "micro": dict(
        data=synthetic.SyntheticConfig(num_videos=8, min_frames=60, max_frames=90, image_size=32, seed=5),
        image_size=32, ft_steps=6, segment_len=32, stride=24, temporal_steps=12,
        batch=16, fresh_videos=4),
    # The 2-core CPU demo. Many short videos rather than a few long ones: the fine-tuned
    # encoder has to read expressions across people, and with few identities it learns the
    # training faces instead (36 training videos: 0.81 train vs 0.17 validation accuracy).
    # Fine-tuning gains with updates more than with images: validation macro-F1 (MAE init)
    # 0.18 after 150 steps of 64, 0.30 after 1000 of 32, 0.37 after 1500 of 32 (and the full
    # model's Expr F1 +0.08 over 1000 steps, paired on validation videos).
    "default": dict(
        data=synthetic.SyntheticConfig(num_videos=240, min_frames=60, max_frames=120, image_size=64),
        image_size=48, ft_steps=1500, segment_len=64, stride=48, temporal_steps=300,
        batch=32, fresh_videos=48),
    # The paper's sizes (ViT-B/16 at 224, 300/200 segments) for a machine that can take it.
    "full": dict(
        data=synthetic.SyntheticConfig(num_videos=60, min_frames=600, max_frames=3000, image_size=224),
        image_size=224, ft_steps=3000, segment_len=300, stride=200,
        temporal_steps=0, batch=256, fresh_videos=20),
}
FRESH_SEED_OFFSET = 1000  # the fresh draw's generator seed, past the dataset's


def fresh_draw(data: synthetic.SyntheticConfig, num_videos: int) -> synthetic.SyntheticConfig:
  """Another draw from the same generator, every video a test video: a new seed (other people,
  other affect), scored by the final table only, after every decision was taken on the
  dataset's validation split."""
  return dataclasses.replace(data, seed=data.seed + FRESH_SEED_OFFSET, num_videos=num_videos,
                             train_fraction=0.0, validation_fraction=0.0)

# MAE self-pretraining per preset: the face corpus (never the videos' people), steps and
# batch at the preset's image size, the held-out corpus the weights are scored on, and the
# name of the shipped weights this recipe made (None: always pretrained here).
MAE_RECIPES = {
    "micro": dict(corpus=corpus_lib.FaceCorpusConfig(num_identities=48, image_size=32, seed=1),
                  steps=6, batch=16, shipped=None),
    "default": dict(corpus=corpus_lib.FaceCorpusConfig(num_identities=20000, image_size=64, seed=1),
                    steps=6000, batch=128, shipped="mae_tiny_synthetic_faces"),
    "full": dict(corpus=corpus_lib.FaceCorpusConfig(num_identities=300000, image_size=224, seed=1),
                 steps=200000, batch=1024, shipped=None),
}
HELDOUT_IDENTITIES = 256  # one image each, another seed: the reconstruction score's faces


def heldout_corpus(recipe: dict) -> corpus_lib.FaceCorpusConfig:
  c = recipe["corpus"]
  return dataclasses.replace(c, num_identities=HELDOUT_IDENTITIES, min_images=1, max_images=1,
                             seed=c.seed + 1000)


VARIANTS = (  # (name, row label, encoder, model overrides)
    ("frame_mlp", "frame-wise baseline (MLP, visual)", "mae", {"kind": "frame_mlp"}),
    ("tcn_v", "TCN only, visual", "mae", {"use_transformer": False}),
    ("tcn_tf_v", "TCN+Transformer, visual", "mae", {}),
    ("tcn_tf_va", "TCN+Transformer, visual+audio", "mae", {"modalities": ("visual", "audio")}),
    ("tcn_tf_v_random", "TCN+Transformer, visual, random-init backbone", "random", {}),
)


# Paired comparisons, first minus second on the same videos: the full model against the
# pixel probe ("pixels"), then the paper's claims (its ablations): the MAE-pretrained backbone
# over random init, TCN+Transformer over the TCN alone over the frame-wise model, and audio.
PAIRS = (("tcn_tf_va", "pixels"), ("tcn_tf_v", "tcn_tf_v_random"), ("tcn_tf_v", "tcn_v"),
         ("tcn_v", "frame_mlp"), ("tcn_tf_va", "tcn_tf_v"))


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


def _configs(p: dict, root: str, out_dir: str,
             recipe: dict | None = None) -> dict[str, ml_collections.ConfigDict]:
  from configs import common, expr_finetune, extract, mae_pretrain
  tiny = p["image_size"] < 224
  recipe = recipe or MAE_RECIPES["full" if not tiny else "default"]
  mae = mae_pretrain.get_config("tiny" if tiny else "base")
  mae.data.roots = os.path.join(out_dir, "faces")
  mae.data.image_size, mae.batch_size = p["image_size"], recipe["batch"]
  mae.data.index_cache = os.path.join(out_dir, "cache", "face_index")
  mae.num_steps = recipe["steps"]
  mae.recon_every, mae.log_every = max(mae.num_steps // 2, 1), max(mae.num_steps // 20, 1)
  mae.checkpoint_every = max(mae.num_steps // 10, 1)
  ft = expr_finetune.get_config("tiny" if tiny else "base")
  ft.data.root, ft.data.image_size, ft.batch_size = root, p["image_size"], p["batch"]
  ft.num_steps, ft.log_every = p["ft_steps"], max(p["ft_steps"] // 10, 1)
  ft.eval_every_epochs = 100.0  # evaluate once, at the end (the run is shorter than an epoch)
  # The MAE weights enter as users' public ones do: converted from the timm layout.
  ft.init.kind, ft.init.params_path = "converted", os.path.join(out_dir, "mae_params")
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
  from affect_jax.data import faces
  from affect_jax.models import convert
  from affect_jax.train import pretrain
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
  from affect_jax.data import faces, loaders
  from affect_jax.models import convert
  from affect_jax.train import pretrain
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


def run(out_dir: str, preset: str = "default", log: Callable[[str], None] = print,
        mae: str = "auto") -> dict:
  """The whole pipeline under `out_dir`. `mae`: 'shipped' (the preset's MAE weights from
  affect_jax/weights), 'scratch' (self-pretrain them here: face corpus, pretraining, export),
  'auto' (shipped where the preset has them)."""
  if preset not in PRESETS:
    raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
  if mae not in ("auto", "shipped", "scratch"):
    raise ValueError(f"mae must be 'auto', 'shipped' or 'scratch', got {mae!r}")
  from affect_jax import pixel_baseline, predict, report
  from affect_jax.models import convert
  from affect_jax.train import extract, finetune, pretrain, temporal
  p, recipe = PRESETS[preset], MAE_RECIPES[preset]
  if mae == "auto":
    mae = "shipped" if recipe["shipped"] else "scratch"
  if mae == "shipped" and not recipe["shipped"]:
    raise ValueError(f"preset {preset!r} has no shipped MAE weights: use mae='scratch'")
  out_dir = os.path.abspath(out_dir)
  root = os.path.join(out_dir, "data")
  cfg = _configs(p, root, out_dir, recipe)
  num_mae_stages = 5 if mae == "scratch" else 3
  step = Stages(out_dir, 2 + 1 + num_mae_stages + 2 + 4 + len(VARIANTS) * len(affwild2.TASKS) + 4,
                log)

  def data_stage():
    make_data(root, p["data"])
    return {"summary": check_data(root)}

  data = step("data", dataclasses.asdict(p["data"]), data_stage, after=())
  step.made_from["data"] = data_fingerprint(root)  # the files as they are now, edits included
  # The fresh draw: new people and affect from the same generator, for the final table only.
  fresh_root = os.path.join(out_dir, "fresh", "data")
  fresh_config = fresh_draw(p["data"], p["fresh_videos"])

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
  pixels = step("pixel_baseline", {"size": 12, "v": 3}, lambda: pixel_baseline.evaluate(
      root, affwild2.VALIDATION_SET, size=12, report_split=affwild2.TEST_SET,
      bootstrap_samples=cfg["VA"].bootstrap_samples,
      others={FRESH: (fresh_root, affwild2.TEST_SET)}, predictions_dir=pixel_dir),
      after=("data", "fresh_data"))

  # MAE weights: made here (corpus -> pretraining -> export) or the shipped file; either way
  # scored on held-out faces and converted like a public checkpoint.
  name = recipe["shipped"] or f"mae_{preset}"
  heldout = os.path.join(out_dir, "faces_heldout")
  step("mae_heldout_faces", dataclasses.asdict(heldout_corpus(recipe)), lambda: {
      "images": corpus_lib.generate_corpus(heldout, heldout_corpus(recipe))["images"]}, after=())
  if mae == "scratch":
    faces_dir = os.path.join(out_dir, "faces")
    step("mae_face_corpus", dataclasses.asdict(recipe["corpus"]), lambda: {
        k: v for k, v in corpus_lib.generate_corpus(faces_dir, recipe["corpus"]).items()
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
      config = json.loads(json.dumps(cfg["mae"].to_dict()).replace(out_dir, "<out_dir>"))
      return export_mae_weights(
          cfg["mae"], os.path.join(out_dir, "mae"),
          os.path.join(out_dir, "mae_weights", f"{name}.safetensors"), heldout, {
              "name": name, "command": f"python launch/demo.py --preset={preset} --mae=scratch",
              "model": f"MaskedAutoencoder {cfg['mae'].model.variant}",
              "image_size": cfg["mae"].data.image_size, "seed": cfg["mae"].seed,
              "config": config, "corpus": dataclasses.asdict(recipe["corpus"]),
              "corpus_images": pretrained["images"],
              "generator_version": corpus_lib.GENERATOR_VERSION,
              "heldout_corpus": dataclasses.asdict(heldout_corpus(recipe)),
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
    shutil.rmtree(cfg["ft"].init.params_path, ignore_errors=True)  # an interrupted earlier try
    convert.save_params(convert.convert_checkpoint(weights_path, "mae", cfg["mae"].model.variant),
                        cfg["ft"].init.params_path)
    return {"heldout_loss": score}

  step("mae_params", {"weights": weights["sha256"]}, params_stage, cfg["ft"].init.params_path,
       after=("data", "mae_weights", "mae_heldout_faces"))

  ft_scores = {}
  for init in ("mae", "random"):
    c = ml_collections.ConfigDict(cfg["ft"].to_dict())
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
  encoder_of = {name: encoder for name, _, encoder, _ in VARIANTS}

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
  temporal_stages = [f"{t.lower()}_{n}" for t in results for n in results[t]]
  fresh = step("fresh_scores", {"samples": samples}, lambda: {
      t: {n: predict.evaluate(r["workdir"], (affwild2.TEST_SET,), data=fresh_data[encoder_of[n]],
                              num_samples=samples)[affwild2.TEST_SET] for n, r in rs.items()}
      for t, rs in results.items()},
      after=("fresh_data", "fresh_features_mae_init", "fresh_features_random_init", *temporal_stages))
  for t, rs in results.items():
    for n, r in rs.items():
      r[FRESH] = fresh[t][n]

  scored = (affwild2.VALIDATION_SET, affwild2.TEST_SET, FRESH)

  def pairs_stage():
    out = {}
    for t in results:
      got = {}  # model -> {split key: ({video: decided}, {video: labels})}
      for n in sorted({n for pair in PAIRS for n in pair} - {"pixels"}):
        got[n] = predict.decided(results[t][n]["workdir"])
        got[n][FRESH] = predict.decided(results[t][n]["workdir"], (affwild2.TEST_SET,),
                                        data=fresh_data[encoder_of[n]])[affwild2.TEST_SET]
      got["pixels"] = {}
      for key in scored:
        with np.load(os.path.join(pixel_dir, f"{t}_{key}.npz")) as z:
          got["pixels"][key] = ({v: z[v] for v in z.files}, None)
      out[t] = {}
      for a, b in PAIRS:
        out[t][f"{a}-{b}"] = {key: predict.paired_difference(
            t, got[a][key][0], got[b][key][0], got[a][key][1], num_samples=samples)
                              for key in scored}
    return out

  pairs = step("paired_differences", {"pairs": PAIRS, "samples": samples}, pairs_stage,
               after=("data", "fresh_data", "pixel_baseline", "fresh_features_mae_init",
                      "fresh_features_random_init", *temporal_stages))

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
