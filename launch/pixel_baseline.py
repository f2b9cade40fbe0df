"""Per-frame linear baseline on downsampled pixels, scored beside the oracle (headroom check).

  python launch/pixel_baseline.py --data_root=/tmp/affect_jax/synthetic

With --features_out=DIR it writes the pixels as a visual feature store instead, for the
temporal models (what they make of features that do carry per-frame affect):

  python launch/pixel_baseline.py --data_root=D --features_out=/tmp/pixel_features
  python launch/train_temporal.py --config=configs/va.py:tiny --workdir=/tmp/va_pixels \
      --config.data.root=D --config.data.visual_features=/tmp/pixel_features/visual
"""

import json
import os

from absl import app, flags

from affect_jax import hostenv, tasks
from configs import common

_ROOT = flags.DEFINE_string("data_root", common.DEFAULT_SYNTHETIC_ROOT, "Aff-Wild2 tree.")
_SPLIT = flags.DEFINE_string("split", "Validation_Set", "Split to score.")
_SIZE = flags.DEFINE_integer("pixels", 12, "Frames are downsampled to pixels x pixels x 3.")
_FEATURES_OUT = flags.DEFINE_string(
    "features_out", "", "Write the pixels of every frame as a visual feature store here.")


def main(argv):
  del argv
  from affect_jax import pixel_baseline
  if _FEATURES_OUT.value:
    path = pixel_baseline.write_feature_store(_ROOT.value, _FEATURES_OUT.value, _SIZE.value)
    print(f"pixel features: {path}")
    return
  scores = pixel_baseline.evaluate(_ROOT.value, _SPLIT.value, _SIZE.value)
  oracle_path = os.path.join(_ROOT.value, "oracle.json")
  oracle = json.load(open(oracle_path)) if os.path.exists(oracle_path) else {}
  for task, s in scores.items():
    key = tasks.get(task).main_metric
    bound = oracle.get(task, {}).get(_SPLIT.value, {}).get(key)
    print(f"{task:4s} {_SPLIT.value}: linear pixels {s[key]:.3f} (l2 {s['l2']:g})"
          + (f"   oracle {bound:.3f}" if bound is not None else ""))


if __name__ == "__main__":
  hostenv.configure()
  app.run(main)
