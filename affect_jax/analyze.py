"""A video file -> per-frame valence/arousal, expression and AU predictions of trained models.

  analyze(video_path, out_dir, {"VA": va_workdir, "EXPR": expr_workdir, "AU": au_workdir})

The video goes through the path Aff-Wild2's frames take, so the models see what they were
trained on:
1. faces (`data.video`): decode every frame, find the faces, follow one subject, level each
   frame's face square by the roll of the eyes, crop it to `crop_size` and write it where
   Aff-Wild2 keeps its `cropped_aligned/` frames, under `out_dir/<name>/affwild2/` (the
   audio beside it as a 16 kHz WAV);
2. features: the visual features with the encoder that made each model's training features
   (named in its feature store, its weights checked against the store's hash), audio features
   with the store's settings on the video's own frame clock;
3. the temporal models of `launch/predict.py`'s workdirs, over the whole video;
4. `<name>.csv`: one row per frame (time, the face square and its roll, whether a face was
   found and whether the detector saw it or it was bridged over a short gap, valence,
   arousal, the 8 expression probabilities, the 12 AU probabilities); `<name>.png`: a
   timeline.

A frame without the subject's face keeps its row, flagged `face_found=0`; its predictions
come from the features of the nearest frame with a face (Aff-Wild2's rule for frames without
an image). A rerun reuses the faces and features of an unchanged video and settings.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import shutil
import time
import types
from collections.abc import Callable, Mapping

import jax
import ml_collections
import numpy as np
from absl import logging

from affect_jax import checkpoint, fileio, predict, sharding, tasks
from affect_jax.data import affwild2, audio, features, sources
from affect_jax.data import video as video_io
from affect_jax.train import extract, temporal

FACES_FILE = "faces.json"
TREE_DIR = "affwild2"
FEATURES_DIR = "features"


@dataclasses.dataclass(frozen=True)
class FaceSettings:
  """How faces are found, followed and cropped (`data.video`)."""
  crop_size: int = 112        # Aff-Wild2's cropped_aligned side; the encoder resizes as in training
  crop_scale: float = 1.1     # crop side / detector box side (`video.crop_boxes`)
  crop_shift: float = 0.0     # crop centre below the box centre, in box heights
  align: bool = True          # level the crop by the roll of the eyes (`video.EyeFinder`)
  detect_width: int = 640     # frames are searched at most this wide
  min_face: float = 0.08      # smallest face, share of the frame's shorter side
  min_neighbors: int = 5
  max_gap: int = 15           # detector misses bridged, frames
  min_track: int = 3          # shorter tracks are false detections
  smooth: int = 5             # boxes averaged over this many frames
  jpeg_quality: int = 95


def video_name(path: str | os.PathLike) -> str:
  """A video's name in outputs: its file stem, characters other than [A-Za-z0-9_.-] as _."""
  return re.sub(r"[^A-Za-z0-9_.-]", "_", os.path.splitext(os.path.basename(os.fspath(path)))[0])


# ---- 1. Faces ----


def find_faces(video_path: str, work: str, settings: FaceSettings = FaceSettings(),
               log: Callable[[str], None] = logging.info) -> dict:
  """Decodes `video_path`, follows one subject's face and writes its crops (and the audio)
  as an Aff-Wild2 tree `work/affwild2`; returns the record kept in `work/faces.json`:
  name, fps, num_frames, time_s, boxes (crop squares, None where no face), detected, found,
  has_audio, audio_seconds, frames/s of the detection pass. Reused as it is when the video
  file (name, size, mtime) and `settings` are unchanged."""
  name = video_name(video_path)
  marker = os.path.join(work, FACES_FILE)
  key = {"video": fileio.stat_fingerprint([video_path]), "settings": dataclasses.asdict(settings)}
  if os.path.isfile(marker):
    record = json.loads(fileio.path(marker).read_text())
    if record.get("key") == key:
      log(f"{name}: faces found earlier ({record['num_frames']} frames), reused")
      return record
  info = video_io.probe(video_path)
  detector = video_io.FaceDetector(settings.detect_width, settings.min_face,
                                   min_neighbors=settings.min_neighbors)
  eyes = video_io.EyeFinder() if settings.align else None
  start = time.perf_counter()
  detections, rolls, times = [], [], []
  for _, t, rgb in video_io.frames(video_path):
    found = detector(rgb)
    detections.append(found)
    rolls.append([eyes(rgb, box) for box in found] if eyes else [])
    times.append(t)
  n = len(detections)
  if n == 0:
    raise ValueError(f"{video_path}: the video stream has no frames")
  detect_fps = n / (time.perf_counter() - start)
  track = video_io.follow_subject(detections, max_gap=settings.max_gap, min_track=settings.min_track,
                                  smooth=settings.smooth)
  if not track.found.any():
    raise ValueError(
        f"{video_path}: no face found in any of its {n} frames ({sum(map(len, detections))} "
        f"detections, none in {settings.min_track} or more frames of one track). The detector "
        f"(OpenCV's Haar frontal-face cascade) needs frontal faces at least {settings.min_face:.0%}"
        " of the frame's shorter side; try --min_face smaller or --min_neighbors lower")
  squares = video_io.crop_boxes(track.boxes, settings.crop_scale, settings.crop_shift)
  roll = np.where(track.found, 0.0, np.nan)
  if eyes:
    roll = video_io.smooth_roll([rolls[t][j] if j >= 0 else np.nan
                                 for t, j in enumerate(track.index)], track.found)
  tree = os.path.join(work, TREE_DIR)
  frames_dir = os.path.join(tree, affwild2.FRAMES_DIR, name)
  wav = affwild2.audio_path(tree, name)
  if os.path.isfile(marker):
    os.remove(marker)  # an interrupted rewrite must not pass for the earlier result
  if os.path.isdir(frames_dir):
    shutil.rmtree(frames_dir)  # crops of other settings must not stay among these
  if wav.is_file():
    wav.unlink()
  os.makedirs(frames_dir)
  from PIL import Image
  for k, _, rgb in video_io.frames(video_path):
    if k < n and track.found[k]:
      face = video_io.crop(rgb, squares[k], settings.crop_size, float(roll[k]))
      Image.fromarray(face).save(os.path.join(frames_dir, affwild2.frame_name(k + 1)),
                                 quality=settings.jpeg_quality)
  samples = video_io.decode_audio(video_path, info)
  if info.has_audio:
    audio.write_wav(wav, samples)
  t0 = times[0] if np.isfinite(times[0]) else 0.0
  time_s = [float(t - t0) if np.isfinite(t) else k / info.fps for k, t in enumerate(times)]
  record = {
      "key": key, "video": os.path.abspath(video_path), "name": name, "fps": info.fps,
      "width": info.width, "height": info.height, "num_frames": n, "time_s": time_s,
      "boxes": [None if np.isnan(b[0]) else [float(v) for v in b] for b in squares],
      "roll": [None if np.isnan(r) else float(r) for r in roll],
      "detected": track.detected.astype(int).tolist(), "found": track.found.astype(int).tolist(),
      "tracks": track.tracks, "has_audio": info.has_audio,
      "audio_seconds": len(samples) / affwild2.AUDIO_RATE, "detect_fps": detect_fps}
  fileio.write_text_atomic(marker, json.dumps(record))
  log(f"{name}: {n} frames at {info.fps:.2f} fps, {info.width}x{info.height}; a face in "
      f"{int(track.found.sum())} ({int(track.detected.sum())} detected, the rest bridged), "
      f"{track.tracks} track(s); detection {detect_fps:.0f} frames/s")
  return record


# ---- 2. Features ----


def _key(info: dict) -> str:
  return hashlib.sha256(json.dumps(info, sort_keys=True).encode()).hexdigest()[:12]


def _visual(store: features.FeatureStore, tree: str, name: str, num_frames: int, work: str,
            encoder_workdir: str | None, batch_size: int, log) -> str:
  """The video's visual features by the encoder that made `store` (a model's training
  features); an encoder whose weights differ from those is an error."""
  made = store.info.get("config", {})
  workdir = encoder_workdir or made.get("encoder_workdir")
  if not workdir or not fileio.path(workdir).exists():
    raise FileNotFoundError(
        f"{store.root}: its features were made by the encoder at {made.get('encoder_workdir')!r}, "
        "which is not there; pass its workdir with --encoder")
  config = ml_collections.ConfigDict({
      "encoder_workdir": str(workdir), "encoder_kind": made.get("encoder_kind", "finetuned"),
      "feature_dtype": store.info["dtype"], "batch_size": batch_size, "mesh_shape": (-1, 1, 1),
      "data": {"root": tree, "image_size": int(made.get("image_size", 0))}})
  out = os.path.join(work, FEATURES_DIR, _key(store.info))
  new = extract.extract_visual(config, out, sources.FolderFrames(tree, num_frames={name: num_frames}),
                                 {name: num_frames}, log)
  if new.info["model_hash"] != store.info["model_hash"]:
    sharding.barrier(f"checked {new.root}")
    if jax.process_index() == 0:  # a rerun with the right encoder starts clean
      shutil.rmtree(new.root, ignore_errors=True)
    raise ValueError(
        f"the encoder at {workdir} (weights {new.info['model_hash']}) is not the one that made "
        f"the features a model was trained on ({store.root}: {store.info['model_hash']}); its "
        "predictions would be wrong. Pass the right encoder workdir with --encoder")
  return str(new.root)


def _audio(store: features.FeatureStore, tree: str, name: str, num_frames: int, fps: float,
           work: str) -> str:
  """The video's audio features with `store`'s settings, on the video's frame clock."""
  made = dict(store.info.get("config", {}))
  cfg = audio.AudioFeatureConfig(**{f.name: made[f.name] for f in dataclasses.fields(
      audio.AudioFeatureConfig) if f.name in made})
  root = os.path.join(work, FEATURES_DIR, _key(store.info), extract.AUDIO_DIR)
  if jax.process_index() == 0:
    new = features.FeatureStore.create(root, kind="audio", dim=cfg.dim, dtype=store.info["dtype"],
                                       model_hash=store.info["model_hash"],
                                       config={**dataclasses.asdict(cfg), "fps": fps})
    feats, silent = audio.video_audio_features(tree, name, num_frames, fps, cfg)
    new.write(name, feats, frames_without_audio=silent)
  sharding.barrier(f"audio features {root}")
  return root


# ---- 3-4. Predictions ----


def analyze(video_path: str, out_dir: str, workdirs: Mapping[str, str], *,
            settings: FaceSettings = FaceSettings(), encoder_workdir: str | None = None,
            batch_size: int = 64, log: Callable[[str], None] = logging.info) -> dict:
  """Runs the whole pipeline (module docstring); returns {'csv', 'png', 'faces',
  'outputs': {task: [T, K]}, 'seconds': {stage: s}}."""
  if not workdirs:
    raise ValueError("no trained models: give at least one of VA, EXPR, AU")
  for task in workdirs:
    tasks.get(task)  # an unknown name is an error naming the known ones
  if not os.path.isfile(video_path):
    raise FileNotFoundError(f"{video_path}: no such video file")
  name = video_name(video_path)
  work = os.path.join(out_dir, name)
  seconds = {}
  configs = {task: checkpoint.run_config(w) for task, w in workdirs.items()}

  start = time.perf_counter()
  if jax.process_index() == 0:
    find_faces(video_path, work, settings, log)
  sharding.barrier(f"faces of {video_path}")
  faces = json.loads((fileio.path(work) / FACES_FILE).read_text())
  seconds["faces"] = time.perf_counter() - start
  n, tree = faces["num_frames"], os.path.join(work, TREE_DIR)
  for task, config in configs.items():
    if abs(config.data.fps - faces["fps"]) > 0.05 * config.data.fps:
      log(f"{task}: the model was trained at {config.data.fps:g} fps, the video runs at "
          f"{faces['fps']:.2f}: its temporal context spans {config.data.fps / faces['fps']:.2f}x "
          "the time it did in training")

  start = time.perf_counter()
  made: dict[tuple[str, str], str] = {}
  data = {}
  for task, config in configs.items():
    data[task] = {"root": tree}
    for modality in temporal.modalities(config):
      trained = features.FeatureStore(config.data[f"{modality}_features"])
      if (modality, str(trained.root)) not in made:
        if modality == "visual":
          path = _visual(trained, tree, name, n, work, encoder_workdir, batch_size, log)
        else:
          if not faces["has_audio"]:
            raise ValueError(f"{video_path} has no audio track, and the {task} model "
                             f"({workdirs[task]}) takes audio (config.model.modalities); give "
                             "a model trained on visual features only")
          path = _audio(trained, tree, name, n, faces["fps"], work)
        made[modality, str(trained.root)] = path
      data[task][f"{modality}_features"] = made[modality, str(trained.root)]
  seconds["features"] = time.perf_counter() - start

  start = time.perf_counter()
  outputs = {}
  for task, workdir in workdirs.items():
    _, fn, _ = predict.load(workdir, data=data[task])
    outputs[task] = np.asarray(fn({name: n})[name], np.float32)
  seconds["models"] = time.perf_counter() - start
  csv_path = os.path.join(out_dir, f"{name}.csv")
  png_path = os.path.join(out_dir, f"{name}.png")
  if jax.process_index() == 0:
    write_csv(csv_path, faces, outputs)
    plot_timeline(png_path, faces, outputs, title=os.path.basename(video_path))
  sharding.barrier(f"results of {video_path}")
  return {"csv": csv_path, "png": png_path, "faces": faces, "outputs": outputs,
          "seconds": seconds}


def _output_columns(spec: tasks.Task) -> list[str]:
  """A task's CSV columns: its own names; class probabilities prefixed with the task."""
  if spec.kind == tasks.MULTICLASS:
    return [f"{spec.name.lower()}_{c}" for c in spec.columns]
  return list(spec.columns)


def _shown(spec: tasks.Task, outputs: np.ndarray) -> np.ndarray:
  """What the CSV and the timeline show: values as submitted (clipped), classes and units as
  probabilities."""
  return spec.decide(outputs) if spec.kind == tasks.REGRESSION else outputs


def csv_columns(names) -> list[str]:
  cols = ["frame", "time_s", "face_found", "face_detected", "face_x", "face_y", "face_w", "face_h",
          "face_roll_deg"]
  return cols + [c for t in tasks.NAMES if t in names for c in _output_columns(tasks.get(t))]


def write_csv(path: str, faces: dict, outputs: Mapping[str, np.ndarray]) -> None:
  """One row per frame, `csv_columns` (frame 1-based, as the crops are named; the face
  square and the roll it was levelled by empty where there is none; VA clipped to [-1, 1],
  as submitted)."""
  names = [t for t in tasks.NAMES if t in outputs]
  values = {t: _shown(tasks.get(t), outputs[t]) for t in names}
  lines = [",".join(csv_columns(names))]
  for k in range(faces["num_frames"]):
    box = faces["boxes"][k]
    row = [str(k + 1), f"{faces['time_s'][k]:.4f}", str(faces["found"][k]), str(faces["detected"][k])]
    row += [f"{v:.1f}" for v in box] if box else [""] * 4
    roll = faces["roll"][k]
    row.append(f"{math.degrees(roll):.1f}" if roll is not None else "")
    for task in names:
      row += [f"{v:.4f}" for v in values[task][k]]
    lines.append(",".join(row))
  fileio.write_text_atomic(path, "\n".join(lines) + "\n")


def read_csv(path: str) -> dict[str, np.ndarray]:
  """{column: [T] float64} of a `write_csv` file (empty cells NaN)."""
  with open(path) as f:
    header = f.readline().strip().split(",")
    rows = [line.rstrip("\n").split(",") for line in f if line.strip()]
  return {c: np.array([float(r[i]) if r[i] else np.nan for r in rows]) for i, c in enumerate(header)}


def plot_timeline(path: str, faces: dict, outputs: Mapping[str, np.ndarray], title: str = "") -> None:
  """Valence and arousal, the expression probabilities (stacked) and the AU probabilities
  over time, with the frames without a face shaded."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  t = np.asarray(faces["time_s"])
  nofaces = ~np.asarray(faces["found"], bool)
  specs = [tasks.get(name) for name in tasks.NAMES if name in outputs]
  heights = [2.4 if spec.kind == tasks.MULTILABEL else 2.0 for spec in specs]
  fig, axes = plt.subplots(len(specs), 1, figsize=(10, 0.8 + sum(heights)), sharex=True,
                           squeeze=False, height_ratios=heights)
  for ax, spec in zip(axes[:, 0], specs):
    out = _shown(spec, outputs[spec.name])
    if spec.kind == tasks.REGRESSION:
      for d, name in enumerate(spec.columns):
        ax.plot(t, out[:, d], color=("tab:red", "tab:blue", "tab:green")[d % 3], lw=1,
                label=name)
      ax.set_ylim(spec.value_range[0] - 0.05, spec.value_range[1] + 0.05)
      ax.axhline(0, color="grey", lw=0.5)
      ax.legend(loc="upper right", fontsize=7, ncol=2)
    elif spec.kind == tasks.MULTICLASS:
      ax.stackplot(t, out.T, labels=spec.columns, colors=plt.cm.tab10.colors[:out.shape[1]])
      ax.set_ylim(0, 1)
      ax.set_ylabel(f"P({spec.name.lower()})", fontsize=8)
      ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=7)
    else:
      extent = (t[0], t[-1] if len(t) > 1 else 1, spec.out_dim - 0.5, -0.5)
      ax.imshow(out.T, aspect="auto", cmap="magma", vmin=0, vmax=1, extent=extent,
                interpolation="nearest")
      ax.set_yticks(range(spec.out_dim), spec.columns, fontsize=7)
      ax.set_ylabel(f"P({spec.name})", fontsize=8)
    if nofaces.any():
      ax.fill_between(t, 0, 1, where=nofaces, color="grey", alpha=0.3, step="mid",
                      transform=ax.get_xaxis_transform(), label="no face")
  axes[-1, 0].set_xlabel("time (s); grey: no face found")
  if title:
    fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  fileio.save_figure_atomic(path, dpi=90)


# ---- The command line (launch/analyze_video.py, the affect-jax-analyze-video script) ----


def _define_flags():
  import functools
  import sys
  from absl import flags
  d = FaceSettings()
  # Declared for the script that runs (its --help lists them), not for this module.
  flags = types.SimpleNamespace(**{
      kind: functools.partial(getattr(flags, kind), module_name=sys.argv[0])
      for kind in ("DEFINE_string", "DEFINE_integer", "DEFINE_float", "DEFINE_bool")})
  flags.DEFINE_string("video", None, "The video file (any container and codec FFmpeg reads).",
                      required=True)
  flags.DEFINE_string("out_dir", None, "<name>.csv and <name>.png go here, the crops and "
                      "features under <name>/.", required=True)
  flags.DEFINE_string("va", "", "Workdir of a trained VA temporal model.")
  flags.DEFINE_string("expr", "", "Workdir of a trained Expr temporal model.")
  flags.DEFINE_string("au", "", "Workdir of a trained AU temporal model.")
  flags.DEFINE_string("encoder", "", "The encoder workdir that made the models' training "
                      "features (default: the one their feature stores name).")
  flags.DEFINE_integer("crop_size", d.crop_size, "Side of the face crops, pixels.")
  flags.DEFINE_float("crop_scale", d.crop_scale, "Crop side / detected box side.")
  flags.DEFINE_float("crop_shift", d.crop_shift, "Crop centre below the box's, box heights.")
  flags.DEFINE_bool("align", d.align, "Level each crop by the roll of the eyes.")
  flags.DEFINE_float("min_face", d.min_face, "Smallest face, share of the frame's shorter side.")
  flags.DEFINE_integer("min_neighbors", d.min_neighbors, "Detector hits that make a face.")
  flags.DEFINE_integer("max_gap", d.max_gap, "Detector misses bridged, frames.")
  flags.DEFINE_integer("batch_size", 64, "Frames per forward pass of the encoder.")


def _main(argv):
  del argv
  from absl import flags
  from affect_jax.train import loop
  sharding.join()
  loop.init_launcher()
  f = flags.FLAGS
  workdirs = {t: w for t, w in (("VA", f.va), ("EXPR", f.expr), ("AU", f.au)) if w}
  if not workdirs:
    from absl import app
    raise app.UsageError("give at least one of --va, --expr, --au")
  settings = FaceSettings(crop_size=f.crop_size, crop_scale=f.crop_scale, crop_shift=f.crop_shift,
                          align=f.align,
                          min_face=f.min_face, min_neighbors=f.min_neighbors, max_gap=f.max_gap)
  out = analyze(f.video, f.out_dir, workdirs, settings=settings,
                encoder_workdir=f.encoder or None, batch_size=f.batch_size)
  faces = out["faces"]
  print(f"{faces['name']}: {faces['num_frames']} frames, a face in {sum(faces['found'])} "
        f"({sum(faces['detected'])} detected); {', '.join(f'{k} {v:.1f} s' for k, v in out['seconds'].items())}")
  print(f"csv: {out['csv']}")
  print(f"timeline: {out['png']}")


def cli() -> None:
  """Entry point of launch/analyze_video.py and the affect-jax-analyze-video script."""
  from absl import app
  from affect_jax import hostenv
  _define_flags()
  hostenv.configure()
  app.run(_main)
