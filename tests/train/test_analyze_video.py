"""A video file through the trained models (affect_jax.analyze): one CSV row per frame,
crops as the detector placed them, frames without a face flagged and repaired, reruns
reused, and the errors a user meets."""

import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("av", reason="the video extra: pip install 'affect-jax[video]'")
pytest.importorskip("cv2", reason="the video extra: pip install 'affect-jax[video]'")

from affect_jax import analyze, predict  # noqa: E402
from affect_jax.data import affwild2, features  # noqa: E402
from affect_jax.data import video as video_io  # noqa: E402
from affect_jax.data.synthetic import clip  # noqa: E402
from affect_jax.train import temporal  # noqa: E402
from configs import common  # noqa: E402

CLIP = clip.ClipConfig(num_frames=120, seed=2)  # away for frames 48-71


def _train(task, root, paths, workdir, modalities=("visual",)):
  c = common.get_temporal_config(task, "tiny")
  c.data.root = str(root)
  c.data.visual_features, c.data.audio_features = paths["visual"], paths["audio"]
  c.model.modalities = modalities
  c.data.segment_len, c.data.stride, c.data.predict_stride = 32, 24, 24
  c.num_steps, c.log_every, c.eval_every_epochs, c.checkpoint_every = 4, 4, 100.0, 4
  c.bootstrap_samples = 10
  temporal.train_and_evaluate(c, str(workdir))
  return str(workdir)


@pytest.fixture(scope="module")
def models(synthetic_root, extracted, tmp_path_factory):
  _, paths, _ = extracted
  out = tmp_path_factory.mktemp("video_models")
  return {"VA": _train("VA", synthetic_root, paths, out / "va", ("visual", "audio")),
          "EXPR": _train("EXPR", synthetic_root, paths, out / "expr"),
          "AU": _train("AU", synthetic_root, paths, out / "au")}


@pytest.fixture(scope="module")
def analysed(models, tmp_path_factory):
  out = tmp_path_factory.mktemp("analysed")
  path = clip.write_clip(out / "in", CLIP)
  logs = []
  result = analyze.analyze(str(path), str(out / "out"), models, log=logs.append)
  return path, out / "out", result, logs


def test_one_row_per_frame_with_the_face_flags_and_every_output(analysed):
  path, out, result, _ = analysed
  rows = analyze.read_csv(result["csv"])
  assert list(rows) == analyze.csv_columns(affwild2.TASKS)
  n = CLIP.num_frames
  np.testing.assert_array_equal(rows["frame"], np.arange(1, n + 1))
  np.testing.assert_allclose(rows["time_s"], np.arange(n) / CLIP.fps, atol=1e-3)
  truth = json.loads(path.with_suffix(".json").read_text())["face_boxes"]
  present = np.array([b is not None for b in truth])
  found = rows["face_found"].astype(bool)
  np.testing.assert_array_equal(found, result["faces"]["found"])
  assert (found == present).mean() >= 0.95 and not found[52:68].any()
  assert np.isnan(rows["face_x"][~found]).all() and not np.isnan(rows["face_w"][found]).any()
  boxes = np.stack([rows[f"face_{c}"] for c in "xywh"], 1)
  # The synthetic subject holds their head level: whatever the eyes say, the crops stay so.
  assert np.isnan(rows["face_roll_deg"][~found]).all()
  assert np.abs(np.nanmedian(rows["face_roll_deg"][found])) < 5
  ok = found & present
  assert np.median(video_io.iou(boxes[ok], np.array([truth[k] for k in np.flatnonzero(ok)]))) > 0.75
  # Every frame has every output, as submitted: VA clipped, probabilities.
  va = np.stack([rows["valence"], rows["arousal"]], 1)
  np.testing.assert_allclose(va, np.clip(result["outputs"]["VA"], -1, 1), atol=1e-4)
  expr = np.stack([rows[f"expr_{e}"] for e in affwild2.EXPR_NAMES], 1)
  np.testing.assert_allclose(expr.sum(1), 1, atol=1e-3)
  au = np.stack([rows[a] for a in affwild2.AU_NAMES], 1)
  assert ((au >= 0) & (au <= 1)).all() and not np.isnan(np.concatenate([va, expr, au], 1)).any()
  assert os.path.getsize(result["png"]) > 5000


def test_crops_are_the_detected_squares_and_faceless_frames_take_the_nearest_features(analysed, models):
  path, out, result, _ = analysed
  faces = result["faces"]
  frames_dir = out / "synthetic_clip" / analyze.TREE_DIR / affwild2.FRAMES_DIR / "synthetic_clip"
  written = sorted(int(p.stem) - 1 for p in frames_dir.iterdir())
  assert written == [k for k in range(CLIP.num_frames) if faces["found"][k]]
  for k, _, rgb in video_io.frames(path):
    if k in (0, 30, 100):
      want = video_io.crop(rgb, np.array(faces["boxes"][k]), 112, faces["roll"][k])
      got = np.asarray(Image.open(frames_dir / affwild2.frame_name(k + 1)))
      assert np.abs(got.astype(int) - want).mean() < 2.5  # JPEG at quality 95
  # The models read the video's new feature stores; a frame without a face has the row of
  # the last frame before it that has one (Aff-Wild2's repair rule).
  config = predict._run_config(models["VA"])
  trained = features.FeatureStore(config.data.visual_features)
  store = features.FeatureStore(out / "synthetic_clip" / analyze.FEATURES_DIR
                                / analyze._key(trained.info) / "visual")
  assert store.info["model_hash"] == trained.info["model_hash"]
  x = store.read("synthetic_clip")
  first_away = int(np.argmin(faces["found"][10:])) + 10
  np.testing.assert_array_equal(x[first_away:first_away + 5], np.repeat(x[first_away - 1:first_away], 5, 0))
  assert store.meta("synthetic_clip")["repaired_frames"] == CLIP.num_frames - sum(faces["found"])
  # The models' outputs are theirs on those features.
  data = {"root": str(out / "synthetic_clip" / analyze.TREE_DIR), "visual_features": str(store.root),
          "audio_features": str(store.root.parent / "audio")}
  _, fn, _ = predict.load(models["EXPR"], data=data)
  np.testing.assert_allclose(fn({"synthetic_clip": CLIP.num_frames})["synthetic_clip"],
                             result["outputs"]["EXPR"], atol=1e-6)


def test_a_rerun_reuses_faces_and_features(analysed, models):
  path, out, result, _ = analysed
  logs = []
  again = analyze.analyze(str(path), str(out), {"EXPR": models["EXPR"]}, log=logs.append)
  assert any("faces found earlier" in line for line in logs), logs
  assert any("1 of 1 videos already complete" in line for line in logs), logs
  np.testing.assert_array_equal(again["outputs"]["EXPR"], result["outputs"]["EXPR"])
  assert list(analyze.read_csv(again["csv"]))[-1] == "expr_Other"  # only the tasks given


def test_features_of_another_encoder_are_refused(analysed, models, tmp_path):
  path, out, _, _ = analysed
  trained = features.FeatureStore(predict._run_config(models["EXPR"]).data.visual_features)
  other = tmp_path / "store"
  other.mkdir()
  info = dict(trained.info, model_hash="0123456789abcdef")
  (other / features.STORE_FILE).write_text(json.dumps(info))
  with pytest.raises(ValueError, match="is not the one that made the features"):
    analyze._visual(features.FeatureStore(other), str(out / "synthetic_clip" / analyze.TREE_DIR),
                    "synthetic_clip", CLIP.num_frames, str(tmp_path / "work"), None, 64, print)
  assert not list((tmp_path / "work" / analyze.FEATURES_DIR).rglob("*.npy"))  # nothing kept


def test_a_silent_video_for_an_audio_model_and_a_faceless_video_are_clear_errors(analysed, models, tmp_path):
  frames, _, _, _ = clip.render_frames(clip.ClipConfig(num_frames=20, seed=2))
  silent = tmp_path / "silent.mp4"
  clip.encode_mp4(silent, frames, 30.0)
  with pytest.raises(ValueError, match="silent.mp4 has no audio track, and the VA model"):
    analyze.analyze(str(silent), str(tmp_path / "out"), {"VA": models["VA"]})
  out = analyze.analyze(str(silent), str(tmp_path / "out"), {"AU": models["AU"]})
  assert out["outputs"]["AU"].shape == (20, 12)
  blank = tmp_path / "blank.mp4"
  clip.encode_mp4(blank, np.full((10, 64, 64, 3), 128, np.uint8), 30.0)
  with pytest.raises(ValueError, match="blank.mp4: no face found in any of its 10 frames"):
    analyze.analyze(str(blank), str(tmp_path / "out"), {"AU": models["AU"]})
  with pytest.raises(ValueError, match="unknown task 'VAD'; expected one of"):
    analyze.analyze(str(blank), str(tmp_path / "out"), {"VAD": models["VA"]})
  with pytest.raises(FileNotFoundError, match="nothere.mp4: no such video file"):
    analyze.analyze(str(tmp_path / "nothere.mp4"), str(tmp_path / "out"), {"AU": models["AU"]})
  shutil.rmtree(tmp_path / "out")


def test_the_launcher_lists_its_flags():
  import subprocess
  import sys
  from pathlib import Path
  repo = Path(__file__).resolve().parents[2]
  out = subprocess.run([sys.executable, str(repo / "launch" / "analyze_video.py"), "--help"],
                       cwd=repo, env={**os.environ, "PYTHONPATH": str(repo)}, capture_output=True,
                       text=True).stdout  # absl ends --help with status 1
  for flag in ("--video", "--out_dir", "--va", "--encoder", "--crop_scale", "--max_gap", "--[no]align"):
    assert flag in out, flag
