"""Public PyTorch weights -> affect-jax: MAE / ViT encoders (facebookresearch/mae, timm,
Hugging Face) to orbax params, the authors' temporal models to a run workdir.

  python launch/convert_weights.py --input=mae_pretrain_vit_base.pth \
      --model=vit --preset=base --output=/tmp/mae_vit_base
  python launch/convert_weights.py --input=mae_visualize_vit_base.safetensors \
      --model=mae --preset=base --output=/tmp/mae_base
  python launch/convert_weights.py --input=va_fold0.pt --model=temporal --task=VA \
      --visual_features=/tmp/features/visual --output=/tmp/va_authors

`--model=vit` with `--pool=mean --num_classes=N` takes a fine-tuned (global-pool) checkpoint.
A timm ViT with a learned `pos_embed` converts to `pos_embed='learned'` (detected; resampled to
`--image_size` when given): fine-tune it with `--config.model.pos_embed=learned`.

`--model=temporal` reads the authors' checkpoints (upczww/abaw6, `module.` prefix allowed) into
the `paper` preset of `--task` and writes a run workdir that launch/predict.py and
launch/analyze_video.py take (`--va=/tmp/va_authors`); `--visual_features` names the feature
store it predicts from (768-d features of the authors' fine-tuned MAE).
"""

from absl import app, flags

from affect_jax.models import convert

_INPUT = flags.DEFINE_string("input", None, "State dict: .safetensors, .npz or a torch.save file "
                             "(.pth/.pt/.bin/.ckpt, read without torch).", required=True)
_OUTPUT = flags.DEFINE_string("output", None, "Directory for the orbax params (temporal: the run "
                              "workdir).", required=True)
_MODEL = flags.DEFINE_enum("model", "mae", ["mae", "vit", "temporal"],
                           "MaskedAutoencoder (encoder + decoder), VisionTransformer, or the "
                           "authors' temporal model.")
_TASK = flags.DEFINE_enum("task", None, ["VA", "EXPR", "AU"], "--model=temporal: its task.")
_VISUAL = flags.DEFINE_string("visual_features", "", "--model=temporal: the feature store it "
                              "predicts from (config.data.visual_features).")
_NUM_HEADS = flags.DEFINE_integer("num_heads", 4, "--model=temporal: attention heads (shapes do "
                                  "not say; the authors' configs use 4).")
_PRESET = flags.DEFINE_string("preset", "base", "Size preset (affect_jax.models.vit.VARIANTS).")
_POOL = flags.DEFINE_enum("pool", "cls", ["cls", "mean"], "VisionTransformer pooling.")
_NUM_CLASSES = flags.DEFINE_integer("num_classes", 0, "VisionTransformer head size (0: none).")
_POS_EMBED = flags.DEFINE_enum("pos_embed", "auto", ["auto", "sincos", "learned"],
                               "--model=vit: position table; auto: learned when the checkpoint's "
                               "is not MAE's fixed sin-cos one.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 0, "A learned table is resampled to this image "
                                   "size (0: the checkpoint's).")


def _temporal():
  from affect_jax.models import convert, temporal
  from affect_jax.train import temporal as temporal_train
  from configs import common
  if not _TASK.value:
    raise app.UsageError("--model=temporal needs --task=VA|EXPR|AU")
  config = common.get_temporal_config(_TASK.value, "paper")
  config.data.visual_features = _VISUAL.value
  config.model.num_heads = _NUM_HEADS.value  # the saved config rebuilds the model it converts to
  variables = temporal.params_from_torch_state_dict(convert.load_state_dict(_INPUT.value),
                                                    num_heads=_NUM_HEADS.value)
  temporal_train.import_weights(config, variables, _OUTPUT.value, _INPUT.value)
  print(f"{_INPUT.value}: the {_TASK.value} temporal model ('paper' preset) -> run workdir "
        f"{_OUTPUT.value}")


def main(argv):
  del argv
  if _MODEL.value == "temporal":
    return _temporal()
  overrides = {}
  if _MODEL.value == "vit":
    overrides = dict(pool=_POOL.value, num_classes=_NUM_CLASSES.value)
  params = convert.convert_checkpoint(_INPUT.value, _MODEL.value, _PRESET.value,
                                      pos_embed=_POS_EMBED.value if _MODEL.value == "vit" else "sincos",
                                      image_size=_IMAGE_SIZE.value or None, **overrides)
  convert.save_params(params, _OUTPUT.value)


if __name__ == "__main__":
  app.run(main)
