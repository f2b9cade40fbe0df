"""The Aff-Wild2 reader on small hand-written trees (independent of the synthetic writer)."""

import re

import numpy as np
import pytest

from affect_jax.data import affwild2 as aw

VA_HEADER = "valence,arousal"
EXPR_HEADER = "Neutral,Anger,Disgust,Fear,Happiness,Sadness,Surprise,Other"
AU_HEADER = "AU1,AU2,AU4,AU6,AU7,AU10,AU12,AU15,AU23,AU24,AU25,AU26"


def _write(path, text):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(text)
  return path


def _frames(root, video, indices):
  d = root / "cropped_aligned" / video
  d.mkdir(parents=True, exist_ok=True)
  for i in indices:
    (d / f"{i:05d}.jpg").write_bytes(b"")


@pytest.fixture
def tree(tmp_path):
  root = tmp_path / "aw"
  # vid1: 5 frames, frame 1 and 4 have no image.
  _frames(root, "vid1", [2, 3, 5])
  _frames(root, "10-60-1280x720_left", [1, 2, 3])
  _frames(root, "10-60-1280x720_right", [1, 2, 3])
  _frames(root, "solo", [1, 2])
  _write(root / "VA_Estimation_Challenge/Train_Set/vid1.txt",
         f"{VA_HEADER}\n0.5,-0.25\n-5,-5\n1,-1\n0.1,0.2\n-5,0.3\n")
  _write(root / "VA_Estimation_Challenge/Validation_Set/solo.txt", f"{VA_HEADER}\n0,0\n0.1,0.1\n")
  # Older expression folder name.
  _write(root / "EXPR_Classification_Challenge/Train_Set/vid1.txt",
         f"{EXPR_HEADER}\n0\n7\n-1\n3\n4\n\n")
  _write(root / "AU_Detection_Challenge/Train_Set/10-60-1280x720_left.txt",
         f"{AU_HEADER}\n" + "\n".join([",".join(["0"] * 12), ",".join(["1"] * 12),
                                       ",".join(["-1"] * 12)]) + "\n")
  return root


def test_parse_each_task(tree):
  va = aw.parse_annotation(tree / "VA_Estimation_Challenge/Train_Set/vid1.txt", "VA")
  assert va.dtype == np.float32 and va.shape == (5, 2)
  np.testing.assert_allclose(va[0], [0.5, -0.25])
  # -5 in either dimension makes the frame invalid.
  assert aw.valid_frames("VA", va).tolist() == [True, False, True, True, False]
  ex = aw.parse_annotation(tree / "EXPR_Classification_Challenge/Train_Set/vid1.txt", "EXPR")
  assert ex.tolist() == [0, 7, -1, 3, 4]
  assert aw.valid_frames("EXPR", ex).tolist() == [True, True, False, True, True]
  au = aw.parse_annotation(tree / "AU_Detection_Challenge/Train_Set/10-60-1280x720_left.txt", "AU")
  assert au.shape == (3, 12)
  assert aw.valid_frames("AU", au).tolist() == [True, True, False]


def test_both_expression_folder_names(tree):
  assert aw.task_dir(tree, "EXPR").name == "EXPR_Classification_Challenge"
  (tree / "EXPR_Recognition_Challenge").mkdir()
  assert aw.task_dir(tree, "EXPR").name == "EXPR_Recognition_Challenge"


def test_video_labels_and_missing_images(tree):
  v = aw.load_video(tree, "VA", aw.TRAIN_SET, "vid1")
  assert v.num_frames == 5
  assert v.has_image.tolist() == [False, True, True, False, True]
  # Frame 1 (no image, start) takes the next image, frame 4 the previous one.
  assert aw.nearest_image(v.has_image).tolist() == [1, 1, 2, 2, 4]
  assert v.valid.sum() == 3


def test_nearest_image_against_loop():
  rng = np.random.default_rng(0)
  for _ in range(50):
    has = rng.random(rng.integers(1, 40)) < 0.6
    if not has.any():
      has[rng.integers(has.size)] = True
    want = []
    for t in range(has.size):
      prev = [s for s in range(t, -1, -1) if has[s]]
      want.append(prev[0] if prev else int(np.flatnonzero(has)[0]))
    assert aw.nearest_image(has).tolist() == want


def test_list_and_summary(tree):
  assert aw.list_videos(tree, "VA", aw.TRAIN_SET) == ["vid1"]
  assert aw.list_videos(tree, "VA", aw.VALIDATION_SET) == ["solo"]
  s = aw.summarize(tree)
  assert s["VA"][aw.TRAIN_SET] == {"videos": 1, "frames": 5, "valid": 3, "invalid": 2,
                                   "without_image": 2}
  assert s["AU"][aw.TRAIN_SET]["invalid"] == 1


def test_test_list(tree):
  _write(tree / "VA_Estimation_Challenge_test_set.txt", "10-60-1280x720_right\n\n")
  _write(tree / "test_labels/VA_Estimation_Challenge/10-60-1280x720_right.txt",
         f"{VA_HEADER}\n0,0\n0.5,0.5\n-5,-5\n")
  assert aw.list_videos(tree, "VA", aw.TEST_SET) == ["10-60-1280x720_right"]
  unlabelled = aw.load_video(tree, "VA", aw.TEST_SET, "10-60-1280x720_right")
  assert unlabelled.num_frames == 3 and not unlabelled.valid.any()
  labelled = aw.load_video(tree, "VA", aw.TEST_SET, "10-60-1280x720_right", with_test_labels=True)
  assert labelled.valid.tolist() == [True, True, False]


def test_source_video_and_audio(tree):
  assert aw.source_video("10-60-1280x720_left") == "10-60-1280x720"
  assert aw.source_video("vid1") == "vid1"
  assert aw.audio_path(tree, "10-60-1280x720_right").name == "10-60-1280x720.wav"


def test_folds_group_pairs_and_cover_everything():
  videos = [f"v{i}" for i in range(13)] + ["p_left", "p_right", "q_left", "q_right"]
  parts = aw.split_into_parts(videos, 4)
  flat = [v for p in parts for v in p]
  assert sorted(flat) == sorted(videos)  # a partition: every video exactly once
  for src in ("p", "q"):
    owners = {i for i, p in enumerate(parts) for v in p if aw.source_video(v) == src}
    assert len(owners) == 1
  assert aw.split_into_parts(videos, 4) == parts  # deterministic
  sizes = sorted(len(p) for p in parts)
  assert sizes[-1] - sizes[0] <= 2


def test_fold_videos(tmp_path):
  root = tmp_path / "aw"
  names = [f"t{i}" for i in range(8)] + ["s_left", "s_right"]
  for i, name in enumerate(names):
    _frames(root, name, [1])
    split = "Train_Set" if i < 6 else "Validation_Set"
    _write(root / f"VA_Estimation_Challenge/{split}/{name}.txt", f"{VA_HEADER}\n0,0\n")
  f0 = aw.fold_videos(root, "VA", 0)
  assert f0["train"] == names[:6] and f0["val"] == sorted(names[6:])
  vals = []
  for k in range(1, 5):
    f = aw.fold_videos(root, "VA", k)
    assert not set(f["train"]) & set(f["val"])
    assert sorted(f["train"] + f["val"]) == sorted(names)
    vals += f["val"]
  assert sorted(vals) == sorted(names)  # each video validated in exactly one extra fold
  with pytest.raises(ValueError, match="fold must be in 0..4"):
    aw.fold_videos(root, "VA", 5)


def test_write_annotation_round_trip(tmp_path):
  rng = np.random.default_rng(1)
  va = np.round(rng.uniform(-1, 1, (20, 2)), 3).astype(np.float32)
  va[3] = -5
  aw.write_annotation(tmp_path / "va.txt", "VA", va)
  np.testing.assert_allclose(aw.parse_annotation(tmp_path / "va.txt", "VA"), va, atol=1e-6)
  au = rng.integers(0, 2, (7, 12))
  au[2] = -1
  aw.write_annotation(tmp_path / "au.txt", "AU", au)
  np.testing.assert_array_equal(aw.parse_annotation(tmp_path / "au.txt", "AU"), au)


# ---- Malformed annotations: every error names the file and the line ----

BAD = [
    ("VA", f"{VA_HEADER}\n0.1,0.2\n0.3\n", 3, "expected 2 comma-separated"),
    ("AU", f"{AU_HEADER}\n" + ",".join(["0"] * 11) + "\n", 2, "expected 12 comma-separated"),
    ("EXPR", f"{EXPR_HEADER}\n1\n2,3\n", 3, "expected 1 comma-separated"),
    ("VA", f"{VA_HEADER}\n0.1,0.2\n0.1,abc\n", 3, "non-numeric"),
    ("EXPR", f"{EXPR_HEADER}\n1\nsad\n", 3, "non-numeric"),
    ("VA", f"{VA_HEADER}\n0.1,0.2\n1.5,0\n", 3, r"\[-1, 1\]"),
    ("VA", f"{VA_HEADER}\n-4,0\n", 2, r"\[-1, 1\]"),
    ("EXPR", f"{EXPR_HEADER}\n1\n8\n", 3, "integer in -1..7"),
    ("EXPR", f"{EXPR_HEADER}\n1.5\n", 2, "integer in -1..7"),
    ("AU", f"{AU_HEADER}\n" + ",".join(["0"] * 11 + ["2"]) + "\n", 2, "0, 1 or -1"),
    ("VA", "", 1, "empty file"),
    ("AU", "\n\n", 1, "empty file"),
    ("VA", "0.1,0.2\n0.3,0.4\n", 1, "missing header"),
    ("EXPR", "3\n4\n", 1, "missing header"),
    ("VA", f"{AU_HEADER}\n0,0\n", 1, "unexpected header"),
    ("VA", f"{VA_HEADER}\n", 2, "no frame lines"),
    ("VA", f"{VA_HEADER}\n0.1,nan\n", 2, "non-finite"),
]


@pytest.mark.parametrize("task,text,line,what", BAD)
def test_malformed_annotation_names_file_and_line(tmp_path, task, text, line, what):
  path = _write(tmp_path / "bad video.txt", text)
  with pytest.raises(aw.AnnotationError, match=what) as err:
    aw.parse_annotation(path, task)
  assert str(err.value).startswith(f"{path}:{line}: ")
  assert err.value.line == line


def test_annotation_without_frames_folder(tree):
  path = _write(tree / "VA_Estimation_Challenge/Train_Set/ghost.txt", f"{VA_HEADER}\n0,0\n")
  with pytest.raises(aw.AnnotationError, match=re.escape(str(path)) + ".*no frames folder"):
    aw.load_video(tree, "VA", aw.TRAIN_SET, "ghost")
  with pytest.raises(aw.AnnotationError, match="ghost"):
    aw.load_split(tree, "VA", aw.TRAIN_SET)


def test_unknown_task_and_split(tree):
  with pytest.raises(ValueError, match="unknown task"):
    aw.parse_annotation(tree / "x.txt", "Valence")
  with pytest.raises(ValueError, match="unknown split"):
    aw.list_videos(tree, "VA", "Train")
  with pytest.raises(FileNotFoundError, match="no annotation folder for task AU"):
    aw.task_dir(tree / "nowhere", "AU")


# ---- The reader on the synthetic dataset: counts agree with what the generator reported ----


def test_reads_synthetic_dataset_with_generator_counts(synthetic_root):
  import json
  manifest = json.loads((synthetic_root / "synthetic_manifest.json").read_text())
  summary = aw.summarize(synthetic_root, with_test_labels=True)
  for task in aw.TASKS:
    for split in (*aw.SPLITS, aw.TEST_SET):
      want = manifest["totals"][task][split]
      got = summary[task][split]
      assert {k: got[k] for k in ("videos", "frames", "valid", "invalid")} == {
          k: want[k] for k in ("videos", "frames", "valid", "invalid")}, (task, split)
      for v in aw.load_split(synthetic_root, task, split, with_test_labels=True):
        entry = manifest["videos"][v.video]
        assert entry["tasks"][task] == {"split": split, "valid": int(v.valid.sum()),
                                        "invalid": int((~v.valid).sum())}
        assert v.num_frames == entry["num_frames"]
        assert np.flatnonzero(~v.has_image).tolist() == [k - 1 for k in entry["missing_frames"]]


def test_synthetic_folds_keep_pairs_together(synthetic_root):
  pooled = aw.fold_videos(synthetic_root, "VA", 0)
  assert any(v.endswith("_left") for v in pooled["train"] + pooled["val"])
  for k in range(1, 5):
    f = aw.fold_videos(synthetic_root, "VA", k)
    train_sources = {aw.source_video(v) for v in f["train"]}
    assert not train_sources & {aw.source_video(v) for v in f["val"]}


def test_prediction_files_round_trip_and_errors(tmp_path):
  rng = np.random.default_rng(0)
  preds = {"a": np.round(rng.uniform(-1, 1, (4, 2)), 4), "b_left": np.round(rng.uniform(-1, 1, (2, 2)), 4)}
  aw.write_predictions(tmp_path / "va.csv", "VA", preds)
  lines = (tmp_path / "va.csv").read_text().splitlines()
  assert lines[0] == "image_location,valence,arousal" and lines[1].startswith("a/00001.jpg,")
  back = aw.parse_predictions(tmp_path / "va.csv", "VA")
  for k in preds:
    np.testing.assert_allclose(back[k], preds[k], atol=1e-6)
  au = {"v": rng.integers(0, 2, (3, 12))}
  aw.write_predictions(tmp_path / "au.csv", "AU", au)
  np.testing.assert_array_equal(aw.parse_predictions(tmp_path / "au.csv", "AU")["v"], au["v"])
  ex = {"v": np.array([0, 7, 3])}
  aw.write_predictions(tmp_path / "ex.csv", "EXPR", ex)
  assert (tmp_path / "ex.csv").read_text().splitlines()[0] == (
      "image_location,Neutral,Anger,Disgust,Fear,Happiness,Sadness,Surprise,Other")
  np.testing.assert_array_equal(aw.parse_predictions(tmp_path / "ex.csv", "EXPR")["v"], ex["v"])
  bad = tmp_path / "bad.csv"
  bad.write_text("image_location,valence,arousal\nv/00001.jpg,0.1,0.2\nv/00003.jpg,0.1,0.2\n")
  with pytest.raises(aw.AnnotationError, match=re.escape(f"{bad}:3: ") + ".*out of order"):
    aw.parse_predictions(bad, "VA")
  bad.write_text("image_location,valence,arousal\nv/00001.jpg,0.1\n")
  with pytest.raises(aw.AnnotationError, match=re.escape(f"{bad}:2: ")):
    aw.parse_predictions(bad, "VA")
  bad.write_text("frame,valence,arousal\n")
  with pytest.raises(aw.AnnotationError, match="expected header"):
    aw.parse_predictions(bad, "VA")


def test_image_mask_marks_the_frames_with_an_image(tmp_path):
  frames = tmp_path / aw.FRAMES_DIR / "v1"
  frames.mkdir(parents=True)
  for k in (1, 3, 7):  # 7 lies past the 5 annotated frames: ignored
    (frames / aw.frame_name(k)).write_bytes(b"")
  (frames / "notes.txt").write_text("not a frame")
  np.testing.assert_array_equal(aw.image_mask(tmp_path, "v1", 5), [True, False, True, False, False])


def test_annotation_with_a_utf8_bom_parses(tmp_path):
  path = tmp_path / "v.txt"
  path.write_bytes("\ufeffvalence,arousal\n0.5,-0.25\n-5,-5\n".encode("utf-8"))
  np.testing.assert_array_equal(aw.parse_annotation(path, "VA"), [[0.5, -0.25], [-5, -5]])


def test_no_image_at_all_names_the_frames_folder():
  with pytest.raises(ValueError, match=r"/data/cropped_aligned/v1: no frame image at all .*00001.jpg \.\.\. 00003.jpg"):
    aw.nearest_image(np.zeros(3, bool), "/data/cropped_aligned/v1")


def _va_video(root, rows, images, split="Train_Set", video="clip"):
  _frames(root, video, images)
  return _write(root / f"VA_Estimation_Challenge/{split}/{video}.txt",
                VA_HEADER + "\n" + "0.1,0.2\n" * rows)


@pytest.mark.parametrize("rows,images,fragment", [
    (50, 30, "50 label rows, but the last 20 label row(s) have no image and reuse frame 00030.jpg"),
    (20, 30, "20 label rows, but 10 image(s) in"),
])
def test_labels_that_do_not_match_the_frames_are_refused(tmp_path, rows, images, fragment):
  ann = _va_video(tmp_path, rows, range(1, images + 1))
  with pytest.raises(aw.AnnotationError, match=re.escape(fragment)) as e:
    aw.load_video(tmp_path, "VA", aw.TRAIN_SET, "clip")
  assert str(e.value).startswith(str(ann)) and "max_unmatched_frames" in str(e.value)
  # Every entry point that reads labels applies the same rule.
  with pytest.raises(aw.AnnotationError, match=re.escape(fragment)):
    aw.all_videos(tmp_path)
  # A user who knows better raises the tolerance.
  v = aw.load_video(tmp_path, "VA", aw.TRAIN_SET, "clip", max_unmatched=0.5)
  assert v.num_frames == rows and v.has_image.sum() == min(rows, images)


def test_a_few_unmatched_frames_warn_once(tmp_path, caplog):
  ann = _va_video(tmp_path, 21, range(1, 21))  # the last row has no image: 1 of 21 frames
  with caplog.at_level("WARNING"):
    for _ in range(3):
      assert aw.load_video(tmp_path, "VA", aw.TRAIN_SET, "clip").num_frames == 21
  warned = [r.getMessage() for r in caplog.records if str(ann) in r.getMessage()]
  assert len(warned) == 1 and "the last 1 label row(s) have no image" in warned[0]
  # No image at all is an error whatever the tolerance, naming the folder.
  with pytest.raises(aw.AnnotationError, match=re.escape(f"{tmp_path} holds no frame image for "
                                                         "its 5 label rows (expected 00001.jpg")):
    aw.check_frames(ann, tmp_path, 5, np.array([]), max_unmatched=1.0)
  # Gaps inside the video are ordinary (no face detected) and not counted.
  assert aw.check_frames(ann, tmp_path, 5, np.array([1, 3, 5])) == 0
