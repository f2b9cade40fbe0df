"""TFDS ArrayRecord datasets: built from the synthetic set and a face tree, read back equal to
the folder readers, through the same grain pipelines (batches, resume, shards, corrupt files)."""

import logging
import os

import numpy as np
import pytest
from PIL import Image

from affect_jax.data import affwild2, faces, loaders, tfds_builders
from affect_jax.train import finetune


@pytest.fixture(scope="module")
def frames(synthetic_root, tmp_path_factory):
  out = tfds_builders.build(tfds_builders.AFFWILD2_FRAMES, tmp_path_factory.mktemp("tfds"),
                            manual_dir=synthetic_root)
  return tfds_builders.FramesDataset(out)


@pytest.fixture(scope="module")
def face_tree(tmp_path_factory):
  """Two roots of flat-colour images (colour encodes root, video, frame) and one corrupt
  file; the same layout as test_loaders' image_root."""
  base = tmp_path_factory.mktemp("face_tree")
  roots = []
  for r in range(2):
    root = base / f"root{r}"
    for v in range(2):
      d = root / f"video{v}"
      d.mkdir(parents=True)
      for i in range(1, 7):
        colour = (r * 120 + v * 50, i * 35, 90)
        Image.fromarray(np.full((20, 28, 3), colour, np.uint8)).save(d / f"{i:05d}.jpg", quality=95)
    roots.append(root)
  (roots[1] / "video0" / "00007.png").write_bytes(b"not an image at all")
  return roots


def _file(root, video, frame0):
  return os.path.join(root, affwild2.FRAMES_DIR, video, affwild2.frame_name(frame0 + 1))


def test_frames_round_trip_every_frame_and_label(frames, synthetic_root):
  root = str(synthetic_root)
  videos = affwild2.all_videos(root)
  assert frames.videos() == videos
  assert frames.videos(with_test=False) == affwild2.all_videos(root, with_test=False)
  missing = 0
  for video, n in videos.items():
    has = affwild2.image_mask(root, video, n)
    np.testing.assert_array_equal(frames.has_image(video), has)
    missing += int((~has).sum())
    stand_in = affwild2.nearest_image(has)
    want = {task: affwild2.invalid_labels(task, n) for task in affwild2.TASKS}
    for task in affwild2.TASKS:
      for split in affwild2.SPLITS:
        if video in affwild2.list_videos(root, task, split):
          want[task] = affwild2.load_video(root, task, split, video).labels
    start = frames.start(video)
    for t in range(n):
      rec = frames.source[start + t]
      assert (rec["video"].decode(), int(rec["frame"]), bool(rec["has_image"])) == (video, t, has[t])
      # The stored bytes are the file's: equal images after decoding, by construction.
      with open(_file(root, video, int(stand_in[t])), "rb") as f:
        assert rec["image"] == f.read()
      np.testing.assert_array_equal(rec["va"], want["VA"][t])
      assert int(rec["expr"]) == int(want["EXPR"][t])
      np.testing.assert_array_equal(rec["au"], want["AU"][t])
    np.testing.assert_array_equal(frames.expr_labels(video), want["EXPR"])
  assert missing > 0  # the set has frames without an image: their stand-ins were checked
  assert len(frames.source) == sum(videos.values())


def test_split_and_fold_membership_equal_the_folder_reader(frames, synthetic_root):
  for task in affwild2.TASKS:
    for split in (*affwild2.SPLITS, affwild2.TEST_SET):
      assert frames.list_videos(task, split) == affwild2.list_videos(synthetic_root, task, split)
    for fold in range(affwild2.NUM_FOLDS):
      assert frames.fold_videos(task, fold) == affwild2.fold_videos(synthetic_root, task, fold)


def test_expr_records_equal_the_folder_records(frames, synthetic_root):
  for split in affwild2.SPLITS:
    folder = finetune.frame_records(str(synthetic_root), split)
    records = frames.expr_records(split)
    assert len(records) == len(folder)
    np.testing.assert_array_equal(records.column("label"), [r["label"] for r in folder])
    for a, b in zip(folder, records):
      with open(a["path"], "rb") as f:
        assert b["image"] == f.read()
      assert b["label"] == a["label"]


def test_pipelines_over_tfds_equal_the_folder_pipelines(frames, synthetic_root):
  folder = finetune.frame_records(str(synthetic_root), affwild2.TRAIN_SET)
  records = frames.expr_records(affwild2.TRAIN_SET)
  kw = dict(image_size=16, batch_size=8, seed=5, num_epochs=1, shard_index=0, shard_count=1)
  a, b = (list(loaders.pretrain_dataset(x, **kw)) for x in (folder, records))
  assert len(a) == len(b) == len(folder) // 8
  for x, y in zip(a, b):
    assert sorted(x) == sorted(y) == ["image", "label"]
    np.testing.assert_array_equal(x["image"], y["image"])
    np.testing.assert_array_equal(x["label"], y["label"])
  video_names = list(frames.videos())[:3]
  folder_eval = [{"path": _file(synthetic_root, v, int(k)), "video": np.int32(i), "frame": np.int32(k)}
                 for i, v in enumerate(video_names) for k in np.flatnonzero(frames.has_image(v))]
  ev = dict(image_size=16, batch_size=32, shard_index=0, shard_count=1)
  for x, y in zip(loaders.eval_dataset(folder_eval, **ev),
                  loaders.eval_dataset(frames.image_records(video_names), **ev), strict=True):
    for k in ("image", "video", "frame"):
      np.testing.assert_array_equal(x[k], y[k])


@pytest.mark.parametrize("workers", [0, 1])
def test_iterator_state_resumes_mid_epoch(frames, workers, absl_flags_parsed):
  records = frames.expr_records(affwild2.TRAIN_SET)
  kw = dict(image_size=8, batch_size=4, seed=2, num_epochs=None, shard_index=0, shard_count=1,
            worker_count=workers)
  # The device prefetch the stages put on top keeps the state of the batches handed out.
  make = lambda: iter(loaders.prefetch_to_device(loaders.pretrain_dataset(records, **kw),
                                                 lambda b: b, size=2))
  it = make()
  for _ in range(3):
    next(it)
  state = it.get_state()
  epoch = len(records) // 4
  want = [next(it) for _ in range(epoch)]  # crosses the epoch boundary
  it2 = make()
  it2.set_state(state)
  for w in want:
    got = next(it2)
    np.testing.assert_array_equal(got["image"], w["image"])
    np.testing.assert_array_equal(got["label"], w["label"])
  for i in (it, it2):
    i.close()


def test_process_shards_are_disjoint_and_cover_the_set(frames):
  videos = list(frames.videos())
  records = frames.image_records(videos)
  ids = lambda b: list(zip(b["video"].tolist(), b["frame"].tolist()))
  shards = [[x for b in loaders.eval_dataset(records, image_size=8, batch_size=16, shard_index=i,
                                              shard_count=3) for x in ids(b)] for i in range(3)]
  everything = [x for s in shards for x in s]
  assert len(everything) == len(set(everything)) == len(records)
  want = {(i, int(k)) for i, v in enumerate(videos) for k in np.flatnonzero(frames.has_image(v))}
  assert set(everything) == want


def test_face_images_mix_roots_and_skip_a_corrupt_record(face_tree, tmp_path, caplog):
  out = tfds_builders.build(tfds_builders.FACE_IMAGES, tmp_path, roots=face_tree)
  records = tfds_builders.face_records(str(out))
  paths = faces.index_roots(face_tree, cache_dir=None)
  assert len(records) == len(paths) == 25
  for rec, path in zip(records, paths):
    assert rec["path"].endswith(os.path.join(*path.split(os.sep)[-3:]))
    with open(path, "rb") as f:
      assert rec["image"] == f.read()
  kw = dict(image_size=8, batch_size=4, seed=0, num_epochs=1, shard_index=0, shard_count=1)
  before = loaders._skipped
  with caplog.at_level(logging.WARNING):
    a = list(loaders.pretrain_dataset(paths, **kw))
    b = list(loaders.pretrain_dataset(records, **kw))
  # 24 readable images, the corrupt one skipped (and counted) by both: 6 equal batches.
  assert len(a) == len(b) == 6
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["image"], y["image"])
  assert loaders._skipped == before + 2
  named = [r.getMessage() for r in caplog.records if "skipping unreadable image" in r.getMessage()]
  assert any(m.startswith(f"skipping unreadable image {out}: root1/video0/00007.png (") for m in named)
  with pytest.raises(ValueError, match="no readable image in the corpus"):
    loaders.check_readable([r for r in records if r["path"].endswith(".png")], "where", "the corpus")
  with pytest.raises(FileNotFoundError, match=f"{tmp_path}: not a built TFDS dataset .* pass "
                     "<data_dir>/<face_images or aff_wild2_frames>/<version>"):
    tfds_builders.face_records([str(tmp_path)])
  with pytest.raises(ValueError, match=f"{out}: a 'face_images' dataset, expected aff_wild2_frames"):
    tfds_builders.FramesDataset(out)


def test_frames_dataset_as_a_face_source(frames, synthetic_root):
  # Pretraining may also read Aff-Wild2's own frames: every frame that has an image.
  records = tfds_builders.face_records(frames.directory)
  want = [_file(synthetic_root, v, int(k)) for v in frames.videos()
          for k in np.flatnonzero(frames.has_image(v))]
  assert len(records) == len(want)
  for i in (0, len(want) // 2, len(want) - 1):
    with open(want[i], "rb") as f:
      assert records[i]["image"] == f.read()


def test_a_changed_source_is_refused_then_rebuilt(face_tree, tmp_path):
  out = tfds_builders.build(tfds_builders.FACE_IMAGES, tmp_path, roots=face_tree[:1])
  info = (out / "dataset_info.json").read_text()
  assert tfds_builders.build(tfds_builders.FACE_IMAGES, tmp_path, roots=face_tree[:1]) == out
  assert (out / "dataset_info.json").read_text() == info  # kept, not rebuilt
  extra = face_tree[0] / "video1" / "00099.jpg"
  Image.fromarray(np.zeros((20, 28, 3), np.uint8)).save(extra)
  try:
    with pytest.raises(FileExistsError, match=f"{out} was built from other files than those now "
                       f"under {face_tree[0]}"):
      tfds_builders.build(tfds_builders.FACE_IMAGES, tmp_path, roots=face_tree[:1])
    tfds_builders.build(tfds_builders.FACE_IMAGES, tmp_path, roots=face_tree[:1], overwrite=True)
    assert len(tfds_builders.face_records(str(out))) == 13
  finally:
    extra.unlink()


def test_not_a_dataset_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match=f"{tmp_path}: not a built TFDS dataset"):
    tfds_builders.FramesDataset(tmp_path)
