"""Feature extraction: every frame of every video, repairs, resume, matches a direct forward."""

import json

import numpy as np
import pytest
from PIL import Image

from affect_jax.data import affwild2, features, loaders
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
