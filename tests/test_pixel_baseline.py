import shutil

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression, Ridge

from affect_jax import pixel_baseline


def test_ridge_matches_sklearn():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(200, 10))
  y = x @ rng.normal(size=(10, 2)) + 3.0 + 0.1 * rng.normal(size=(200, 2))
  w, b = pixel_baseline.fit_ridge(x, y, l2=5.0)
  ref = Ridge(alpha=5.0).fit(x, y)
  np.testing.assert_allclose(w, ref.coef_.T, rtol=1e-6, atol=1e-8)
  np.testing.assert_allclose(b, ref.intercept_, rtol=1e-6)


def test_logistic_agrees_with_sklearn_and_ignores_masked_rows():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(300, 5)).astype(np.float32)
  y = np.argmax(x[:, :3] + 0.3 * rng.normal(size=(300, 3)), axis=1)
  mask = np.ones(300, np.float32)
  mask[:40] = 0
  y_noisy = y.copy()
  y_noisy[:40] = 2  # garbage labels on masked rows must not matter
  w, b = pixel_baseline.fit_logistic(x, y_noisy, mask, multiclass=True, num_outputs=3,
                                     l2=1e-4, steps=500)
  ref = LogisticRegression(C=1e3, max_iter=2000).fit(x[40:], y[40:])
  agree = np.mean(np.argmax(x @ w + b, -1) == ref.predict(x))
  assert agree > 0.97


def test_evaluate_picks_l2_on_validation_and_scores_that_model_on_test(synthetic_root, tmp_path):
  from affect_jax import metrics
  from affect_jax.data import affwild2 as aw
  out = pixel_baseline.evaluate(synthetic_root, aw.VALIDATION_SET, size=6, tasks=("VA",),
                                report_split=aw.TEST_SET, bootstrap_samples=200,
                                others={"again": (str(synthetic_root), aw.TEST_SET)},
                                predictions_dir=str(tmp_path))["VA"]
  assert out["l2"] in pixel_baseline.RIDGE_L2

  lengths = {}

  def arrays(split):  # an independent read of the pixels and labels, valid frames only
    xs, ys = [], []
    for v in aw.load_split(synthetic_root, "VA", split, with_test_labels=True):
      xs.append(pixel_baseline.frame_pixels(synthetic_root, v.video, v.num_frames, v.has_image, 6))
      ys.append(v.labels)
    lengths[split] = [len(y) for y in ys]
    return np.concatenate(xs), np.concatenate(ys)

  (x_tr, y_tr), (x_va, y_va), (x_te, y_te) = map(arrays, (aw.TRAIN_SET, aw.VALIDATION_SET,
                                                           aw.TEST_SET))
  mu, sd = x_tr.mean(0), x_tr.std(0) + 1e-3
  ok = aw.valid_frames("VA", y_tr)
  val_scores = {}
  for l2 in pixel_baseline.RIDGE_L2:
    ref = Ridge(alpha=l2).fit(((x_tr - mu) / sd)[ok], y_tr[ok])
    val = metrics.va_scores(np.clip(ref.predict((x_va - mu) / sd), -1, 1), y_va)
    test = metrics.va_scores(np.clip(ref.predict((x_te - mu) / sd), -1, 1), y_te)
    val_scores[l2] = (val["mean"], test["mean"])
  best = max(val_scores, key=lambda k: val_scores[k][0])
  assert out["l2"] == best
  np.testing.assert_allclose(out["mean"], val_scores[best][0], atol=1e-4)
  np.testing.assert_allclose(out[aw.TEST_SET]["mean"], val_scores[best][1], atol=1e-4)
  # The intervals resample whole videos of the chosen model's predictions.
  ref = Ridge(alpha=best).fit(((x_tr - mu) / sd)[ok], y_tr[ok])
  for split, x, y in ((aw.VALIDATION_SET, x_va, y_va), (aw.TEST_SET, x_te, y_te)):
    cuts = np.cumsum(lengths[split])[:-1]
    pred = np.clip(ref.predict((x - mu) / sd), -1, 1)
    want = metrics.video_bootstrap(lambda p, l: metrics.va_scores(p, l)["mean"],
                                   np.split(pred, cuts), np.split(y, cuts), num_samples=200)
    np.testing.assert_allclose(out["intervals"][split], want, atol=1e-4)
    # The per-video predictions written for paired comparisons are that model's.
    with np.load(tmp_path / f"VA_{split}.npz") as z:
      videos = [v.video for v in aw.load_split(synthetic_root, "VA", split, True)]  # pred's order
      assert sorted(z.files) == sorted(videos)
      np.testing.assert_allclose(np.concatenate([z[v] for v in videos]), pred, atol=1e-4)
  assert out["intervals"]["metric"] == "mean" and out["intervals"]["samples"] == 200
  # `others`: another (root, split) scored by the same chosen model, under its own key.
  assert out["again"] == out[aw.TEST_SET]
  assert out["intervals"]["again"] == out["intervals"][aw.TEST_SET]


def test_feature_store_holds_every_frame_of_every_video(synthetic_root, tmp_path):
  from PIL import Image

  from affect_jax.data import affwild2 as aw
  from affect_jax.data import features
  path = pixel_baseline.write_feature_store(synthetic_root, tmp_path, size=4)
  store = features.FeatureStore(path)
  videos = aw.all_videos(str(synthetic_root))
  assert sorted(store.videos()) == sorted(videos) and store.dim == 4 * 4 * 3
  missing_checked = 0
  for video, n in videos.items():
    x = store.read(video)
    assert x.shape == (n, 48)
    have = set(aw.image_indices(synthetic_root, video).tolist())
    # Row t is frame t+1's image, box-averaged to 4x4 (read here straight from the PNG).
    with Image.open(synthetic_root / aw.FRAMES_DIR / video / aw.frame_name(min(have))) as im:
      rgb = np.asarray(im.convert("RGB"), np.float32) / 255.0
    h, w = rgb.shape[:2]
    want = rgb.reshape(4, h // 4, 4, w // 4, 3).mean((1, 3)).reshape(-1)
    # PIL rounds its box average to uint8 and the store keeps float16.
    np.testing.assert_allclose(x[min(have) - 1], want, atol=1 / 255 + 1e-3)
    # A frame without an image takes the previous imaged frame's row (the first one's before
    # any), as the authors repaired them.
    for t in range(n):
      if t + 1 not in have:
        before = [k for k in have if k < t + 1]
        np.testing.assert_array_equal(x[t], x[(max(before) if before else min(have)) - 1])
        missing_checked += 1
  assert missing_checked > 0  # the tiny synthetic set drops some images on purpose
  assert pixel_baseline.write_feature_store(synthetic_root, tmp_path, size=4) == path  # reopens


def test_unreadable_frames_are_named_and_repaired_like_missing_ones(synthetic_root, tmp_path,
                                                                    caplog):
  from affect_jax.data import affwild2 as aw
  from affect_jax.data import features
  root = shutil.copytree(synthetic_root, tmp_path / "data")
  video = aw.load_split(root, "VA", aw.TRAIN_SET)[0].video
  have = aw.image_indices(root, video)
  cut, empty = (root / aw.FRAMES_DIR / video / aw.frame_name(int(k)) for k in have[3:5])
  cut.write_bytes(cut.read_bytes()[:cut.stat().st_size // 2])
  empty.write_bytes(b"")
  n = aw.all_videos(str(root))[video]
  before = pixel_baseline.frame_pixels(synthetic_root, video, n, aw.image_mask(root, video, n), 4)
  with caplog.at_level("WARNING"):
    store = features.FeatureStore(pixel_baseline.write_feature_store(root, tmp_path, size=4))
  for path in (cut, empty):
    assert f"{path}: unreadable image (" in caplog.text
  assert "replace or delete the file" in caplog.text
  # Both frames take the previous readable frame's pixels, as extraction repairs them.
  x = store.read(video)
  np.testing.assert_array_equal(x[have[3] - 1], x[have[2] - 1])
  np.testing.assert_array_equal(x[have[4] - 1], x[have[2] - 1])
  np.testing.assert_allclose(x[have[5] - 1], before[have[5] - 1], atol=1e-3)
  assert store.meta(video)["repaired_frames"] == n - len(have) + 2
  assert pixel_baseline.evaluate(root, size=4, tasks=("VA",))["VA"]["l2"] in pixel_baseline.RIDGE_L2


def test_a_video_with_no_readable_frame_names_its_folder(synthetic_root, tmp_path):
  from affect_jax.data import affwild2 as aw
  root = shutil.copytree(synthetic_root, tmp_path / "data")
  video = aw.load_split(root, "VA", aw.TRAIN_SET)[0].video
  for f in (root / aw.FRAMES_DIR / video).iterdir():
    f.write_bytes(b"")
  n = aw.all_videos(str(root))[video]
  with pytest.raises(ValueError, match=f"{root / aw.FRAMES_DIR / video}: no readable frame image"):
    pixel_baseline.frame_pixels(root, video, n, aw.image_mask(root, video, n), 4)
