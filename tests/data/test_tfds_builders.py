"""TFDS ArrayRecord datasets: built from the synthetic set and a face tree, read back equal to
the folder readers, through the same grain pipelines (batches, resume, shards, corrupt files)."""

import glob
import json
import logging
import os
import shutil
import tempfile

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image
from tensorflow_datasets.proto import tf_example_pb2

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


@pytest.fixture(scope="module")
def rgb_frames(frames, synthetic_root):
  """The synthetic set stored decoded at its frames' own size, beside `frames` (one data_dir)."""
  video = next(iter(frames.videos()))
  first = int(np.flatnonzero(frames.has_image(video))[0])
  size = loaders.load_rgb(_file(synthetic_root, video, first)).size
  assert size[0] == size[1]
  data_dir = os.path.dirname(os.path.dirname(frames.directory))
  out = tfds_builders.build(tfds_builders.AFFWILD2_FRAMES, data_dir, manual_dir=synthetic_root,
                            pixels=size[0])
  return tfds_builders.FramesDataset(out)


def _file(root, video, frame0):
  return os.path.join(root, affwild2.FRAMES_DIR, video, affwild2.frame_name(frame0 + 1))


def _metadata(directory):
  with open(os.path.join(directory, "metadata.json")) as f:
    return json.load(f)


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
  _assert_pipelines_equal_the_folder_pipelines(frames, synthetic_root)


def test_pipelines_over_rgb_tfds_equal_the_folder_pipelines(rgb_frames, synthetic_root):
  # Stored at the frames' size: the pixels the loaders would decode, so the same batches.
  _assert_pipelines_equal_the_folder_pipelines(rgb_frames, synthetic_root)


def _assert_pipelines_equal_the_folder_pipelines(frames, synthetic_root):
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


def test_a_build_leaves_no_temporary_folder(face_tree, tmp_path):
  # TFDS' DatasetInfo makes an empty tmp*tfds folder per builder when it looks for
  # precomputed info on its bucket; these datasets skip that look-up.
  pattern = os.path.join(tempfile.gettempdir(), "tmp*tfds")
  before = set(glob.glob(pattern))
  tfds_builders.build(tfds_builders.FACE_IMAGES, tmp_path / "tfds", roots=face_tree)
  assert set(glob.glob(pattern)) == before


def test_not_a_dataset_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match=f"{tmp_path}: not a built TFDS dataset"):
    tfds_builders.FramesDataset(tmp_path)


def test_rgb_frames_hold_each_frame_decoded(frames, rgb_frames, synthetic_root):
  root = str(synthetic_root)
  pixels = rgb_frames.pixels
  data_dir = os.path.dirname(os.path.dirname(frames.directory))
  assert rgb_frames.directory == os.path.join(data_dir, tfds_builders.AFFWILD2_FRAMES,
                                              f"rgb{pixels}", "1.0.0")
  assert frames.pixels is None
  assert frames.directory == os.path.join(data_dir, tfds_builders.AFFWILD2_FRAMES, "1.0.0")
  meta = _metadata(rgb_frames.directory)
  assert (meta["pixels"], meta["undecodable"]) == (pixels, [])
  assert rgb_frames.videos() == frames.videos() and rgb_frames.videos(False) == frames.videos(False)
  for task in affwild2.TASKS:
    for split in (*affwild2.SPLITS, affwild2.TEST_SET):
      assert rgb_frames.list_videos(task, split) == frames.list_videos(task, split)
  assert len(rgb_frames.source) == len(frames.source)
  for video, n in frames.videos().items():
    has = frames.has_image(video)
    np.testing.assert_array_equal(rgb_frames.has_image(video), has)
    np.testing.assert_array_equal(rgb_frames.expr_labels(video), frames.expr_labels(video))
    assert rgb_frames.start(video) == frames.start(video)
    assert rgb_frames.fingerprint(video).startswith(f"tfds:rgb{pixels}:")
    assert rgb_frames.fingerprint(video) != frames.fingerprint(video)
    stand_in = affwild2.nearest_image(has)
    decoded = {int(k): np.asarray(loaders.load_rgb(_file(root, video, int(k))))
               for k in np.unique(stand_in)}
    for t in range(n):
      i = frames.start(video) + t
      rec, want = rgb_frames.source[i], frames.source[i]
      for k in ("video", "frame", "has_image", "expr"):
        assert rec[k] == want[k]
      for k in ("va", "au"):
        np.testing.assert_array_equal(rec[k], want[k])
      # A frame without an image holds its stand-in's pixels, as the encoded one its bytes.
      np.testing.assert_array_equal(rec["image"], decoded[int(stand_in[t])])
    # What the pipelines read (`Records`): the same pixels, uint8 [S, S, 3].
    for rec, k in zip(rgb_frames.image_records([video]), np.flatnonzero(has)):
      assert rec["image"].dtype == np.uint8 and rec["image"].shape == (pixels, pixels, 3)
      np.testing.assert_array_equal(rec["image"], decoded[int(k)])
  # Stored as ONE bytes value per record (not an int64 per pixel).
  image = tf_example_pb2.Example.FromString(rgb_frames.raw_source[0]).features.feature["image"]
  assert image.WhichOneof("kind") == "bytes_list" and len(image.bytes_list.value) == 1
  assert len(image.bytes_list.value[0]) == pixels * pixels * 3
  np.testing.assert_array_equal(
      np.frombuffer(image.bytes_list.value[0], np.uint8).reshape(pixels, pixels, 3),
      rgb_frames.source[0]["image"])


@pytest.fixture
def mixed_tree(tmp_path):
  """Noise images of several sizes and modes (one already 16 x 16) and a corrupt file."""
  root = tmp_path / "mixed"
  (root / "a").mkdir(parents=True)
  rng = np.random.default_rng(0)
  noise = lambda h, w, c=3: rng.integers(0, 256, (h, w, c) if c > 1 else (h, w), np.uint8)
  Image.fromarray(noise(16, 16)).save(root / "a" / "0.png")
  Image.fromarray(noise(20, 28)).save(root / "a" / "1.png")
  Image.fromarray(noise(40, 12)).save(root / "a" / "2.jpg", quality=90)
  Image.fromarray(noise(30, 30, 1)).save(root / "a" / "3.png")  # grey
  Image.fromarray(noise(16, 16)).save(root / "a" / "4.jpg", quality=90)
  Image.fromarray(noise(9, 50)).save(root / "a" / "5.png")
  (root / "a" / "6.jpg").write_bytes(b"\xff\xd8 not a jpeg")
  return root


def test_rgb_face_images_resize_and_skip_an_undecodable_file(mixed_tree, tmp_path, caplog):
  with caplog.at_level(logging.WARNING):
    out = tfds_builders.build(tfds_builders.FACE_IMAGES, tmp_path / "tfds", roots=[mixed_tree],
                              pixels=16)
  assert out == tmp_path / "tfds" / tfds_builders.FACE_IMAGES / "rgb16" / "1.0.0"
  assert any("6.jpg cannot be decoded" in r.getMessage() for r in caplog.records)
  meta = _metadata(out)
  assert (meta["pixels"], meta["undecodable"]) == (16, ["mixed/a/6.jpg"])
  paths = faces.index_roots([mixed_tree], cache_dir=None)
  records = tfds_builders.face_records(str(out))
  assert len(records) == len(paths) == 7
  resized = 0
  for rec, path in zip(records, paths):
    assert rec["path"] == f"{out}: mixed/a/{os.path.basename(path)}"
    if path.endswith("6.jpg"):
      assert rec["image"] == b""
      continue
    image = loaders.load_rgb(path)
    if image.size != (16, 16):
      image = image.resize((16, 16), Image.Resampling.BICUBIC)
      resized += 1
    np.testing.assert_array_equal(rec["image"], np.asarray(image))
  assert resized == 4
  kw = dict(image_size=8, batch_size=3, seed=0, num_epochs=1, shard_index=0, shard_count=1,
            worker_count=0)
  before = loaders._skipped
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    batches = list(loaders.pretrain_dataset(records, **kw))
  assert len(batches) == 2  # the 6 decodable images
  assert loaders._skipped == before + 1
  named = [r.getMessage() for r in caplog.records if "skipping unreadable image" in r.getMessage()]
  assert len(named) == 1
  assert named[0].startswith(f"skipping unreadable image {out}: mixed/a/6.jpg (")
  # An encoded and an RGB dataset mix: each record's image as its dataset stores it.
  encoded = tfds_builders.build(tfds_builders.FACE_IMAGES, tmp_path / "tfds", roots=[mixed_tree])
  both = tfds_builders.face_records([encoded, out])
  assert len(both) == 14
  with open(paths[1], "rb") as f:
    assert both[1]["image"] == f.read()
  np.testing.assert_array_equal(both[8]["image"], records[1]["image"])


def test_rgb_frames_keep_the_record_of_an_undecodable_frame(synthetic_root, tmp_path):
  root = tmp_path / "aff"
  shutil.copytree(synthetic_root, root)
  video = sorted(affwild2.all_videos(str(root)))[0]
  n = affwild2.all_videos(str(root))[video]
  has = affwild2.image_mask(str(root), video, n)
  k = int(np.flatnonzero(has)[1])
  with open(_file(root, video, k), "wb") as f:
    f.write(b"truncated")
  frames = tfds_builders.FramesDataset(tfds_builders.build(
      tfds_builders.AFFWILD2_FRAMES, tmp_path / "tfds", manual_dir=root, pixels=8))
  assert _metadata(frames.directory)["undecodable"] == [f"{video}/{affwild2.frame_name(k + 1)}"]
  assert len(frames.source) == sum(affwild2.all_videos(str(root)).values())
  np.testing.assert_array_equal(frames.has_image(video), has)
  stand_in = affwild2.nearest_image(has)
  for t in range(n):
    rec = frames.source[frames.start(video) + t]
    assert int(rec["frame"]) == t
    assert rec["image"].shape == ((0, 8, 3) if stand_in[t] == k else (8, 8, 3))
  records = frames.image_records([video])
  assert records[1]["image"] == b"" and records[0]["image"].shape == (8, 8, 3)


def test_encoded_and_rgb_builds_coexist_and_check_their_sources(face_tree, tmp_path):
  build = lambda **kw: tfds_builders.build(tfds_builders.FACE_IMAGES, tmp_path,
                                           roots=face_tree[:1], **kw)
  rgb = build(pixels=8)  # first, then the encoded one beside it, then both again
  encoded = build()
  assert encoded == tmp_path / tfds_builders.FACE_IMAGES / "1.0.0"
  assert rgb == tmp_path / tfds_builders.FACE_IMAGES / "rgb8" / "1.0.0"
  infos = [(d / "dataset_info.json").read_text() for d in (encoded, rgb)]
  assert (build(), build(pixels=8)) == (encoded, rgb)
  assert [(d / "dataset_info.json").read_text() for d in (encoded, rgb)] == infos  # kept
  assert tfds.builder_from_directory(rgb).info.features["image"].shape == (None, 8, 3)
  a, b = tfds_builders.face_records(str(encoded)), tfds_builders.face_records(str(rgb))
  assert len(a) == len(b) == 12
  assert isinstance(a[0]["image"], bytes) and b[0]["image"].shape == (8, 8, 3)
  with pytest.raises(ValueError, match="pixels=4: expected None"):
    build(pixels=4)
  extra = face_tree[0] / "video1" / "00098.jpg"
  Image.fromarray(np.zeros((20, 28, 3), np.uint8)).save(extra)
  try:
    for out, kw in ((rgb, dict(pixels=8)), (encoded, {})):
      with pytest.raises(FileExistsError, match=f"{out} was built from other files"):
        build(**kw)
    assert build(pixels=8, overwrite=True) == rgb
    assert len(tfds_builders.face_records(str(rgb))) == 13
    with pytest.raises(FileExistsError, match=f"{encoded} was built from other files"):
      build()  # the encoded build is checked against its own source
    assert len(tfds_builders.face_records(str(encoded))) == 12
  finally:
    extra.unlink()
