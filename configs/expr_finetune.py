"""Fine-tuning the MAE encoder on Aff-Wild2 expression frames (the per-frame feature extractor).

  python launch/finetune.py --config=configs/expr_finetune.py:tiny --workdir=/tmp/ft \
      --config.init.mae_workdir=/tmp/mae --config.data.root=/tmp/affect_jax/demo/data

The MAE fine-tuning recipe (layer-wise lr decay, drop-path, label smoothing, Mixup/CutMix,
warmup + cosine); the authors: ViT-B/16, batch 256, lr 1e-4. `init.kind`: 'mae' (a pretraining
workdir), 'converted' (params from launch/convert_weights.py), 'random' (the ablation).
"""

import ml_collections

from affect_jax import sharding
from configs import common


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
  preset = arg or "tiny"
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.init = ml_collections.ConfigDict()
  c.init.kind = "mae"
  c.init.mae_workdir = ""  # launch/pretrain.py --workdir
  c.init.params_path = ""  # launch/convert_weights.py --output (model=vit)

  c.model = ml_collections.ConfigDict()
  c.model.variant = preset
  c.model.pool = "mean"  # 'mean' (MAE fine-tuning's global pool + fc_norm) or 'cls'
  # 'sincos' (MAE's fixed table) or 'learned' (converted timm ViT weights with their own table)
  c.model.pos_embed = "sincos"
  c.model.drop_path_rate = 0.1
  # c.model.dtype, c.model.remat, c.grad_accum_steps, c.mesh_shape: common.set_vit_scale.
  c.model.kernels = "auto"  # affect_jax.models.layers.KERNELS

  c.data = common.get_data_config()
  common.add_image_loader(c.data)
  c.data.image_size = 224
  # Light cropping: faces are already aligned crops.
  common.add_augmentation(c.data, crop_scale=(0.7, 1.0))

  c.batch_size = 256
  c.eval_batch_size = 256
  c.num_epochs = 10
  c.num_steps = -1  # > 0 overrides num_epochs
  c.warmup_epochs = 1
  c.label_smoothing = 0.1
  # Mixup / CutMix (Beta alphas; 0 = off) as in the MAE fine-tuning recipe (0.8 / 1.0, one
  # of the two per batch with probability mix_switch_prob for CutMix).
  c.mixup = 0.8
  c.cutmix = 1.0
  c.mix_switch_prob = 0.5
  c.class_weighting = "none"  # 'none' | 'inverse' | 'sqrt_inverse' (train-set frequencies)
  # MAE fine-tuning's value; for the tiny ViT too (0.75 and 0.9 did worse on the demo's validation).
  c.layer_decay = 0.65
  c.optim = ml_collections.ConfigDict(dict(
      name="adamw", lr=1e-4, base_lr=None, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.05,
      schedule="cosine", min_lr=1e-6, init_lr=0.0, grad_clip=0.0))

  c.axis_rules = sharding.DEFAULT_RULES
  c.log_every = 50
  c.eval_every_epochs = 1.0
  c.checkpoint_every = 1000
  c.max_to_keep = 2
  c.resume = True

  if preset == "tiny":
    c.data.image_size = 64
    c.batch_size = 64
    c.eval_batch_size = 128
    c.num_epochs = 3
    c.optim.lr = 1e-3
    c.mixup = c.cutmix = 0.0  # a few hundred steps on CPU: no room for heavy regularisation
    c.log_every = 20
    c.checkpoint_every = 200
  elif preset not in ("base", "large", "huge"):
    raise ValueError(f"unknown preset {preset!r}: use tiny, base, large or huge")
  common.set_vit_scale(c, preset)
  return c
