"""Writes the synthetic Aff-Wild2 dataset.

  python launch/make_synthetic.py --out_dir=/tmp/affect_jax/synthetic --num_videos=30
"""

import time

from absl import app, flags

from affect_jax.data import synthetic
from configs import common

_DEFAULTS = synthetic.SyntheticConfig()
_OUT_DIR = flags.DEFINE_string("out_dir", common.DEFAULT_SYNTHETIC_ROOT, "Dataset root to write.")
_NUM_VIDEOS = flags.DEFINE_integer("num_videos", _DEFAULTS.num_videos, "Videos; a _left/_right pair is two.")
_MIN_FRAMES = flags.DEFINE_integer("min_frames", _DEFAULTS.min_frames, "Shortest video, frames.")
_MAX_FRAMES = flags.DEFINE_integer("max_frames", _DEFAULTS.max_frames, "Longest video, frames.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", _DEFAULTS.image_size, "Side of the square crops, pixels.")
_FPS = flags.DEFINE_float("fps", _DEFAULTS.fps, "Frame rate.")
_SEED = flags.DEFINE_integer("seed", _DEFAULTS.seed, "Same seed, byte-identical dataset.")


def main(argv):
  del argv
  config = synthetic.SyntheticConfig(
      num_videos=_NUM_VIDEOS.value, min_frames=_MIN_FRAMES.value, max_frames=_MAX_FRAMES.value,
      image_size=_IMAGE_SIZE.value, fps=_FPS.value, seed=_SEED.value)
  start = time.perf_counter()
  synthetic.generate(_OUT_DIR.value, config)
  elapsed = time.perf_counter() - start
  print(synthetic.summarize(_OUT_DIR.value))
  print(f"written in {elapsed:.1f} s")


if __name__ == "__main__":
  app.run(main)
