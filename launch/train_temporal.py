"""Trains the temporal model of one task on extracted features (one fold, or all five).

  python launch/train_temporal.py --config=configs/va.py:paper --workdir=/tmp/va \
      --config.data.root=/path/to/affwild2 --config.data.visual_features=/tmp/features/visual
  ... --config.cross_validate=True      # folds 0-4, table of mean +- std
"""

import json

from absl import app, flags
from ml_collections import config_flags

from affect_jax import hostenv, sharding

_CONFIG = config_flags.DEFINE_config_file("config", "configs/va.py:paper", "Task config.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, logs, results.", required=True)


def main(argv):
  del argv
  sharding.join()
  from affect_jax.train import loop, temporal
  loop.init_launcher()
  config = _CONFIG.value
  if config.cross_validate:
    print(temporal.cross_validate(config, _WORKDIR.value)["table"])
  else:
    out = temporal.train_and_evaluate(config, _WORKDIR.value)
    print(json.dumps({k: out[k] for k in ("task", "fold", "best_step", "val") + (("test",) if "test" in out else ())}))


if __name__ == "__main__":
  hostenv.configure()
  app.run(main)
