"""Public PyTorch MAE / timm ViT weights (.safetensors or .npz) -> orbax params.

  python launch/convert_weights.py --input=mae_pretrain_vit_base.safetensors \
      --model=vit --preset=base --output=/tmp/mae_vit_base
  python launch/convert_weights.py --input=mae_visualize_vit_base.safetensors \
      --model=mae --preset=base --output=/tmp/mae_base

`--model=vit` with `--pool=mean --num_classes=N` takes a fine-tuned (global-pool) checkpoint.
A timm ViT with a learned `pos_embed` converts to `pos_embed='learned'` (detected; resampled to
`--image_size` when given): fine-tune it with `--config.model.pos_embed=learned`.
"""

from absl import app, flags

from affect_jax.models import convert

_INPUT = flags.DEFINE_string("input", None, "State dict as .safetensors or .npz.", required=True)
_OUTPUT = flags.DEFINE_string("output", None, "Directory for the orbax params.", required=True)
_MODEL = flags.DEFINE_enum("model", "mae", ["mae", "vit"],
                           "MaskedAutoencoder (encoder + decoder) or VisionTransformer.")
_PRESET = flags.DEFINE_string("preset", "base", "Size preset (affect_jax.models.vit.VARIANTS).")
_POOL = flags.DEFINE_enum("pool", "cls", ["cls", "mean"], "VisionTransformer pooling.")
_NUM_CLASSES = flags.DEFINE_integer("num_classes", 0, "VisionTransformer head size (0: none).")
_POS_EMBED = flags.DEFINE_enum("pos_embed", "auto", ["auto", "sincos", "learned"],
                               "--model=vit: position table; auto: learned when the checkpoint's "
                               "is not MAE's fixed sin-cos one.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 0, "A learned table is resampled to this image "
                                   "size (0: the checkpoint's).")


def main(argv):
  del argv
  overrides = {}
  if _MODEL.value == "vit":
    overrides = dict(pool=_POOL.value, num_classes=_NUM_CLASSES.value)
  params = convert.convert_checkpoint(_INPUT.value, _MODEL.value, _PRESET.value,
                                      pos_embed=_POS_EMBED.value if _MODEL.value == "vit" else "sincos",
                                      image_size=_IMAGE_SIZE.value or None, **overrides)
  convert.save_params(params, _OUTPUT.value)


if __name__ == "__main__":
  app.run(main)
