"""Video files: decoding (frames, audio on the video's clock), face detection on a real
photograph and on the synthetic subject, following one subject, square crops."""

import json

import numpy as np
import pytest

pytest.importorskip("av", reason="the video extra: pip install 'affect-jax[video]'")
pytest.importorskip("cv2", reason="the video extra: pip install 'affect-jax[video]'")

from affect_jax.data import video  # noqa: E402
from affect_jax.data.synthetic import clip  # noqa: E402

CLIP = clip.ClipConfig(num_frames=120, seed=2)  # away for 24 frames


@pytest.fixture(scope="module")
def synthetic_clip(tmp_path_factory):
  out = tmp_path_factory.mktemp("clip")
  path = clip.write_clip(out, CLIP)
  frames, boxes, affect, track = clip.render_frames(CLIP)
  return path, frames, boxes, track, json.loads((out / "synthetic_clip.json").read_text())


def test_decoding_gives_every_frame_and_the_audio_on_the_frame_clock(synthetic_clip):
  path, frames, _, track, truth = synthetic_clip
  info = video.probe(path)
  assert (info.fps, info.width, info.height, info.has_audio) == (30.0, 320, 240, True)
  decoded = list(video.frames(path))
  assert [k for k, _, _ in decoded] == list(range(CLIP.num_frames))
  np.testing.assert_allclose([t for _, t, _ in decoded], np.arange(CLIP.num_frames) / 30, atol=1e-3)
  # H.264 at crf 18: each frame close to the rendered one.
  err = np.mean([np.abs(rgb.astype(int) - f).mean() for (_, _, rgb), f in zip(decoded, frames)])
  assert err < 3.0, err
  samples = video.decode_audio(path, info)
  want = track.astype(np.float32) / 32768
  assert abs(len(samples) - len(want)) <= 1024
  # AAC is lossy and primes its encoder: the decoded track must line up with the written one.
  m = min(len(samples), len(want))
  lags = range(-64, 65)
  corr = [np.corrcoef(samples[64 + lag:m - 64 + lag], want[64:m - 64])[0, 1] for lag in lags]
  assert max(corr) > 0.9 and abs(lags[int(np.argmax(corr))]) <= 2, (max(corr), lags[int(np.argmax(corr))])
  assert len(truth["face_boxes"]) == CLIP.num_frames


def test_the_detector_follows_the_synthetic_subject_and_sees_them_leave(synthetic_clip):
  path, _, boxes, _, _ = synthetic_clip
  detector = video.FaceDetector()
  track = video.follow_subject([detector(rgb) for _, _, rgb in video.frames(path)])
  present = ~np.isnan(boxes[:, 0])
  assert (track.found == present).mean() >= 0.95
  assert not track.found[~present][2:-2].any()  # away: no face, not bridged over the absence
  assert track.detected.sum() >= 0.8 * present.sum()
  squares = video.crop_boxes(track.boxes)
  both = track.found & present
  assert np.median(video.iou(squares[both], boxes[both])) > 0.75


def _astronaut_clip(num_frames=24, size=(480, 360)):
  """The astronaut photograph scikit-image ships (a real face), moved across a blank frame."""
  data = pytest.importorskip("skimage.data", reason="scikit-image (the test extra)")
  photo = data.astronaut()[:220, 80:300]  # her head and shoulders
  frames, offsets = [], []
  for k in range(num_frames):
    x, y = round(10 + k * (size[0] - 240) / num_frames), round(80 + 50 * np.sin(k / 4))
    frame = np.full((size[1], size[0], 3), 235, np.uint8)
    frame[y:y + photo.shape[0], x:x + photo.shape[1]] = photo
    frames.append(frame)
    offsets.append((x, y))
  return np.stack(frames), np.array(offsets, float), photo


def test_a_real_face_is_found_in_every_frame_of_an_encoded_clip(tmp_path):
  frames, offsets, photo = _astronaut_clip()
  path = tmp_path / "astronaut.mp4"
  clip.encode_mp4(path, frames, 25.0)
  info = video.probe(path)
  assert info.fps == 25.0 and not info.has_audio and len(video.decode_audio(path, info)) == 0
  detector = video.FaceDetector()
  still = detector(photo)
  assert len(still) == 1  # her face, in the photograph itself
  found = [detector(rgb) for _, _, rgb in video.frames(path)]
  assert all(len(f) == 1 for f in found), [len(f) for f in found]
  want = still[0] + np.concatenate([offsets, np.zeros_like(offsets)], 1)
  assert video.iou(np.concatenate(found), want).min() > 0.7
  track = video.follow_subject(found)
  assert track.detected.all() and track.tracks == 1


def test_the_eyes_give_the_roll_and_the_crop_levels_it():
  import math
  cv2 = pytest.importorskip("cv2")
  data = pytest.importorskip("skimage.data", reason="scikit-image (the test extra)")
  photo = data.astronaut()
  detector, eyes = video.FaceDetector(), video.EyeFinder()
  box = detector(photo)[0]
  upright = eyes(photo, box)
  assert abs(math.degrees(upright)) < 5  # she holds her head nearly level
  centre = (float(box[0] + box[2] / 2), float(box[1] + box[3] / 2))
  square = video.crop_boxes(box[None], 1.3)[0]
  level = video.crop(photo, square, 96)
  for degrees in (-10, 10):
    # Turned clockwise on screen by `degrees`: the eye on the right drops, roll +degrees.
    turned = cv2.warpAffine(photo, cv2.getRotationMatrix2D(centre, -degrees, 1.0), (512, 512))
    found = detector(turned)
    roll = eyes(turned, found[np.argmax(video.iou(found, box))])
    assert abs(math.degrees(roll - upright) - degrees) < 3, (degrees, math.degrees(roll))
    back = video.crop(turned, square, 96, math.radians(degrees))
    plain = video.crop(turned, square, 96)
    err = lambda a: np.abs(a.astype(int) - level).mean()  # noqa: E731
    assert err(back) < 6 and err(back) < 0.5 * err(plain), (err(back), err(plain))


def test_rolls_fill_each_run_of_face_frames_and_never_cross_a_gap():
  nan = np.nan
  rolls = np.array([nan, 0.1, nan, 0.3, nan, 0.5, nan, nan, nan])
  found = np.array([1, 1, 1, 1, 1, 0, 1, 1, 0], bool)
  np.testing.assert_allclose(video.smooth_roll(rolls, found, window=1),
                             [0.1, 0.1, 0.2, 0.3, 0.3, nan, 0.0, 0.0, nan])
  np.testing.assert_allclose(video.smooth_roll(rolls, found, window=3)[:5],
                             [0.1, 0.4 / 3, 0.2, 0.8 / 3, 0.3])


def _box(x, y, s):
  return np.array([[x, y, s, s]], np.float32)


def test_following_bridges_short_gaps_keeps_the_subject_through_absences_ignores_others():
  none = np.zeros((0, 4), np.float32)
  dets = []
  for t in range(60):
    d = []
    if t < 10 or 13 <= t < 25 or t >= 45:  # misses 10-12 (bridged), away 25-44
      d.append(_box(100 + t, 50, 80))
    if 5 <= t < 15:  # someone smaller passing by
      d.append(_box(250, 60, 30))
    if t == 30:  # one false detection while the subject is away
      d.append(_box(10, 10, 20))
    dets.append(np.concatenate(d) if d else none)
  track = video.follow_subject(dets, max_gap=5, smooth=1)
  # The subject's detection is the first of each frame's list (listed first above).
  np.testing.assert_array_equal(track.index, np.where(track.detected, 0, -1))
  found = np.zeros(60, bool)
  found[:25] = found[45:] = True
  np.testing.assert_array_equal(track.found, found)
  np.testing.assert_array_equal(track.detected, found & ~np.isin(np.arange(60), [10, 11, 12]))
  # Bridged frames interpolate between the last and next detection.
  np.testing.assert_allclose(track.boxes[11], [111, 50, 80, 80])
  np.testing.assert_allclose(track.boxes[50], [150, 50, 80, 80])
  assert track.tracks == 4
  # Smoothing averages within a run, never across the absence.
  smooth = video.follow_subject(dets, max_gap=5, smooth=5)
  np.testing.assert_allclose(smooth.boxes[24], np.mean([track.boxes[t] for t in (22, 23, 24)], 0))
  np.testing.assert_allclose(smooth.boxes[5], track.boxes[5])  # linear motion: unchanged
  assert np.isnan(smooth.boxes[25:45]).all()


def test_the_bigger_of_two_people_present_together_is_the_subject():
  dets = [np.concatenate([_box(10, 10, 40), _box(200, 20, 90)]) for _ in range(20)]
  track = video.follow_subject(dets, smooth=1)
  assert track.tracks == 2 and track.detected.all()
  np.testing.assert_allclose(track.boxes, np.repeat(_box(200, 20, 90), 20, 0))
  empty = video.follow_subject([np.zeros((0, 4))] * 5)
  assert not empty.found.any() and empty.tracks == 0


def test_iou_crop_boxes_and_crops_by_hand():
  np.testing.assert_allclose(video.iou([0, 0, 2, 2], [1, 1, 2, 2]), 1 / 7)
  np.testing.assert_allclose(video.crop_boxes(np.array([[10, 20, 40, 50]]), 1.2, 0.1),
                             [[0, 20, 60, 60]])
  rgb = np.arange(20 * 30 * 3, dtype=np.uint8).reshape(20, 30, 3)
  np.testing.assert_array_equal(video.crop(rgb, np.array([5, 4, 8, 8]), 8), rgb[4:12, 5:13])
  # Outside the frame is black.
  out = video.crop(rgb, np.array([-2, -3, 6, 6]), 6)
  assert (out[:3] == 0).all() and (out[:, :2] == 0).all()
  np.testing.assert_array_equal(out[3:, 2:], rgb[:3, :4])
  half = video.crop(np.repeat(np.repeat(rgb, 2, 0), 2, 1), np.array([10, 8, 16, 16]), 8)
  np.testing.assert_array_equal(half, rgb[4:12, 5:13])  # area averaging of 2x2 blocks


def test_unreadable_files_are_named(tmp_path):
  bad = tmp_path / "notavideo.mp4"
  bad.write_bytes(b"hello")
  with pytest.raises(ValueError, match="notavideo.mp4: not a readable video file"):
    video.probe(bad)
