"""config.data.source='tfds': each image stage, run from the built ArrayRecord datasets with
no image folder in reach, computes what it computes from the folders, bit for bit."""

import jax
import numpy as np
import pytest

from affect_jax import checkpoint
from affect_jax.data import affwild2, features, tfds_builders
from affect_jax.train import extract, finetune, pretrain
from configs import expr_finetune, mae_pretrain
from tests.train.conftest import IMAGE, extract_config_for


@pytest.fixture(scope="module")
def built(synthetic_root, tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("tfds")
  return {
      "frames": str(tfds_builders.build(tfds_builders.AFFWILD2_FRAMES, data_dir,
                                        manual_dir=synthetic_root)),
      "faces": str(tfds_builders.build(tfds_builders.FACE_IMAGES, data_dir,
                                       roots=[synthetic_root / affwild2.FRAMES_DIR])),
  }


def _assert_same_params(workdir_a, workdir_b):
  a = checkpoint.load_params(workdir_a, "latest")["params"]
  b = checkpoint.load_params(workdir_b, "latest")["params"]
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(path))


def test_pretraining_from_face_images_equals_the_folder_run(built, mae_workdir, tmp_path):
  # The same settings as the mae_workdir fixture (tests/train/conftest.py).
  c = mae_pretrain.get_config("tiny")
  c.data.root, c.data.image_size, c.batch_size = str(tmp_path / "no_tree"), IMAGE, 16
  c.data.source, c.data.roots = "tfds", built["faces"]
  c.num_steps, c.recon_every, c.log_every = 4, 0, 2
  pretrain.train_and_evaluate(c, str(tmp_path / "mae"))
  _assert_same_params(tmp_path / "mae", mae_workdir)


def test_finetuning_from_frames_equals_the_folder_run(built, mae_workdir, finetune_workdir, tmp_path):
  c = expr_finetune.get_config("tiny")
  c.data.root, c.data.image_size = str(tmp_path / "no_tree"), IMAGE
  c.data.source, c.data.tfds_dir = "tfds", built["frames"]
  c.batch_size, c.eval_batch_size = 16, 64
  c.num_steps, c.log_every, c.eval_every_epochs = 4, 2, 100.0
  c.init.mae_workdir = str(mae_workdir)
  result = finetune.train_and_evaluate(c, str(tmp_path / "ft"))
  _assert_same_params(tmp_path / "ft", finetune_workdir)
  assert result["best"] == checkpoint.read_best(finetune_workdir)


def test_extraction_from_frames_equals_the_folder_features(built, finetune_workdir, extracted, tmp_path):
  _, paths, _ = extracted
  c = extract_config_for(tmp_path / "no_tree", finetune_workdir)
  c.data.source, c.data.tfds_dir, c.audio = "tfds", built["frames"], False
  got = features.FeatureStore(extract.run(c, str(tmp_path / "features"))["visual"])
  want = features.FeatureStore(paths["visual"])
  assert got.videos() == want.videos()
  for video in want.videos():
    np.testing.assert_array_equal(got.read(video), want.read(video))
    for key in ("repaired_frames", "frames_without_image"):
      assert got.meta(video)[key] == want.meta(video)[key]
  # A rerun recognises every video as done from the dataset's per-video hash.
  logs = []
  extract.run(c, str(tmp_path / "features"), log=logs.append)
  assert any(f"{len(want.videos())} of {len(want.videos())} videos already complete" in m for m in logs)


def test_a_tfds_config_needs_its_dataset(tmp_path):
  c = expr_finetune.get_config("tiny")
  c.data.source = "tfds"
  with pytest.raises(ValueError, match="config.data.source='tfds' needs config.data.tfds_dir"):
    finetune.expr_records(c, affwild2.TRAIN_SET)
  c.data.source = "bucket"
  with pytest.raises(ValueError, match=r"config.data.source: unknown 'bucket' \(folders \| tfds\)"):
    finetune.expr_records(c, affwild2.TRAIN_SET)
