"""Fields every stage shares: where the dataset lives and what it looks like.

Task configs call `get_data_config()` and override fields, e.g.
`--config.data.root=/path/to/affwild2`.
"""

import ml_collections

# Where launchers write (and read) the embedded synthetic dataset when no root is given.
DEFAULT_SYNTHETIC_ROOT = "/tmp/affect_jax/synthetic"


def get_data_config() -> ml_collections.ConfigDict:
  data = ml_collections.ConfigDict()
  # An Aff-Wild2 tree (cropped_aligned/, *_Challenge/, audio/) - real or synthetic.
  data.root = DEFAULT_SYNTHETIC_ROOT
  # Frames per second of the videos (Aff-Wild2 is mostly 30; the synthetic set's default).
  data.fps = 30.0
  # Pixel size frames are resized to before they enter a model.
  data.image_size = 112
  return data
