"""Small trained artefacts shared by the stage tests: an MAE pretraining run and an
expression fine-tuning run on the tiny synthetic dataset (a few steps each)."""

import pytest

from affect_jax.train import finetune, pretrain
from configs import expr_finetune, mae_pretrain

IMAGE = 32


@pytest.fixture(scope="session")
def mae_workdir(synthetic_root, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("mae")
  c = mae_pretrain.get_config("tiny")
  c.data.root, c.data.image_size, c.batch_size = str(synthetic_root), IMAGE, 16
  c.data.index_cache = str(workdir / "index")
  c.num_steps, c.recon_every, c.log_every = 4, 0, 2
  pretrain.train_and_evaluate(c, str(workdir))
  return workdir


@pytest.fixture(scope="session")
def finetune_workdir(synthetic_root, mae_workdir, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("finetune")
  c = expr_finetune.get_config("tiny")
  c.data.root, c.data.image_size = str(synthetic_root), IMAGE
  c.batch_size, c.eval_batch_size = 16, 64
  c.num_steps, c.log_every, c.eval_every_epochs = 4, 2, 100.0
  c.init.mae_workdir = str(mae_workdir)
  finetune.train_and_evaluate(c, str(workdir))
  return workdir


def extract_config_for(root, encoder_workdir):
  from configs import extract as extract_config
  c = extract_config.get_config()
  c.data.root = str(root)
  c.encoder_workdir = str(encoder_workdir)
  c.batch_size = 64
  c.feature_dtype = "float32"
  return c


@pytest.fixture(scope="session")
def extracted(synthetic_root, finetune_workdir, tmp_path_factory):
  """(out_dir, {'visual': path, 'audio': path}, log lines) of features of every video."""
  from affect_jax.train import extract
  out = tmp_path_factory.mktemp("features")
  logs = []
  paths = extract.run(extract_config_for(synthetic_root, finetune_workdir), str(out), log=logs.append)
  return out, paths, logs
