"""Run this first on a new GPU/TPU host: the sharded step against one device, both kernel
sets, the MAE ViT-B/16 bf16 step (img/s, MFU), attention per implementation and a short
tiny pretraining; one JSON line of results (see affect_jax/accelerator.py).

  pip install -e '.[cuda]'     # or '.[tpu]'
  python launch/check_accelerator.py [--preset=base --batch=256] [--profile_dir=DIR]
"""

import json

from absl import app, flags

from affect_jax import hostenv

_PRESET = flags.DEFINE_string("preset", "base", "MAE size for the step benchmark.")
_BATCH = flags.DEFINE_integer("batch", 0, "Global batch of the step benchmark (0: by device "
                             "memory, 32 per CPU device, 64-256 per GPU/TPU).")
_BENCH_STEPS = flags.DEFINE_integer("bench_steps", 10, "Timed steps of the step benchmark.")
_PRETRAIN_STEPS = flags.DEFINE_integer("pretrain_steps", 50, "Steps of the tiny pretraining.")
_SKIP = flags.DEFINE_list("skip", [], "Checks to leave out: sharded_steps, kernel_sets, "
                          "mae_step, mae_step_cudnn, attention, device_augmentation, "
                          "tiny_pretraining.")
_OUT = flags.DEFINE_string("out", "", "Also write the JSON line to this file.")
_PROFILE_DIR = flags.DEFINE_string("profile_dir", "", "Also trace a few MAE steps here (a "
                                   "Perfetto trace and the compiled HLO per step check) and "
                                   "list their costliest XLA operations in the results.")


def main(argv):
  del argv
  from affect_jax import accelerator, fileio
  from affect_jax.train import loop
  from configs import mae_pretrain
  loop.init_launcher()  # quiet library logs (orbax would bury the results), compilation cache
  result = accelerator.run(mae_pretrain.get_config(_PRESET.value),
                           tiny_config=mae_pretrain.get_config("tiny"), batch=_BATCH.value,
                           bench_steps=_BENCH_STEPS.value, pretrain_steps=_PRETRAIN_STEPS.value,
                           skip=tuple(_SKIP.value), profile_dir=_PROFILE_DIR.value or None)
  line = json.dumps(result, default=str)
  print(line)
  if _OUT.value:
    fileio.write_text_atomic(_OUT.value, line + "\n")
  failed = accelerator.failures(result)
  if failed:
    raise SystemExit(f"checks that failed: {', '.join(failed)}")


if __name__ == "__main__":
  hostenv.configure()
  app.run(main)
