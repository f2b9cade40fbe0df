import gc
import math
import os
import time

import ml_collections
import numpy as np
import pytest
from PIL import Image

from affect_jax.data import faces, loaders


@pytest.fixture(scope="module")
def image_root(tmp_path_factory):
  root = tmp_path_factory.mktemp("faces")
  for v in range(3):
    d = root / f"video{v}"
    d.mkdir()
    for i in range(1, 9):
      # Each image is one flat colour that encodes (video, frame), so we can tell them apart.
      colour = (v * 80, i * 25, 100)
      Image.fromarray(np.full((40, 56, 3), colour, np.uint8)).save(d / f"{i:05d}.jpg", quality=95)
  (root / "video1" / "00009.png").write_bytes(b"not an image at all")
  (root / "notes.txt").write_text("ignored")
  return root


def test_index_finds_images_and_caches(image_root, tmp_path):
  paths = faces.index_images(image_root, cache_dir=tmp_path)
  assert len(paths) == 3 * 8 + 1
  assert paths == sorted(paths)
  assert list(tmp_path.iterdir())  # cache written
  assert faces.index_images(image_root, cache_dir=tmp_path) == paths
  # A new frame in a video folder changes that folder's mtime and so the cache key.
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(image_root / "video2" / "00010.jpg")
  try:
    assert len(faces.index_images(image_root, cache_dir=tmp_path)) == len(paths) + 1
  finally:
    (image_root / "video2" / "00010.jpg").unlink()


def test_index_roots_mixes_and_errors(image_root, tmp_path):
  both = faces.index_roots(f"{image_root / 'video0'},{image_root / 'video2'}", cache_dir=None)
  assert len(both) == 16
  with pytest.raises(FileNotFoundError, match="not a folder"):
    faces.index_roots([str(tmp_path / "missing")], cache_dir=None)
  with pytest.raises(FileNotFoundError, match="no .*images found"):
    faces.index_roots([str(tmp_path)], cache_dir=None)


def test_crop_box_follows_torchvision_rules():
  rng = np.random.default_rng(0)
  for _ in range(500):
    w, h = int(rng.integers(8, 300)), int(rng.integers(8, 300))
    l, t, r, b = loaders.random_resized_crop_box(w, h, rng)
    assert 0 <= l < r <= w and 0 <= t < b <= h
  # A 100x100 image always admits a crop on the first tries: area fraction and aspect in range.
  for _ in range(200):
    l, t, r, b = loaders.random_resized_crop_box(100, 100, rng)
    area = (r - l) * (b - t) / 1e4
    assert 0.18 <= area <= 1.0
    assert 3 / 4 - 0.06 <= (r - l) / (b - t) <= 4 / 3 + 0.06
  # Extreme aspect ratio: falls back to the central crop clamped to the ratio range.
  # h = 10, w = round(10 * 4/3) = 13, centred: left = (400 - 13) // 2.
  assert loaders.random_resized_crop_box(400, 10, np.random.default_rng(0), scale=(0.99, 1.0)) == (
      193, 0, 206, 10)


def test_pretrain_batches_deterministic_and_skip_corrupt(image_root, caplog):
  paths = faces.index_images(image_root, cache_dir=None)
  kw = dict(image_size=16, batch_size=4, seed=3, num_epochs=1, shard_index=0, shard_count=1)
  batches = list(loaders.pretrain_dataset(paths, **kw))
  # 24 readable images, one corrupt one skipped: 6 full batches.
  assert len(batches) == 6
  assert all(b["image"].shape == (4, 16, 16, 3) and b["image"].dtype == np.uint8 for b in batches)
  assert any("00009.png" in r.getMessage() for r in caplog.records)
  again = list(loaders.pretrain_dataset(paths, **kw))
  for a, b in zip(batches, again):
    np.testing.assert_array_equal(a["image"], b["image"])
  other = list(loaders.pretrain_dataset(paths, **{**kw, "seed": 4}))
  assert any(not np.array_equal(a["image"], b["image"]) for a, b in zip(batches, other))



def test_check_readable_needs_one_decodable_image(image_root, tmp_path):
  good = str(image_root / "video0" / "00001.jpg")
  bad = tmp_path / "00001.jpg"
  bad.write_bytes(b"")
  (tmp_path / "00002.jpg").write_bytes(np.random.default_rng(0).bytes(300))
  loaders.check_readable([str(bad), {"path": good, "label": 1}], "somewhere")
  with pytest.raises(ValueError) as error:
    loaders.check_readable([str(bad), str(tmp_path / "00002.jpg")], str(tmp_path), "the corpus")
  assert str(error.value).startswith(
      f"{tmp_path}: no readable image in the corpus (2 of 2 unreadable, e.g. {bad}: "
      "UnidentifiedImageError: ")

def test_each_image_once_per_epoch_and_shards_disjoint(image_root):
  paths = [p for p in faces.index_images(image_root, cache_dir=None) if p.endswith(".jpg")]
  def colours(shard_index, shard_count):
    ds = loaders.pretrain_dataset(paths, image_size=8, batch_size=1, seed=0, num_epochs=1,
                                  crop_scale=(1.0, 1.0), flip=False,
                                  shard_index=shard_index, shard_count=shard_count)
    # Flat colours survive resizing (up to JPEG error): round the centre pixel.
    return [tuple(int(round(c / 5)) for c in b["image"][0, 4, 4]) for b in ds]
  full = colours(0, 1)
  assert len(full) == len(set(full)) == 24
  s0, s1 = colours(0, 2), colours(1, 2)
  assert len(s0) == len(s1) == 12 and not set(s0) & set(s1)
  assert set(s0) | set(s1) == set(full)


def test_iterator_state_resumes(image_root):
  paths = faces.index_images(image_root, cache_dir=None)
  kw = dict(image_size=8, batch_size=2, seed=1, num_epochs=None, shard_index=0, shard_count=1)
  it = iter(loaders.pretrain_dataset(paths, **kw))
  for _ in range(5):
    next(it)
  state = it.get_state()
  want = [next(it)["image"] for _ in range(15)]  # crosses an epoch boundary
  it2 = iter(loaders.pretrain_dataset(paths, **kw))
  it2.set_state(state)
  for w in want:
    np.testing.assert_array_equal(next(it2)["image"], w)


def test_normalize_images():
  x = np.array([[[0, 128, 255]]], np.uint8)
  got = np.asarray(loaders.normalize_images(x))
  want = (np.array([0, 128, 255]) / 255.0 - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]
  np.testing.assert_allclose(got[0, 0], want, rtol=1e-6)
  assert math.isclose(float(got.mean()), float(want.mean()), rel_tol=1e-6)


def test_global_batches_do_not_depend_on_the_process_count(image_root):
  paths = [p for p in faces.index_images(image_root, cache_dir=None) if p.endswith(".jpg")]
  kw = dict(image_size=8, seed=5, num_epochs=2)
  one = list(loaders.pretrain_dataset(paths, batch_size=6, shard_index=0, shard_count=1, **kw))
  parts = [list(loaders.pretrain_dataset(paths, batch_size=2, shard_index=k, shard_count=3, **kw))
           for k in range(3)]
  assert len(one) == 8 and all(len(p) == 8 for p in parts)
  for b, (p0, p1, p2) in zip(one, zip(*parts)):
    # Same images, same crops and flips: process k holds rows [2k, 2k + 2) of the global batch.
    np.testing.assert_array_equal(b["image"], np.concatenate([p0["image"], p1["image"], p2["image"]]))


@pytest.mark.parametrize("n,rows,count", [(10, 2, 2), (11, 2, 3), (3, 4, 2), (0, 1, 2)])
def test_process_rows_partition_the_sequence(n, rows, count):
  import grain
  ds = grain.MapDataset.source(list(range(n)))
  parts = [list(loaders.ProcessRows(ds, rows, k, count)) for k in range(count)]
  assert sorted(sum(parts, [])) == list(range(n))
  for k, part in enumerate(parts):
    assert all((i // rows) % count == k for i in part)


def test_crop_flip_equals_an_independent_crop_resize_and_numpy_flip(image_root):
  rng_image = np.random.default_rng(7).integers(0, 256, (40, 56, 3), dtype=np.uint8)
  Image.fromarray(rng_image).save(image_root / "noise.png")  # asymmetric: a flip shows
  path = str(image_root / "noise.png")
  try:
    flips = 0
    for seed in range(8):
      got = loaders.RandomResizedCropFlip(16).random_map(path, np.random.default_rng(seed))["image"]
      rng = np.random.default_rng(seed)
      box = loaders.random_resized_crop_box(56, 40, rng)
      want = np.asarray(Image.fromarray(rng_image).resize((16, 16), Image.Resampling.BICUBIC, box=box))
      if rng.random() < 0.5:
        want, flips = want[:, ::-1], flips + 1
      np.testing.assert_array_equal(got, want)
    assert 0 < flips < 8
  finally:
    (image_root / "noise.png").unlink()


def test_worker_count_from_the_host():
  assert loaders.worker_count(3) == 3
  assert loaders.worker_count(-1) == 0  # a CPU backend: its cores run the model
  with pytest.raises(ValueError, match="worker_count=-2: use -1"):
    loaders.worker_count(-2)
  assert loaders.options(ml_collections.ConfigDict({"worker_count": 2})) == {
      "worker_count": 2, "read_threads": loaders.READ_THREADS}


def test_workers_without_absl_flags_are_a_clear_error(image_root):
  from absl import flags
  if flags.FLAGS.is_parsed():
    pytest.skip("flags already parsed in this process")
  with pytest.raises(ValueError, match="grain's worker processes need absl flags parsed"):
    loaders.eval_dataset([str(image_root / "video0" / "00001.jpg")], image_size=8, batch_size=1,
                         worker_count=1)


def _shared_memory_blocks() -> set[str]:
  return set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()


def test_batches_order_and_resume_do_not_depend_on_workers(image_root, absl_flags_parsed):
  # With the corrupt image in the set: a skipped element must not shift the others.
  paths = faces.index_images(image_root, cache_dir=None)
  kw = dict(image_size=8, batch_size=4, seed=2, num_epochs=None, shard_index=0, shard_count=1)
  ref = iter(loaders.pretrain_dataset(paths, worker_count=0, **kw))
  want = [next(ref)["image"] for _ in range(12)]  # two epochs and a half
  blocks = _shared_memory_blocks()
  two = iter(loaders.pretrain_dataset(paths, worker_count=2, **kw))
  got = [np.array(next(two)["image"]) for _ in range(5)]
  state = two.get_state()
  two.close()
  del two
  gc.collect()
  # Stopped workers leave no shared-memory block behind (chunks read ahead included).
  deadline = time.monotonic() + 5
  while _shared_memory_blocks() - blocks and time.monotonic() < deadline:
    time.sleep(0.1)  # (grain frees blocks from a thread)
  assert not _shared_memory_blocks() - blocks
  assert set(state) == {"consumed"} and state["consumed"] in (20, 21)  # 5 batches, maybe a skip
  resumed = iter(loaders.pretrain_dataset(paths, worker_count=0, **kw))
  resumed.set_state(state)
  got += [next(resumed)["image"] for _ in range(7)]
  for w, g in zip(want, got, strict=True):
    np.testing.assert_array_equal(g, w)
  # One pass in order (what extraction relies on), with two workers: the records' order.
  records = [{"path": p, "k": np.int32(i)} for i, p in enumerate(paths)]
  ks = [k for b in loaders.eval_dataset(records, image_size=8, batch_size=5, worker_count=2,
                                        shard_index=0, shard_count=1) for k in b["k"].tolist()]
  assert ks == [i for i, p in enumerate(paths) if not p.endswith(".png")]


def test_a_resumed_loader_takes_grains_own_state_of_the_same_pipeline(image_root):
  paths = faces.index_images(image_root, cache_dir=None)
  kw = dict(image_size=8, batch_size=4, seed=2, num_epochs=None, shard_index=0, shard_count=1)
  ref = iter(loaders.pretrain_dataset(paths, **kw))
  want = [next(ref)["image"] for _ in range(4)][2:]
  old = iter(loaders.pretrain_dataset(paths, **kw))
  old.set_state({"next_index": 8})  # written by earlier versions without workers
  for w in want:
    np.testing.assert_array_equal(next(old)["image"], w)
  with pytest.raises(ValueError, match="saved in grain's per-worker form"):
    old.set_state({"next_index_in_cycle": 0, "iterators_in_use_states": []})
