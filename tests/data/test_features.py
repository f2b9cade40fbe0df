from etils import epath
import numpy as np
import pytest

from affect_jax import fileio
from affect_jax.data import features


def _store(tmp_path, **kw):
  args = dict(kind="visual", dim=4, dtype="float16", model_hash="abc", config={"pool": "cls"})
  args.update(kw)
  return features.FeatureStore.create(tmp_path / "store", **args)


def test_round_trip_and_manifest(tmp_path):
  store = _store(tmp_path)
  rng = np.random.default_rng(0)
  a = rng.normal(size=(7, 4)).astype(np.float32)
  b = rng.normal(size=(3, 4)).astype(np.float32)
  store.write("vid_b", b, repaired_frames=1)
  store.write("vid_a", a, repaired_frames=0)
  reopened = features.FeatureStore(tmp_path / "store")
  assert reopened.videos() == ["vid_a", "vid_b"]
  got = reopened.read("vid_a")
  assert isinstance(got, np.memmap) and got.dtype == np.float16 and got.shape == (7, 4)
  np.testing.assert_array_equal(got, a.astype(np.float16))
  m = reopened.manifest()
  assert m["dim"] == 4 and m["dtype"] == "float16" and m["model_hash"] == "abc"
  assert m["videos"]["vid_b"] == {"num_frames": 3, "repaired_frames": 1}
  assert reopened.has("vid_a", num_frames=7) and not reopened.has("vid_a", num_frames=8)
  assert not reopened.has("vid_c")


def test_reopen_with_other_model_is_an_error(tmp_path):
  _store(tmp_path)
  _store(tmp_path)  # same settings: fine
  with pytest.raises(ValueError, match="model_hash"):
    _store(tmp_path, model_hash="other")
  with pytest.raises(ValueError, match="dim"):
    _store(tmp_path, dim=8)


def test_bad_input_rejected(tmp_path):
  store = _store(tmp_path)
  with pytest.raises(ValueError, match="shape"):
    store.write("v", np.zeros((3, 5)))
  with pytest.raises(ValueError, match="non-finite"):
    store.write("v", np.full((3, 4), np.nan))
  with pytest.raises(KeyError, match="no features"):
    store.read("missing")
  with pytest.raises(FileNotFoundError, match="not a feature store"):
    features.FeatureStore(tmp_path / "nowhere")


def test_crash_mid_write_leaves_nothing_visible(tmp_path, monkeypatch):
  store = _store(tmp_path)
  store.write("done", np.ones((2, 4)))

  def boom(path, arr):
    with open(path, "wb") as f:
      f.write(b"\x93NUMPY partial")
    raise RuntimeError("killed")

  monkeypatch.setattr(np, "save", boom)
  with pytest.raises(RuntimeError):
    store.write("half", np.ones((5, 4)))
  monkeypatch.undo()
  assert store.videos() == ["done"]
  assert not store.has("half")
  leftovers = [p.name for p in (tmp_path / "store" / "videos").iterdir()]
  assert sorted(leftovers) == ["done.json", "done.npy"]
  # An array whose metadata disagrees (e.g. truncated by a disk error) is not "complete".
  np.save(tmp_path / "store" / "videos" / "done.npy", np.ones((1, 4), np.float16))
  assert not store.has("done")


def test_open_by_str_or_epath_sees_the_same_store(tmp_path, monkeypatch):
  store = _store(tmp_path)
  store.write("v1", np.ones((2, 4)))
  store.write("v0", np.zeros((3, 4)))
  by_str = features.FeatureStore(str(tmp_path / "store"))
  by_epath = features.FeatureStore(epath.Path(tmp_path) / "store")
  monkeypatch.chdir(tmp_path)
  by_relative = features.FeatureStore("store")
  assert by_str.videos() == by_epath.videos() == by_relative.videos() == ["v0", "v1"]
  assert str(by_str.root) == str(by_epath.root) == str(by_relative.root) == str(store.root)
  assert str(store.root) == str(tmp_path / "store")


def test_remote_store_reads_into_memory_what_a_local_one_maps(tmp_path, monkeypatch):
  store = _store(tmp_path)
  a = np.random.default_rng(0).normal(size=(5, 4))
  store.write("v", a)
  mapped = store.read("v")
  assert isinstance(mapped, np.memmap)
  monkeypatch.setattr(fileio, "is_remote", lambda p: True)
  remote = features.FeatureStore(tmp_path / "store")
  got = remote.read("v")
  assert not isinstance(got, np.memmap) and got.dtype == np.float16
  np.testing.assert_array_equal(got, mapped)
  assert remote.has("v", num_frames=5) and not remote.has("v", num_frames=4)
  assert not remote.has("missing")
  # A bucket has no empty folders: a store with no video yet has no videos/ either.
  empty = _store(tmp_path / "empty")
  (tmp_path / "empty" / "store" / "videos").rmdir()
  assert features.FeatureStore(empty.root).videos() == []


def test_plan_recomputes_what_is_missing_or_made_from_other_inputs(tmp_path):
  store = features.FeatureStore.create(tmp_path, kind="visual", dim=2, dtype="float32",
                                       model_hash="m")
  store.write("a", np.zeros((3, 2)), inputs="fa")
  store.write("b", np.zeros((4, 2)), inputs="fb")
  store.write("c", np.zeros((2, 2)))  # written before inputs were recorded
  todo, changed = store.plan({"a": 3, "b": 4, "c": 2, "d": 5},
                             {"a": "fa", "b": "fb2", "c": "fc", "d": "fd"})
  assert todo == ["b", "c", "d"] and changed == ["b", "c"]
  assert store.plan({"a": 4}, {"a": "fa"}) == (["a"], [])  # another frame count: not complete
