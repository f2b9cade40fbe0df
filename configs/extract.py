"""Per-frame feature extraction: visual (the fine-tuned encoder) and audio (frame clock).

  python launch/extract.py --config=configs/extract.py --workdir=/tmp/features \
      --config.encoder_workdir=/tmp/ft --config.data.root=/tmp/affect_jax/demo/data
"""

import dataclasses

import ml_collections

from affect_jax.data import audio
from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  del arg
  c = ml_collections.ConfigDict()
  c.data = common.get_data_config()
  common.add_image_loader(c.data)
  c.data.image_size = 0  # 0: the encoder's training image size
  # A fine-tuning workdir (launch/finetune.py; its best state) or, with encoder_kind='mae',
  # a pretraining workdir (the MAE encoder as it is, for the ablation without fine-tuning).
  c.encoder_workdir = ""
  c.encoder_kind = "finetuned"
  c.feature_dtype = "float16"
  c.batch_size = 256
  c.mesh_shape = (-1, 1, 1)
  c.visual = True
  c.audio = True
  c.audio_features = dataclasses.asdict(audio.AudioFeatureConfig())
  # A WAV shorter than its video leaves the frames past its end silent (counted in the store
  # as frames_without_audio, with a warning); covering less than this fraction is an error.
  c.min_audio_coverage = 0.5
  c.test_split = True  # also every video of the tasks' test lists
  return c
