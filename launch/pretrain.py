"""MAE self-pretraining on face images.

  python launch/pretrain.py --config=configs/mae_pretrain.py:tiny --workdir=/tmp/mae \
      --config.data.roots=/tmp/affect_jax/synthetic/cropped_aligned
"""

from absl import app, flags
from ml_collections import config_flags

from affect_jax import hostenv, sharding

_CONFIG = config_flags.DEFINE_config_file("config", "configs/mae_pretrain.py:tiny", "Task config.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, logs and pictures go here.", required=True)


def main(argv):
  del argv
  sharding.join()
  from affect_jax.train import loop, pretrain  # after distributed init: they touch jax
  loop.init_launcher()
  pretrain.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  hostenv.configure()
  app.run(main)
