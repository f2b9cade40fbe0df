"""Temporal model for the EXPR task (the paper's recipe; see configs/common.py).

  python launch/train_temporal.py --config=configs/expr.py:paper --workdir=/tmp/expr \
      --config.data.visual_features=/tmp/features/visual
"""

from configs import common


def get_config(arg: str = "paper"):
  return common.get_temporal_config("EXPR", arg or "paper")
