import os

from etils import epath
import numpy as np
import pytest
from PIL import Image

from affect_jax import fileio


def test_write_text_atomic_creates_parents_and_replaces(tmp_path):
  path = tmp_path / "a" / "b" / "out.json"
  fileio.write_text_atomic(path, "one\n")
  fileio.write_text_atomic(path, "two\n")
  assert path.read_text() == "two\n"
  assert os.listdir(path.parent) == ["out.json"]  # no temporary left behind


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
  path = tmp_path / "results.md"
  path.write_text("old\n")

  def broken(tmp):
    tmp.write_text("half")
    raise OSError("disk full")

  with pytest.raises(OSError, match="disk full"):
    fileio.atomic_write(path, broken)
  assert path.read_text() == "old\n"
  assert os.listdir(tmp_path) == ["results.md"]


def test_savers_that_go_by_the_extension_write_that_format(tmp_path):
  image = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3)
  fileio.atomic_write(tmp_path / "x.png", Image.fromarray(image).save)
  with Image.open(tmp_path / "x.png") as im:
    assert im.format == "PNG"
    np.testing.assert_array_equal(np.asarray(im), image)
  fileio.atomic_write(tmp_path / "y.npy", lambda tmp: np.save(tmp, image))
  np.testing.assert_array_equal(np.load(tmp_path / "y.npy"), image)
  assert sorted(os.listdir(tmp_path)) == ["x.png", "y.npy"]


def test_save_figure_atomic_writes_a_png_and_closes_it(tmp_path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  plt.plot([0, 1], [1, 0])
  fileio.save_figure_atomic(tmp_path / "fig.png", dpi=30)
  with Image.open(tmp_path / "fig.png") as im:
    assert im.format == "PNG"
  assert plt.get_fignums() == []


def test_path_keeps_urls_and_makes_local_paths_absolute(tmp_path, monkeypatch):
  assert str(fileio.path("gs://b/x/y")) == "gs://b/x/y"
  assert str(fileio.path(epath.Path("gs://b/x/y") / "z.npy")) == "gs://b/x/y/z.npy"
  assert str(fileio.path("s3://b/~/k")) == "s3://b/~/k"  # never ~-expanded
  assert fileio.is_remote("gs://b/x") and not fileio.is_remote("/gs/b")
  monkeypatch.chdir(tmp_path)
  assert str(fileio.path("a/b.json")) == str(tmp_path / "a" / "b.json")
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  assert str(fileio.path("~/c")) == str(tmp_path / "home" / "c")
  assert str(fileio.path(epath.Path("a"))) == str(tmp_path / "a")
  assert isinstance(fileio.path("a"), epath.Path)
  with pytest.raises(ValueError, match="unsupported URL scheme"):
    fileio.path("http://example.com/x")


def _pretend_remote(monkeypatch, tmp_path):
  """Sends atomic_write down its bucket branch for files under `tmp_path`."""
  real = fileio.is_remote
  monkeypatch.setattr(fileio, "is_remote",
                      lambda p: real(p) or os.fspath(p).startswith(str(tmp_path)))


def test_remote_write_goes_through_a_local_file_and_a_copy(tmp_path, monkeypatch):
  _pretend_remote(monkeypatch, tmp_path)
  seen = []

  def save(tmp):
    seen.append(tmp)
    np.save(tmp, np.arange(3))

  fileio.atomic_write(tmp_path / "out" / "a.npy", save)
  assert not str(seen[0]).startswith(str(tmp_path)) and seen[0].suffix == ".npy"
  assert not seen[0].exists()  # the local temporary is gone too
  np.testing.assert_array_equal(np.load(tmp_path / "out" / "a.npy"), np.arange(3))
  assert os.listdir(tmp_path / "out") == ["a.npy"]


def test_failed_remote_write_keeps_the_old_file(tmp_path, monkeypatch):
  _pretend_remote(monkeypatch, tmp_path)
  path = tmp_path / "results.md"
  fileio.write_text_atomic(path, "old\n")

  def broken(tmp):
    tmp.write_text("half")
    raise OSError("disk full")

  with pytest.raises(OSError, match="disk full"):
    fileio.atomic_write(path, broken)

  def unavailable(src, dst):
    raise OSError("503 service unavailable")

  # The copy has reached the bucket; the rename over the target fails.
  monkeypatch.setattr(type(fileio.path(path)), "replace", unavailable)
  with pytest.raises(OSError, match="503"):
    fileio.write_text_atomic(path, "new\n")
  assert path.read_text() == "old\n"
  assert os.listdir(tmp_path) == ["results.md"]


@pytest.mark.parametrize("remote", [False, True])
def test_temporaries_differ_between_hosts_with_the_same_pid(tmp_path, monkeypatch, remote):
  if remote:
    _pretend_remote(monkeypatch, tmp_path)
  monkeypatch.setattr(os, "getpid", lambda: 1234)
  names = []
  real_replace = os.replace

  def spy_replace(src, dst):
    names.append(os.path.basename(src))
    real_replace(src, dst)

  monkeypatch.setattr(os, "replace", spy_replace)
  fileio.write_text_atomic(tmp_path / "shared.json", "host 0\n")
  fileio.write_text_atomic(tmp_path / "shared.json", "host 1\n")
  assert len(names) == 2 and names[0] != names[1]
  assert all(n.startswith(".shared.tmp") and n.endswith(".json") for n in names)


def test_shared_text_is_written_by_process_0_only(tmp_path, monkeypatch):
  import jax
  fileio.write_shared_text(tmp_path / "a.json", "{}\n")
  monkeypatch.setattr(jax, "process_index", lambda: 1)
  fileio.write_shared_text(tmp_path / "b.json", "{}\n")
  assert os.listdir(tmp_path) == ["a.json"]


def test_stat_fingerprint_changes_with_any_file_and_not_with_the_root(tmp_path):
  files = [tmp_path / "a" / f"{i}.jpg" for i in range(3)]
  files[0].parent.mkdir()
  for f in files:
    f.write_bytes(b"x")
  fp = fileio.stat_fingerprint(files, tmp_path / "a")
  assert fp == fileio.stat_fingerprint(files, tmp_path / "a")
  moved = tmp_path / "b"
  os.rename(tmp_path / "a", moved)  # a renamed dataset root keeps its fingerprint
  assert fileio.stat_fingerprint([moved / f.name for f in files], moved) == fp
  files = [moved / f.name for f in files]
  st = os.stat(files[1])
  os.utime(files[1], ns=(st.st_atime_ns, st.st_mtime_ns + 1))  # touched
  assert fileio.stat_fingerprint(files, moved) != fp
  fp = fileio.stat_fingerprint(files, moved)
  files[2].write_bytes(b"xy")  # same name, other size
  os.utime(files[2], ns=(st.st_atime_ns, st.st_mtime_ns))
  assert fileio.stat_fingerprint(files, moved) != fp
  fp = fileio.stat_fingerprint(files, moved)
  files[0].unlink()  # gone
  assert fileio.stat_fingerprint(files, moved) != fp
