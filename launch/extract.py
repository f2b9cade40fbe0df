"""Extracts per-frame visual and audio features of every video into feature stores.

  python launch/extract.py --workdir=/tmp/features --config.encoder_workdir=/tmp/ft \
      --config.data.root=/tmp/affect_jax/demo/data
"""

from absl import app, flags
from ml_collections import config_flags

from affect_jax import hostenv, sharding

_CONFIG = config_flags.DEFINE_config_file("config", "configs/extract.py", "Extraction config.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Feature stores go to <workdir>/{visual,audio}.",
                               required=True)


def main(argv):
  del argv
  sharding.join()
  from affect_jax.train import extract, loop
  loop.init_launcher()
  for kind, path in extract.run(_CONFIG.value, _WORKDIR.value).items():
    print(f"{kind} features: {path}")


if __name__ == "__main__":
  hostenv.configure()
  app.run(main)
