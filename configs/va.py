"""Temporal model for the VA task (the paper's recipe; see configs/common.py).

  python launch/train_temporal.py --config=configs/va.py:paper --workdir=/tmp/va \
      --config.data.visual_features=/tmp/features/visual
"""

from configs import common


def get_config(arg: str = "paper"):
  return common.get_temporal_config("VA", arg or "paper")
