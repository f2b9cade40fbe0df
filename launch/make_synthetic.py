"""Writes the synthetic Aff-Wild2 dataset, the synthetic face corpus for MAE pretraining, or a
video file of one synthetic subject (for launch/analyze_video.py).

  python launch/make_synthetic.py --out_dir=/tmp/affect_jax/synthetic --num_videos=30
  python launch/make_synthetic.py --kind=faces --out_dir=/tmp/affect_jax/faces \
      --num_identities=20000 --image_size=64
  python launch/make_synthetic.py --kind=clip --out_dir=/tmp/affect_jax/clip --clip_frames=900
"""

import time

from absl import app, flags

from affect_jax.data import synthetic
from affect_jax.data.synthetic import clip, corpus
from configs import common

_DEFAULTS = synthetic.SyntheticConfig()
_CORPUS = corpus.FaceCorpusConfig()
_CLIP = clip.ClipConfig()
_KIND = flags.DEFINE_enum("kind", "videos", ["videos", "faces", "clip"],
                          "videos: the Aff-Wild2-format dataset; faces: the pretraining corpus "
                          "(a face folder tree of other people); clip: synthetic_clip.mp4 (H.264 + "
                          "AAC) and its truth synthetic_clip.json.")
_CLIP_FRAMES = flags.DEFINE_integer("clip_frames", _CLIP.num_frames, "--kind=clip: frames.")
_OUT_DIR = flags.DEFINE_string("out_dir", common.DEFAULT_SYNTHETIC_ROOT, "Root to write.")
_NUM_VIDEOS = flags.DEFINE_integer("num_videos", _DEFAULTS.num_videos, "Videos; a _left/_right pair is two.")
_MIN_FRAMES = flags.DEFINE_integer("min_frames", _DEFAULTS.min_frames, "Shortest video, frames.")
_MAX_FRAMES = flags.DEFINE_integer("max_frames", _DEFAULTS.max_frames, "Longest video, frames.")
_NUM_IDS = flags.DEFINE_integer("num_identities", _CORPUS.num_identities, "--kind=faces: people.")
_MAX_IMAGES = flags.DEFINE_integer("max_images", _CORPUS.max_images,
                                   "--kind=faces: images per person, 1 to this many.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 0, "Side of the square crops, pixels (default "
                                   f"{_DEFAULTS.image_size} for videos, {_CORPUS.image_size} for faces).")
_FPS = flags.DEFINE_float("fps", _DEFAULTS.fps, "Frame rate.")
_SEED = flags.DEFINE_integer("seed", _DEFAULTS.seed, "Same seed, byte-identical files.")


def main(argv):
  del argv
  start = time.perf_counter()
  if _KIND.value == "clip":
    # The default seed's subject is one OpenCV's Haar cascade finds (it misses many
    # synthetic faces); --seed picks another.
    seed = _SEED.value if flags.FLAGS["seed"].present else _CLIP.seed
    path = clip.write_clip(_OUT_DIR.value, clip.ClipConfig(
        num_frames=_CLIP_FRAMES.value, fps=_FPS.value, seed=seed))
    print(f"{path}: {_CLIP_FRAMES.value} frames at {_FPS.value:g} fps")
  elif _KIND.value == "faces":
    manifest = corpus.generate_corpus(_OUT_DIR.value, corpus.FaceCorpusConfig(
        num_identities=_NUM_IDS.value, max_images=_MAX_IMAGES.value,
        image_size=_IMAGE_SIZE.value or _CORPUS.image_size, seed=_SEED.value))
    print(f"{_OUT_DIR.value}: {manifest['identities']} identities, {manifest['images']} images "
          f"({manifest['occluded']} occluded); expressions {manifest['expressions']}")
  else:
    synthetic.generate(_OUT_DIR.value, synthetic.SyntheticConfig(
        num_videos=_NUM_VIDEOS.value, min_frames=_MIN_FRAMES.value, max_frames=_MAX_FRAMES.value,
        image_size=_IMAGE_SIZE.value or _DEFAULTS.image_size, fps=_FPS.value, seed=_SEED.value))
    print(synthetic.summarize(_OUT_DIR.value))
  print(f"written in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
  app.run(main)
