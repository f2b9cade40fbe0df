"""MAE self-pretraining on face images.

  python launch/pretrain.py --config=configs/mae_pretrain.py:tiny --workdir=/tmp/mae \
      --config.data.roots=/tmp/affect_jax/synthetic/cropped_aligned

`:tiny` trains on a CPU (tests, the demo); `:base` is the paper's ViT-B/16 at 224 (the
authors: AffectNet + RAF-DB + FER2013 + FER+, 500 epochs, batch 1024, AdamW lr 5e-4);
`:large`, `:huge` are the bigger MAE sizes.
"""

import ml_collections

from affect_jax import sharding
from configs import common


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
  preset = arg or "tiny"
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.model = ml_collections.ConfigDict()
  c.model.variant = preset  # a key of affect_jax.models.vit.VARIANTS
  c.model.mask_ratio = 0.75
  c.model.norm_pix_loss = True
  c.model.drop_path_rate = 0.0
  # c.model.dtype, c.model.remat, c.grad_accum_steps, c.mesh_shape: common.set_vit_scale.
  # Backend kernels (affect_jax.models.layers): "auto" = the XLA:CPU kernels on a CPU host,
  # stock XLA elsewhere; "xla", "cudnn" (cuDNN's attention on a GPU), "cpu".
  c.model.kernels = "auto"

  c.data = common.get_data_config()
  common.add_image_loader(c.data)
  # Comma-separated folder trees of face images; empty means <data.root>/cropped_aligned.
  c.data.roots = ""
  c.data.image_size = 224
  common.add_augmentation(c.data, crop_scale=(0.2, 1.0))
  c.data.index_cache = "~/.cache/affect_jax/face_index"

  c.batch_size = 1024  # global, over all hosts and devices
  c.num_epochs = 500
  c.num_steps = -1  # > 0 overrides num_epochs
  c.warmup_epochs = 40
  c.optim = ml_collections.ConfigDict(dict(
      name="adamw", lr=None, base_lr=1.25e-4,  # 5e-4 at batch 1024: lr = base_lr * batch / 256
      b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.05, schedule="cosine", min_lr=0.0,
      init_lr=0.0, grad_clip=0.0))

  c.axis_rules = sharding.DEFAULT_RULES
  c.log_every = 50
  c.checkpoint_every = 1000
  c.max_to_keep = 3
  c.recon_every = 5000  # PNG of original / masked / reconstruction; 0 = never
  c.resume = True  # continue from the latest checkpoint in --workdir

  if preset == "tiny":
    c.data.image_size = 64
    c.batch_size = 64
    c.num_epochs = 10
    c.warmup_epochs = 1
    c.optim.base_lr = 1.5e-4 * 16  # a short run needs a hotter lr than the 800-epoch recipe
    c.log_every = 20
    c.checkpoint_every = 200
    c.recon_every = 200
  elif preset not in ("base", "large", "huge"):
    raise ValueError(f"unknown preset {preset!r}: use tiny, base, large or huge")
  common.set_vit_scale(c, preset)
  return c
