"""Per-frame predictions in the ABAW submission format, plus a plot for one video.

  python launch/predict.py --out_dir=/tmp/sub --va=/tmp/va --expr=/tmp/expr --au=/tmp/au \
      --split=Test_Set --plot_video=video5
"""

from absl import app, flags

from affect_jax import hostenv, sharding

_OUT = flags.DEFINE_string("out_dir", None, "Where the CSVs (and plots) go.", required=True)
_VA = flags.DEFINE_string("va", "", "Workdir of a trained VA temporal model.")
_EXPR = flags.DEFINE_string("expr", "", "Workdir of a trained Expr temporal model.")
_AU = flags.DEFINE_string("au", "", "Workdir of a trained AU temporal model.")
_SPLIT = flags.DEFINE_enum("split", "Test_Set", ["Train_Set", "Validation_Set", "Test_Set"], "Split.")
_STRIDE = flags.DEFINE_integer("stride", 0, "Window stride at prediction (0: the config's; "
                               "the segment length reproduces the authors' no-overlap setting).")
_PLOT = flags.DEFINE_string("plot_video", "", "Also plot predictions vs labels for this video.")


def main(argv):
  del argv
  sharding.join()
  from affect_jax import fileio, predict
  from affect_jax.train import loop
  loop.init_launcher()
  workdirs = {t: w for t, w in (("VA", _VA.value), ("EXPR", _EXPR.value), ("AU", _AU.value)) if w}
  if not workdirs:
    raise app.UsageError("give at least one of --va, --expr, --au")
  for task, path in predict.write_submission(_OUT.value, workdirs, _SPLIT.value,
                                             _STRIDE.value or None).items():
    print(f"{task}: {path}")
  if _PLOT.value:
    for task, workdir in workdirs.items():
      png = fileio.path(_OUT.value) / f"{task}_{_PLOT.value}.png"
      if predict.plot_run_video(png, workdir, _SPLIT.value, _PLOT.value,
                                stride=_STRIDE.value or None):
        print(f"plot: {png}")
      else:
        print(f"{task}: {_PLOT.value} is not among its {_SPLIT.value} videos: no plot")

if __name__ == "__main__":
  hostenv.configure()
  app.run(main)
