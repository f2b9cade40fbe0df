"""Feature extraction: every frame of every video -> one visual vector (the fine-tuned
encoder's pooled feature) and one audio vector (on the same frame clock), in feature stores.

Frames without an image (or with an unreadable one) take the previous available frame's
feature (the next one at a video's start), counted per video. Frames past the end of a short
audio track read as silence, counted per video; below `min_audio_coverage` that is an error.
Reruns skip the complete videos whose input files (names, sizes, mtimes) are unchanged and
recompute the rest.
"""

from __future__ import annotations

import hashlib
import time

import jax
import ml_collections
import numpy as np
from absl import logging

from affect_jax import fileio, sharding
from affect_jax.data import affwild2, audio, features, loaders, sources
from affect_jax.train import finetune, loop, pretrain

VISUAL_DIR = "visual"
AUDIO_DIR = "audio"


def params_hash(params) -> str:
  h = hashlib.sha256()
  for path, leaf in sorted(jax.tree_util.tree_leaves_with_path(params), key=lambda kv: str(kv[0])):
    h.update(str(path).encode())
    h.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
  return h.hexdigest()[:16]


def load_encoder(config: ml_collections.ConfigDict):
  """(model with no head, params, image size) of the encoder to extract with."""
  if config.encoder_kind == "finetuned":
    ft_config, _, params = finetune.load_finetuned(config.encoder_workdir)
    model = finetune.create_model(ft_config, num_classes=0)
    params = {k: v for k, v in params.items() if k != "head"}
    size = ft_config.data.image_size
  elif config.encoder_kind == "mae":
    from affect_jax.models import vit
    mae_config, mae_params = pretrain.load_pretrained(config.encoder_workdir)
    model = vit.VisionTransformer(**vit.variant_config(mae_config.model.variant, decoder=False),
                                  pool="cls",
                                  scan_layers=mae_config.model.get("scan_layers", False))
    params = {k: mae_params[k] for k in ("patch_embed", "cls_token", "encoder")}
    size = mae_config.data.image_size
  else:
    raise ValueError(f"config.encoder_kind: unknown {config.encoder_kind!r} (finetuned | mae)")
  return model, params, config.data.image_size or size


def _finish_video(store, video, num_frames, has_image, feats_by_frame, inputs, frames_dir):
  """Assemble [T, D] from the features of frames whose image was read, repairing the rest."""
  rows, repaired = affwild2.repair_frames(feats_by_frame, num_frames, frames_dir)
  store.write(video, rows, inputs=inputs, repaired_frames=repaired,
              frames_without_image=int((~has_image).sum()))


def _plan(store, kind: str, videos: dict[str, int], inputs: dict[str, str], log) -> list[str]:
  """The videos to compute: missing, incomplete, or made from input files that changed since."""
  todo, changed = store.plan(videos, inputs)
  msg = f"{kind} features: {len(videos) - len(todo)} of {len(videos)} videos already complete"
  if changed:
    msg += (f"; {len(changed)} recomputed because their input files changed: "
            + ", ".join(changed[:5]) + (" ..." if len(changed) > 5 else ""))
  log(msg)
  return todo


def open_store(path, **kwargs) -> features.FeatureStore:
  """Creates (process 0) or opens (the others, after it) a feature store; each process then
  fills its own videos' files."""
  if jax.process_index() == 0:
    store = features.FeatureStore.create(path, **kwargs)
  sharding.barrier(f"feature store {path}")
  return store if jax.process_index() == 0 else features.FeatureStore.create(path, **kwargs)


def extract_visual(config: ml_collections.ConfigDict, out_dir: str, frames, videos: dict[str, int],
                   log=logging.info) -> features.FeatureStore:
  """Each process extracts its share of `videos` (balanced by frames) of `frames` (a
  `sources.frames`) through one sharded forward over all devices; every process runs the
  same number of batches."""
  model, params, size = load_encoder(config)
  store = open_store(
      fileio.path(out_dir) / VISUAL_DIR, kind="visual", dim=model.width, dtype=config.feature_dtype,
      model_hash=params_hash(params),
      config={"encoder_workdir": str(fileio.path(config.encoder_workdir)),
              "encoder_kind": config.encoder_kind, "pool": model.pool, "image_size": size})
  names = list(videos)
  mine = {v: videos[v] for v in sharding.process_share(names, [videos[v] for v in names])}
  inputs = {v: frames.fingerprint(v) for v in mine}
  todo = _plan(store, "visual", mine, inputs, log)
  mesh = sharding.make_mesh(config.mesh_shape)
  params = jax.device_put(params, sharding.replicated(mesh))
  forward = finetune.make_apply_fn(model, mesh)
  has_image = {v: frames.has_image(v) for v in todo}
  records = frames.image_records(todo)
  rows = sharding.batch_rows(config.batch_size, mesh)
  current, feats = 0, {}
  start, done_frames = time.perf_counter(), 0
  total_frames = sum(videos[v] for v in todo)

  def flush(upto: int):
    nonlocal current, feats, done_frames
    while current < upto:
      v = todo[current]
      _finish_video(store, v, videos[v], has_image[v], feats, inputs[v], frames.where(v))
      done_frames += videos[v]
      rate = done_frames / max(time.perf_counter() - start, 1e-9)
      log(f"visual {current + 1}/{len(todo)} {v}: {videos[v]} frames | {rate:.0f} frames/s | "
          f"ETA {loop.format_seconds((total_frames - done_frames) / max(rate, 1e-9))}")
      current, feats = current + 1, {}

  batches = loaders.eval_dataset(records, image_size=size, batch_size=rows, shard_index=0,
                                 shard_count=1,  # records are already this process's own
                                 **loaders.options(config.data))
  spec = {"image": jax.ShapeDtypeStruct((size, size, 3), np.uint8)}
  for batch, out in sharding.map_batches(lambda b: forward(params, b["image"]), batches, mesh,
                                         rows=rows, row_spec=spec):
    for row, v, f in zip(out, batch["video"], batch["frame"]):
      flush(int(v))  # records arrive in order: earlier videos are complete
      feats[int(f)] = row
  flush(len(todo))
  return store


def extract_audio(config: ml_collections.ConfigDict, out_dir: str, videos: dict[str, int],
                  log=logging.info) -> features.FeatureStore:
  cfg = audio.AudioFeatureConfig(**config.audio_features)
  blob = repr(sorted(config.audio_features.items())) + f"fps={config.data.fps}"
  store = open_store(
      fileio.path(out_dir) / AUDIO_DIR, kind="audio", dim=cfg.dim, dtype=config.feature_dtype,
      model_hash=hashlib.sha256(blob.encode()).hexdigest()[:16],
      config={**config.audio_features, "fps": config.data.fps})
  names = list(videos)
  mine = {v: videos[v] for v in sharding.process_share(names, [videos[v] for v in names])}
  inputs = {v: affwild2.audio_fingerprint(config.data.root, v) for v in mine}
  todo = _plan(store, "audio", mine, inputs, log)
  min_coverage = float(config.get("min_audio_coverage", 0.0))
  start, refused = time.perf_counter(), []
  for video in todo:
    n = videos[video]
    feats, silent = audio.video_audio_features(config.data.root, video, n, config.data.fps, cfg)
    if silent:
      what = (f"{affwild2.audio_path(config.data.root, video)}: the audio ends before video "
              f"{video}: it covers {1 - silent / n:.0%} of its {n} frames; the last {silent} "
              "read as silence")
      if 1 - silent / n < min_coverage:
        refused.append(what)
        continue
      logging.warning("%s", what)
    store.write(video, feats, inputs=inputs[video], frames_without_audio=silent)
  if todo:
    log(f"audio: {len(todo)} videos, {sum(videos[v] for v in todo) / (time.perf_counter() - start):.0f} frames/s")
  if refused:
    raise ValueError(f"{len(refused)} video(s) with too little audio (config.min_audio_coverage="
                     f"{min_coverage:g}): " + "; ".join(refused[:10])
                     + ". Give them a complete WAV, or lower min_audio_coverage to accept silence")
  return store


def run(config: ml_collections.ConfigDict, out_dir: str, log=logging.info) -> dict[str, str]:
  """Extracts what the config asks for into `out_dir/{visual,audio}`; returns their paths."""
  frames = sources.frames(config)
  videos = frames.videos(config.test_split)
  out = {}
  if config.visual:
    out["visual"] = str(extract_visual(config, out_dir, frames, videos, log).root)
  if config.audio:
    out["audio"] = str(extract_audio(config, out_dir, videos, log).root)
  return out
