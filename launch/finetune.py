"""Fine-tunes the MAE encoder on expression frames; keeps the best state by macro-F1.

  python launch/finetune.py --config=configs/expr_finetune.py:tiny --workdir=/tmp/ft \
      --config.init.mae_workdir=/tmp/mae --config.data.root=/tmp/affect_jax/demo/data
"""

from absl import app, flags
from ml_collections import config_flags

from affect_jax import hostenv, sharding

_CONFIG = config_flags.DEFINE_config_file("config", "configs/expr_finetune.py:tiny", "Task config.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, logs, best state.", required=True)


def main(argv):
  del argv
  sharding.join()
  from affect_jax.train import finetune, loop
  loop.init_launcher()
  out = finetune.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  best = out["best"]
  print(f"best validation macro-F1 {best['value']:.4f} at step {best['step']} "
        f"(state in {_WORKDIR.value}/best)")


if __name__ == "__main__":
  hostenv.configure()
  app.run(main)
