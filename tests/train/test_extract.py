"""Feature extraction: every frame of every video, repairs, resume, matches a direct forward."""

import json
import os
import re
import shutil
import wave

import numpy as np
import pytest
from PIL import Image

from affect_jax.data import affwild2, audio, features, loaders
from affect_jax.train import extract


from tests.train.conftest import extract_config_for as _config


def test_every_video_every_frame(synthetic_root, extracted):
  out, paths, _ = extracted
  manifest = json.loads((synthetic_root / "synthetic_manifest.json").read_text())
  labelled = {v: e for v, e in manifest["videos"].items() if e["tasks"]}
  for kind in ("visual", "audio"):
    store = features.FeatureStore(paths[kind])
    assert set(store.videos()) == set(labelled)
    for video, entry in labelled.items():
      assert store.read(video).shape == (entry["num_frames"], store.dim)
  visual = features.FeatureStore(paths["visual"])
  assert visual.dim == 128  # the tiny ViT's width
  for video, entry in labelled.items():
    meta = visual.meta(video)
    assert meta["frames_without_image"] == len(entry["missing_frames"])
    assert meta["repaired_frames"] == len(entry["missing_frames"])


def test_missing_frames_take_the_previous_feature(synthetic_root, extracted):
  _, paths, _ = extracted
  manifest = json.loads((synthetic_root / "synthetic_manifest.json").read_text())
  store = features.FeatureStore(paths["visual"])
  checked = 0
  for video, entry in manifest["videos"].items():
    if not entry["tasks"] or not entry["missing_frames"]:
      continue
    feats = np.asarray(store.read(video))
    has = np.ones(entry["num_frames"], bool)
    has[np.asarray(entry["missing_frames"]) - 1] = False
    for t in np.flatnonzero(~has):
      prev = [s for s in range(t, -1, -1) if has[s]]
      src = prev[0] if prev else int(np.flatnonzero(has)[0])
      np.testing.assert_array_equal(feats[t], feats[src])
      checked += 1
  assert checked > 0


def test_features_equal_a_direct_forward_pass(synthetic_root, finetune_workdir, extracted):
  _, paths, _ = extracted
  model, params, size = extract.load_encoder(_config(synthetic_root, finetune_workdir))
  video = features.FeatureStore(paths["visual"]).videos()[0]
  frames = affwild2.image_indices(synthetic_root, video)[:5]
  images = np.stack([np.asarray(Image.open(synthetic_root / "cropped_aligned" / video /
                                           affwild2.frame_name(int(k))).convert("RGB"))
                     for k in frames])
  want = np.asarray(model.apply({"params": params}, loaders.normalize_images(images)))
  got = np.asarray(features.FeatureStore(paths["visual"]).read(video))[frames - 1]
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_rerun_skips_complete_videos_and_resumes_after_a_crash(synthetic_root, finetune_workdir,
                                                               tmp_path, monkeypatch):
  config = _config(synthetic_root, finetune_workdir)
  config.audio = False
  real_write = features.FeatureStore.write
  calls = []

  def crash_on_third(self, video, feats, **meta):
    calls.append(video)
    if len(calls) == 3:
      raise RuntimeError("killed")
    return real_write(self, video, feats, **meta)

  monkeypatch.setattr(features.FeatureStore, "write", crash_on_third)
  with pytest.raises(RuntimeError, match="killed"):
    extract.run(config, str(tmp_path))
  monkeypatch.undo()
  store = features.FeatureStore(tmp_path / "visual")
  assert store.videos() == sorted(calls[:2])
  logs = []
  extract.run(config, str(tmp_path), log=logs.append)
  total = len(affwild2.all_videos(str(synthetic_root)))
  assert logs[0] == f"visual features: 2 of {total} videos already complete"
  assert len(store.videos()) == total
  logs.clear()
  extract.run(config, str(tmp_path), log=logs.append)
  assert logs == [f"visual features: {total} of {total} videos already complete"]


def test_changed_inputs_are_recomputed_and_only_they(synthetic_root, finetune_workdir, tmp_path):
  root = tmp_path / "data"
  shutil.copytree(synthetic_root, root)
  config, out = _config(root, finetune_workdir), tmp_path / "features"
  extract.run(config, str(out), log=lambda s: None)
  visual, sound = features.FeatureStore(out / "visual"), features.FeatureStore(out / "audio")
  videos = affwild2.all_videos(str(root))
  solo = next(v for v in videos if affwild2.source_video(v) == v)
  frames = affwild2.image_indices(root, solo)
  a, b = int(frames[2]), int(frames[5])
  before = {s: {v: s.read(v, mmap=False) for v in videos} for s in (visual, sound)}
  written = {s: {v: os.stat(s._meta_path(v)).st_mtime_ns for v in videos} for s in (visual, sound)}

  # Frame a's image becomes frame b's: only that video is recomputed, and row a now holds
  # frame b's feature.
  folder = root / affwild2.FRAMES_DIR / solo
  shutil.copyfile(folder / affwild2.frame_name(b), folder / affwild2.frame_name(a))
  logs = []
  extract.run(config, str(out), log=logs.append)
  n = len(videos)
  assert logs[0] == (f"visual features: {n - 1} of {n} videos already complete; 1 recomputed "
                     f"because their input files changed: {solo}")
  assert logs[-1] == f"audio features: {n} of {n} videos already complete"
  after = visual.read(solo, mmap=False)
  np.testing.assert_allclose(after[a - 1], before[visual][solo][b - 1], rtol=1e-4, atol=1e-4)
  assert not np.allclose(before[visual][solo][a - 1], before[visual][solo][b - 1], atol=1e-3)
  for v in videos:
    if v != solo:
      assert os.stat(visual._meta_path(v)).st_mtime_ns == written[visual][v]
    assert os.stat(sound._meta_path(v)).st_mtime_ns == written[sound][v]

  # The WAV cut to 70 % of the video: recomputed, the silent frames counted and warned about;
  # cut to 30 %: refused, naming the file and the setting.
  wav = affwild2.audio_path(root, solo)
  x, rate = audio.read_wav(wav)
  fps, num = config.data.fps, videos[solo]
  for fraction in (0.7, 0.3):
    with wave.open(str(wav), "wb") as f:
      f.setnchannels(1), f.setsampwidth(2), f.setframerate(rate)
      f.writeframes((x[: int(fraction * num / fps * rate)] * 32767).astype("<i2").tobytes())
    if fraction == 0.3:
      with pytest.raises(ValueError, match=re.escape(f"{wav}: the audio ends before video {solo}: "
                                                     "it covers 31% of its")) as e:
        extract.run(config, str(out), log=lambda s: None)
      assert "min_audio_coverage=0.5" in str(e.value)
      break
    logs.clear()
    extract.run(config, str(out), log=logs.append)
    assert logs[-2] == (f"audio features: {n - 1} of {n} videos already complete; 1 recomputed "
                        f"because their input files changed: {solo}")
    silent = sound.meta(solo)["frames_without_audio"]
    assert silent == sum(k / fps >= int(fraction * num / fps * rate) / rate for k in range(num)) > 0
    np.testing.assert_allclose(sound.read(solo)[: num // 2], before[sound][solo][: num // 2],
                               rtol=1e-3, atol=1e-3)
  # Nothing already written was lost: the refused video keeps its last good features.
  assert sound.meta(solo)["frames_without_audio"] == silent and sound.has(solo, num)
