"""The main job (the README's first command): the method end to end on synthetic data.

  python launch/demo.py --out_dir=/tmp/affect_jax/demo [--preset=default|micro|full]
      [--mae=auto|shipped|scratch]

`--mae=scratch` self-pretrains the MAE here (face corpus, pretraining, export to
<out_dir>/mae_weights/, the file affect_jax/weights/ ships) instead of starting from the
shipped weights.
"""

from absl import app, flags, logging

from affect_jax import hostenv

_OUT_DIR = flags.DEFINE_string("out_dir", "/tmp/affect_jax/demo", "Everything is written here.")
_PRESET = flags.DEFINE_enum("preset", "default", ["micro", "default", "full"], "Size of the run.")
_MAE = flags.DEFINE_enum("mae", "auto", ["auto", "shipped", "scratch"],
                         "MAE weights: shipped with affect-jax, or self-pretrained here; auto = "
                         "shipped where the preset has them.")


def main(argv):
  del argv
  from affect_jax import demo
  from affect_jax.train import loop
  loop.quiet_library_logs()
  loop.enable_compilation_cache()
  if logging.get_verbosity() <= logging.INFO and not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # one line per stage; --verbosity=0 for the rest
  demo.run(_OUT_DIR.value, _PRESET.value, mae=_MAE.value)


if __name__ == "__main__":
  hostenv.configure()
  app.run(main)
