"""The main job (the README's first command): the method end to end on synthetic data.

  python launch/demo.py --out_dir=/tmp/affect_jax/demo
"""

from absl import app, flags

_OUT_DIR = flags.DEFINE_string("out_dir", "/tmp/affect_jax/demo", "Everything is written here.")
_PRESET = flags.DEFINE_enum("preset", "default", ["micro", "default"], "Size of the run.")


def main(argv):
  del argv
  from affect_jax import demo
  demo.run(_OUT_DIR.value, _PRESET.value)


if __name__ == "__main__":
  app.run(main)
