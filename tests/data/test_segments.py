import itertools

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from affect_jax.data import affwild2, segments
from affect_jax.data.features import FeatureStore

SETTINGS = settings(max_examples=40, deadline=None)


# ---- segment_starts ----


def test_segment_starts_examples():
  assert segments.segment_starts(700, 300, 200).tolist() == [0, 200, 400]
  assert segments.segment_starts(300, 300, 200).tolist() == [0]
  assert segments.segment_starts(301, 300, 200).tolist() == [0, 1]
  assert segments.segment_starts(50, 300, 200).tolist() == [0]
  assert segments.segment_starts(1000, 300, 200).tolist() == [0, 200, 400, 600, 700]


def test_segment_starts_rejects_gaps_and_empty_videos():
  with pytest.raises(ValueError, match="stride .* > segment_len"):
    segments.segment_starts(1000, 100, 101)
  with pytest.raises(ValueError, match="num_frames"):
    segments.segment_starts(0, 300, 200)
  with pytest.raises(ValueError, match=">= 1"):
    segments.segment_starts(10, 0, 1)


@st.composite
def _video_and_windows(draw, max_len=1000):
  num_frames = draw(st.integers(1, 10_000))
  segment_len = draw(st.integers(1, max_len))
  stride = draw(st.integers(1, segment_len))
  return num_frames, segment_len, stride


@SETTINGS
@given(_video_and_windows())
def test_segment_starts_cover_every_frame_once_per_stride(args):
  num_frames, segment_len, stride = args
  starts = segments.segment_starts(num_frames, segment_len, stride)
  last = max(num_frames - segment_len, 0)
  assert starts[0] == 0 and starts[-1] == last
  assert np.all(np.diff(starts) > 0) and np.all(np.diff(starts) <= stride)
  # Only the end-aligned window may come early; all others are exactly `stride` apart.
  assert np.all(np.diff(starts)[:-1] == stride)
  covered = np.zeros(num_frames, bool)
  for s in starts:
    covered[s:s + segment_len] = True
  assert covered.all()


# ---- cut + merge ----


def test_cut_pads_short_videos_at_the_end():
  x = np.arange(10, dtype=np.float32).reshape(5, 2)
  windows, mask = segments.cut(x, [0], 8, pad_value=-5)
  assert windows.shape == (1, 8, 2) and mask.dtype == np.float32
  np.testing.assert_array_equal(windows[0, :5], x)
  assert (windows[0, 5:] == -5).all()
  np.testing.assert_array_equal(mask[0], [1, 1, 1, 1, 1, 0, 0, 0])
  with pytest.raises(ValueError, match="starts must lie"):
    segments.cut(x, [5], 8)


def _brute_force_merge(preds, starts, num_frames, weights, mask):
  """Per-frame Python loop: weighted mean over the windows covering each frame."""
  out = np.full((num_frames, preds.shape[-1]), np.nan)
  for t in range(num_frames):
    num, den = 0.0, 0.0
    for i, s in enumerate(starts):
      p = t - s
      if 0 <= p < preds.shape[1] and mask[i, p] > 0:
        num = num + weights[p] * preds[i, p].astype(np.float64)
        den += weights[p]
    if den > 0:
      out[t] = num / den
  return out


@SETTINGS
@given(_video_and_windows(max_len=400), st.integers(1, 3), st.sampled_from(segments.WEIGHTINGS),
       st.integers(0, 2**32 - 1))
def test_merge_of_cut_is_identity(args, channels, weighting, seed):
  num_frames, segment_len, stride = args
  x = np.random.default_rng(seed).normal(size=(num_frames, channels)).astype(np.float32)
  starts = segments.segment_starts(num_frames, segment_len, stride)
  windows, mask = segments.cut(x, starts, segment_len, pad_value=np.nan)
  merged = segments.merge(windows, starts, num_frames, weighting=weighting, mask=mask)
  assert merged.dtype == np.float32
  np.testing.assert_array_equal(merged, x)


@pytest.mark.parametrize("weighting", segments.WEIGHTINGS)
def test_merge_matches_brute_force(weighting):
  rng = np.random.default_rng(0)
  for num_frames, segment_len, stride in [(37, 10, 4), (25, 10, 10), (7, 10, 3), (60, 9, 1)]:
    starts = segments.segment_starts(num_frames, segment_len, stride)
    preds = rng.uniform(size=(len(starts), segment_len, 3)).astype(np.float32)
    frame_mask = segments.cut(np.zeros(num_frames), starts, segment_len)[1]
    mask = frame_mask * (rng.uniform(size=preds.shape[:2]) > 0.2)
    weights = segments.window_weights(segment_len, weighting)
    want = _brute_force_merge(preds, starts, num_frames, weights, mask)
    if np.isnan(want).any():  # some frame left without an unmasked window
      with pytest.raises(ValueError, match="covered by no"):
        segments.merge(preds, starts, num_frames, weighting=weighting, mask=mask)
      continue
    got = segments.merge(preds, starts, num_frames, weighting=weighting, mask=mask)
    np.testing.assert_allclose(got, want, rtol=1e-6)


@pytest.mark.parametrize("weighting", segments.WEIGHTINGS)
def test_merge_ignores_padding_whatever_it_holds(weighting):
  rng = np.random.default_rng(1)
  x = rng.uniform(size=(50, 8)).astype(np.float32)
  starts = segments.segment_starts(50, 64, 32)
  windows, _ = segments.cut(x, starts, 64)  # one window, 14 positions past the end
  for pad in (1e30, np.inf, np.nan):
    windows[:, 50:] = pad
    np.testing.assert_array_equal(segments.merge(windows, starts, 50, weighting=weighting), x)
  # Masked positions inside the video are ignored too: frames 10..14 then come from window 0 only.
  starts = np.array([0, 10])
  windows = rng.uniform(size=(2, 20, 1))
  mask = np.ones((2, 20))
  mask[1, :5] = 0
  windows[1, :5] = np.nan
  merged = segments.merge(windows, starts, 30, weighting=weighting, mask=mask)
  np.testing.assert_array_equal(merged[:15], windows[0, :15].astype(np.float32))
  np.testing.assert_array_equal(merged[20:], windows[1, 10:].astype(np.float32))
  assert np.isfinite(merged).all()


def test_merge_keeps_trailing_shape_and_checks_inputs():
  starts = segments.segment_starts(12, 6, 3)
  preds = np.ones((len(starts), 6))  # [N, L]: no channel axis
  assert segments.merge(preds, starts, 12).shape == (12,)
  with pytest.raises(ValueError, match="one window per start"):
    segments.merge(preds[:-1], starts, 12)
  with pytest.raises(ValueError, match="mask"):
    segments.merge(preds, starts, 12, mask=np.ones((len(starts), 5)))
  with pytest.raises(ValueError, match="covered by no"):
    segments.merge(preds[:1], starts[:1], 12)
  with pytest.raises(ValueError, match="weighting"):
    segments.merge(preds, starts, 12, weighting="hann")


def test_triangular_weights_peak_at_the_centre_and_stay_positive():
  for length in (1, 2, 7, 300):
    w = segments.window_weights(length, "triangular")
    assert (w > 0).all() and np.array_equal(w, w[::-1])
    assert w.argmax() == (length - 1) // 2 and w[0] == w.min()


# ---- Training records, SegmentSource, segment_dataset ----

SEGMENT_LEN, STRIDE = 8, 6
# long: windows at 0, 6, 12, 15; mid: 0, 3; short (padded): 0.
NUM_FRAMES = {"long": 23, "mid": 11, "short": 5}
VIDEO_CODE = {"long": 1, "mid": 2, "short": 3}


def _features(video, dim, frames=None):
  """[T, dim] whose row t reads (code*100 + t, ..., + d): every value names its frame."""
  t = np.arange(NUM_FRAMES[video] if frames is None else frames)[:, None]
  return (VIDEO_CODE[video] * 100 + t + np.arange(dim)).astype(np.float32)


def _labels(task, video):
  """Known labels with a few invalid frames (every 4th), in the task's format."""
  t = np.arange(NUM_FRAMES[video])
  bad = t % 4 == 3
  if task == "VA":
    y = np.stack([np.sin(t), np.cos(t)], -1).astype(np.float32) * 0.9
    y[bad, 1] = affwild2.INVALID_VA  # one dimension invalid is enough
  elif task == "EXPR":
    y = (t % 8).astype(np.int32)
    y[bad] = affwild2.INVALID_EXPR
  else:
    y = ((t[:, None] + np.arange(12)) % 2).astype(np.int32)
    y[bad, 5] = affwild2.INVALID_AU
  return y


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
  root = tmp_path_factory.mktemp("segment_stores")
  visual = FeatureStore.create(root / "visual", kind="visual", dim=4, dtype="float32",
                               model_hash="v")
  audio = FeatureStore.create(root / "audio", kind="audio", dim=2, dtype="float16",
                              model_hash="a")
  for video in NUM_FRAMES:
    visual.write(video, _features(video, 4))
    audio.write(video, _features(video, 2))
  return {"visual": visual, "audio": audio}


def _source(stores, task="VA", modalities=("visual", "audio")):
  labels = {v: _labels(task, v) for v in NUM_FRAMES}
  return segments.SegmentSource({m: stores[m] for m in modalities}, labels, task,
                                segment_len=SEGMENT_LEN, stride=STRIDE)


def test_make_segments_accepts_dicts_dataclasses_and_video_labels():
  want = [("a", 0), ("a", 6), ("a", 12), ("a", 15), ("b", 0)]
  videos = [{"name": "a", "num_frames": 23}, segments.Video("b", 5)]
  assert segments.make_segments(videos, 8, 6) == want
  labels = affwild2.VideoLabels("a", "EXPR", affwild2.TRAIN_SET, np.zeros(23, np.int32),
                                np.ones(23, bool), None)
  assert segments.make_segments([labels], 8, 6) == want[:4]
  with pytest.raises(ValueError, match="num_frames"):
    segments.make_segments([{"name": "a"}], 8, 6)


@pytest.mark.parametrize("task", affwild2.TASKS)
def test_source_elements_hold_their_frames_and_masks(stores, task):
  source = _source(stores, task)
  assert source.videos == sorted(NUM_FRAMES)
  assert len(source) == 4 + 2 + 1
  videos = [segments.Video(v, n) for v, n in NUM_FRAMES.items()]
  assert sorted(source.segments) == sorted(segments.make_segments(videos, SEGMENT_LEN, STRIDE))
  for i in range(len(source)):
    el = source[i]
    video, start = source.segments[i]
    assert source.videos[el["video_index"]] == video and el["start"] == start
    assert el["video_index"].dtype == np.int32 and el["start"].dtype == np.int32
    real = min(SEGMENT_LEN, NUM_FRAMES[video] - start)
    frames = np.arange(start, start + real)
    for name, dim in (("visual", 4), ("audio", 2)):
      assert el[name].dtype == np.float32 and el[name].shape == (SEGMENT_LEN, dim)
      np.testing.assert_array_equal(el[name][:real], _features(video, dim)[frames])
      assert (el[name][real:] == 0).all()
    np.testing.assert_array_equal(el["frame_mask"], np.arange(SEGMENT_LEN) < real)
    labels = _labels(task, video)
    assert el["label"].dtype == labels.dtype
    assert el["label"].shape == (SEGMENT_LEN, *labels.shape[1:])
    np.testing.assert_array_equal(el["label"][:real], labels[frames])
    # Padded frames carry the invalid marker, and neither they nor invalid labels reach the loss.
    assert not affwild2.valid_frames(task, el["label"][real:]).any()
    want_mask = np.zeros(SEGMENT_LEN)
    want_mask[:real] = frames % 4 != 3
    np.testing.assert_array_equal(el["label_mask"], want_mask)
    assert el["frame_mask"].dtype == el["label_mask"].dtype == np.float32


def test_short_video_is_padded_not_dropped(stores):
  source = _source(stores, "EXPR", modalities=("visual",))
  (i,) = [i for i, (v, _) in enumerate(source.segments) if v == "short"]
  el = source[i]
  assert set(el) == {"visual", "label", "frame_mask", "label_mask", "video_index", "start"}
  np.testing.assert_array_equal(el["frame_mask"], [1, 1, 1, 1, 1, 0, 0, 0])
  np.testing.assert_array_equal(el["label_mask"], [1, 1, 1, 0, 1, 0, 0, 0])
  np.testing.assert_array_equal(el["label"][5:], affwild2.INVALID_EXPR)


def test_source_checks_frame_counts_and_label_shapes(stores):
  labels = {v: _labels("AU", v) for v in NUM_FRAMES}
  labels["mid"] = labels["mid"][:-1]
  with pytest.raises(ValueError, match="mid: visual features have 11 frames"):
    segments.SegmentSource(stores, labels, "AU", segment_len=SEGMENT_LEN, stride=STRIDE)
  labels = {v: _labels("VA", v) for v in NUM_FRAMES}
  with pytest.raises(ValueError, match=r"expected \[T\]"):
    segments.SegmentSource(stores, labels, "EXPR")
  with pytest.raises(KeyError, match="missing"):
    segments.SegmentSource(stores, {"missing": np.zeros(4, np.int32)}, "EXPR")


def _keys(batches):
  """(video_index, start) of every element, in order."""
  return [(int(v), int(s)) for b in batches for v, s in zip(b["video_index"], b["start"])]


def test_dataset_batches_shuffles_and_covers_each_segment_once_per_epoch(stores):
  source = _source(stores, "AU")
  n = len(source)
  everything = {(source.video_index[v], s) for v, s in source.segments}

  def run(seed, shuffle=True, **kw):
    args = dict(batch_size=3, seed=seed, shuffle=shuffle, num_epochs=2, drop_remainder=False,
                shard_index=0, shard_count=1)
    return list(segments.segment_dataset(source, **{**args, **kw}))

  batches = run(seed=0)
  assert [len(b["start"]) for b in batches] == [3, 3, 3, 3, 2]
  b = batches[0]
  assert b["visual"].shape == (3, SEGMENT_LEN, 4) and b["audio"].shape == (3, SEGMENT_LEN, 2)
  assert b["label"].shape == (3, SEGMENT_LEN, 12) and b["label"].dtype == np.int32
  assert b["frame_mask"].shape == b["label_mask"].shape == (3, SEGMENT_LEN)
  keys = _keys(batches)
  first, second = keys[:n], keys[n:]
  assert set(first) == set(second) == everything and len(set(first)) == n
  assert first != second  # each epoch its own order
  assert _keys(run(seed=0)) == keys
  assert _keys(run(seed=1)) != keys
  assert _keys(run(seed=0, shuffle=False, num_epochs=1)) == [
      (source.video_index[v], s) for v, s in source.segments]
  assert len(run(seed=0, num_epochs=1, drop_remainder=True)) == n // 3


def test_dataset_shards_are_disjoint(stores):
  source = _source(stores, "VA")
  shards = [_keys(segments.segment_dataset(source, batch_size=2, seed=3, shuffle=True, num_epochs=1,
                                           drop_remainder=False, shard_index=k, shard_count=3))
            for k in range(3)]
  for a, b in itertools.combinations(shards, 2):
    assert not set(a) & set(b)
  assert sorted(sum(shards, [])) == sorted((source.video_index[v], s) for v, s in source.segments)


# ---- Inference windows ----


def test_predict_windows_round_trip_through_merge():
  features = {"visual": _features("long", 4).astype(np.float16), "audio": _features("long", 2)}
  inputs, frame_mask, starts = segments.predict_windows(features, SEGMENT_LEN, STRIDE)
  assert starts.tolist() == [0, 6, 12, 15]
  assert inputs["visual"].shape == (4, SEGMENT_LEN, 4) and inputs["visual"].dtype == np.float32
  assert inputs["audio"].shape == (4, SEGMENT_LEN, 2) and frame_mask.shape == (4, SEGMENT_LEN)
  for name, x in features.items():
    merged = segments.merge(inputs[name], starts, 23, weighting="triangular", mask=frame_mask)
    np.testing.assert_array_equal(merged, x.astype(np.float32))
  short = {"visual": _features("short", 4)}
  inputs, frame_mask, starts = segments.predict_windows(short, SEGMENT_LEN, STRIDE)
  assert starts.tolist() == [0] and frame_mask.sum() == 5 and (inputs["visual"][0, 5:] == 0).all()
  with pytest.raises(ValueError, match="common length"):
    segments.predict_windows({"visual": np.zeros((5, 2)), "audio": np.zeros((6, 2))}, 8, 6)


def test_source_pickles_without_open_memory_maps(tmp_path):
  import pickle
  store = FeatureStore.create(tmp_path / "v", kind="visual", dim=3, dtype="float32", model_hash="h")
  store.write("a", np.arange(30, dtype=np.float32).reshape(10, 3))
  src = segments.SegmentSource({"visual": store}, {"a": np.zeros(10, np.int32)}, "EXPR",
                               segment_len=4, stride=2)
  first = src[1]["visual"]
  clone = pickle.loads(pickle.dumps(src))
  assert clone._open == {}
  np.testing.assert_array_equal(clone[1]["visual"], first)
