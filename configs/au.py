"""Temporal model for the AU task (the paper's recipe; see configs/common.py).

  python launch/train_temporal.py --config=configs/au.py:paper --workdir=/tmp/au \
      --config.data.visual_features=/tmp/features/visual
"""

from configs import common


def get_config(arg: str = "paper"):
  return common.get_temporal_config("AU", arg or "paper")
