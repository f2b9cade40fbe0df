"""Builds the ArrayRecord TFDS datasets the loaders read with config.data.source='tfds'.

  # Aff-Wild2 (licence-gated: its unpacked tree is the manual_dir), or the synthetic set:
  python launch/build_tfds.py --dataset=aff_wild2_frames --manual_dir=/data/affwild2 \
      --data_dir=/data/tfds
  # a face corpus for pretraining, one or more folder trees mixed into one dataset:
  python launch/build_tfds.py --dataset=face_images --roots=/data/affectnet,/data/rafdb \
      --data_dir=/data/tfds
  # the same, stored decoded (RGB 112 x 112) beside it, in <data_dir>/<dataset>/rgb112/<version>:
  python launch/build_tfds.py --dataset=face_images --roots=/data/affectnet,/data/rafdb \
      --data_dir=/data/tfds --pixels=112

--pixels=S stores each image decoded to RGB S x S (resized bicubic: a non-square image is
squashed) instead of the file's bytes: for hosts feeding accelerators, where decoding (every
image, every epoch) costs more CPU than reading; it takes S*S*3 bytes per image
(37.6 KB at 112 against ~5 KB of JPEG). A file that cannot be decoded is stored empty, listed
in the dataset's metadata and skipped by the loaders.

Prints the dataset directory (<data_dir>/<dataset>/[rgb<S>/]<version>) to pass as
--config.data.tfds_dir (aff_wild2_frames) or in --config.data.roots (pretraining). A
finished build of the same files is kept (one of changed files is refused unless --overwrite);
an interrupted one leaves nothing half-written and is redone.
"""

from absl import app, flags, logging

from affect_jax.data import affwild2, tfds_builders

_DATASET = flags.DEFINE_enum("dataset", tfds_builders.AFFWILD2_FRAMES, sorted(tfds_builders.BUILDERS),
                             "What to build.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Where TFDS writes: a filesystem path "
                                "(ArrayRecord does not open gs:// URLs; mount a bucket).",
                                required=True)
_MANUAL_DIR = flags.DEFINE_string("manual_dir", None, "aff_wild2_frames: the Aff-Wild2 tree; "
                                  "face_images: one root (or use --roots).")
_ROOTS = flags.DEFINE_list("roots", [], "face_images: folder trees of face images, mixed.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Rebuild a dataset whose source files changed "
                                "since it was built (otherwise refused).")
_MAX_UNMATCHED = flags.DEFINE_float("max_unmatched_frames", affwild2.MAX_UNMATCHED_FRAMES,
                                    "aff_wild2_frames: as config.data.max_unmatched_frames.")
_PIXELS = flags.DEFINE_integer("pixels", 0, "0: store the files' bytes (decoded by the loaders); "
                               f"S >= {tfds_builders.MIN_PIXELS}: store the images decoded, RGB "
                               "S x S, in the config rgb<S>.", lower_bound=0)


def main(argv):
  del argv
  kwargs = {}
  if _DATASET.value == tfds_builders.FACE_IMAGES:
    if not (_ROOTS.value or _MANUAL_DIR.value):
      raise app.UsageError("face_images needs --roots (or --manual_dir)")
    kwargs["roots"] = _ROOTS.value
  else:
    if not _MANUAL_DIR.value:
      raise app.UsageError("aff_wild2_frames needs --manual_dir: the Aff-Wild2 tree")
    kwargs["max_unmatched"] = _MAX_UNMATCHED.value
  out = tfds_builders.build(_DATASET.value, _DATA_DIR.value, manual_dir=_MANUAL_DIR.value,
                             overwrite=_OVERWRITE.value, pixels=_PIXELS.value or None, **kwargs)
  logging.info("built %s", out)
  print(out)


if __name__ == "__main__":
  app.run(main)
