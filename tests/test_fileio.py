import os

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
