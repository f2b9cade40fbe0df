"""The main job (the README's first command): the method end to end on synthetic data.

  python launch/demo.py --out_dir=/tmp/affect_jax/demo [--preset=default|micro|full]
      [--mae=auto|shipped|scratch]
  python launch/demo.py --config=configs/demo.py:default --config.stages.finetune.num_steps=3000

The experiment is configs/demo.py (`--preset` picks one of its presets; `--config` takes the
file with overrides instead). `--mae=scratch` self-pretrains the MAE here (face corpus,
pretraining, export to <out_dir>/mae_weights/, the file affect_jax/weights/ ships) instead of
starting from the shipped weights. `--readme=README.md` puts the printed tables into that
file's demo-results block.
"""

from absl import app, flags, logging
from ml_collections import config_flags

from affect_jax import hostenv

_OUT_DIR = flags.DEFINE_string("out_dir", "/tmp/affect_jax/demo", "Everything is written here.")
_PRESET = flags.DEFINE_enum("preset", "default", ["micro", "default", "full"],
                            "Size of the run: configs/demo.py's preset.")
_CONFIG = config_flags.DEFINE_config_file("config", None, "The demo's config file, e.g. "
                                          "configs/demo.py:micro (instead of --preset).")
_MAE = flags.DEFINE_enum("mae", "auto", ["auto", "shipped", "scratch"],
                         "MAE weights: shipped with affect-jax, or self-pretrained here; auto = "
                         "shipped where the preset has them.")
_README = flags.DEFINE_string("readme", "", "Also write the tables into this file, between "
                              "its demo-results markers.")


def main(argv):
  del argv
  from affect_jax import demo
  from affect_jax.train import loop
  from configs import demo as demo_config
  loop.init_launcher()
  if logging.get_verbosity() <= logging.INFO and not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # one line per stage; --verbosity=0 for the rest
  if _CONFIG.value is not None and flags.FLAGS["preset"].present:
    raise app.UsageError("give --preset or --config, not both")
  config = _CONFIG.value if _CONFIG.value is not None else demo_config.get_config(_PRESET.value)
  out = demo.run(_OUT_DIR.value, config, mae=_MAE.value)
  if _README.value:
    demo.update_readme(_README.value, out["results_md"])
    print(f"tables written into {_README.value}")


if __name__ == "__main__":
  hostenv.configure()
  app.run(main)
