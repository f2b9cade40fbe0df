"""A synthetic face-image corpus for MAE self-pretraining, like the paper's (AffectNet, RAF-DB,
FER2013, FER+): many identities, one to a few images each, the whole range of expressions,
action units, head poses, lighting and occluders. Nothing here is a label the training uses:
pretraining reads the images only.

Layout: `<root>/<identity>/<k>.jpg` (a face folder tree, `affect_jax.data.faces` reads it),
`<root>/face_corpus_manifest.json` (config, counts, generator version) and
`<root>/face_corpus_latent.npz` (what each image shows: identity, expression, AU
intensities, for probing features afterwards; pretraining never opens it).

The faces are drawn by the video generator's renderer (`render`), so a model pretrained here
meets the same kind of face in the Aff-Wild2-format videos, but never the same people:
identities come from their own random streams (seed, CORPUS_STREAM, i).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil

import numpy as np

from affect_jax.data.affwild2 import AU_NAMES, EXPR_NAMES
from affect_jax.data.synthetic import dynamics, render
from affect_jax.fileio import write_text_atomic

MANIFEST = "face_corpus_manifest.json"
LATENT = "face_corpus_latent.npz"
# Bumped whenever the same config would draw different images.
GENERATOR_VERSION = 1
# First key of every corpus random stream; the video generator's keys start with a source
# index < 2**31 - 1, so the two never share a stream.
CORPUS_STREAM = 2**31 + 7


@dataclasses.dataclass(frozen=True)
class FaceCorpusConfig:
  """What `generate_corpus` writes."""
  num_identities: int = 20000
  min_images: int = 1               # images per identity, drawn uniformly in [min, max]
  max_images: int = 3
  image_size: int = 64
  seed: int = 0
  neutral_fraction: float = 0.25    # faces at rest (plus spontaneous AU activity)
  occluded_fraction: float = 0.1
  blur_fraction: float = 0.1

  def __post_init__(self):
    if self.num_identities < 1 or not 1 <= self.min_images <= self.max_images:
      raise ValueError(f"need num_identities >= 1 and 1 <= min_images <= max_images: {self}")
    if self.image_size < 8:
      raise ValueError(f"image_size must be >= 8, got {self.image_size}")


def _rng(seed: int, *key: int) -> np.random.Generator:
  return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(CORPUS_STREAM, *key)))


def sample_face(rng: np.random.Generator, config: FaceCorpusConfig) -> dict:
  """One still: its expression, AU intensities [12], eyelids, pose, light and camera."""
  expressive = [i for i, name in enumerate(EXPR_NAMES) if name != "Neutral"]
  if rng.random() < config.neutral_fraction:
    expr = EXPR_NAMES.index("Neutral")
  else:
    expr = int(rng.choice(expressive))
  au = dynamics.EXPR_PROTOTYPES[expr] * rng.uniform(0.35, 1.15)
  # Spontaneous activity (talking, squints, brow flashes) on top of the prototype.
  au = np.maximum(au, (rng.random(len(AU_NAMES)) < 0.12) * rng.uniform(0.3, 1.0, len(AU_NAMES)))
  au = np.clip(au + rng.normal(0, 0.08, len(AU_NAMES)), 0, 1).astype(np.float32)
  blink = float(rng.uniform(0.5, 1.0)) if rng.random() < 0.08 else 0.0
  pose = (rng.normal(0, 0.06), rng.normal(0, 0.06), rng.normal(0, 0.14),
          1 + rng.normal(0, 0.07))
  light = (rng.uniform(0, 2 * np.pi), rng.uniform(0.05, 0.5), rng.uniform(0.7, 1.2))
  tint = rng.uniform(0.88, 1.12, 3)
  blur = rng.uniform(0.8, 3.0) if rng.random() < config.blur_fraction else (
      rng.uniform(0.3, 0.7) if rng.random() < 0.3 else 0.0)
  occluder = None
  if rng.random() < config.occluded_fraction:
    kind, colour, start, _ = render.sample_occluder(rng)
    occluder = (kind, *start.tolist(), colour)
  return {"expr": expr, "au": au, "blink": blink, "pose": pose, "light": light, "tint": tint,
          "blur": float(blur), "noise": float(rng.uniform(1.0, 7.0)),
          "quality": int(rng.integers(40, 96)), "occluder": occluder}


def identity_name(i: int) -> str:
  return f"id{i:06d}"


def _write_identity(root: pathlib.Path, i: int, config: FaceCorpusConfig, grid) -> list[dict]:
  rng = _rng(config.seed, i)
  identity = render.sample_identity(rng)
  bg = render.background(identity, 2 * config.image_size)
  folder = root / identity_name(i)
  folder.mkdir(parents=True, exist_ok=True)
  faces = []
  for k in range(int(rng.integers(config.min_images, config.max_images + 1))):
    face = sample_face(rng, config)
    img = render.render_face(identity, face["au"], config.image_size, face["pose"],
                             face["blink"], face["occluder"], bg)
    jpeg = render.capture(rng, img, face["light"], face["tint"], face["blur"], face["noise"],
                          face["quality"], grid)
    (folder / f"{k:02d}.jpg").write_bytes(jpeg)
    faces.append(face)
  return faces


def _prepare(root: pathlib.Path) -> None:
  """Clears an earlier corpus; refuses a non-empty folder without a corpus manifest."""
  if root.exists() and any(root.iterdir()) and not (root / MANIFEST).exists():
    raise FileExistsError(f"{root} is not empty and has no {MANIFEST}: not overwriting it")
  if root.exists():
    for entry in root.iterdir():
      if entry.is_dir() and entry.name.startswith("id"):
        shutil.rmtree(entry)
      elif entry.name == LATENT:
        entry.unlink()
  root.mkdir(parents=True, exist_ok=True)


def generate_corpus(out_dir: str | os.PathLike, config: FaceCorpusConfig = FaceCorpusConfig()) -> dict:
  """Writes the corpus under `out_dir` (same config and version: byte-identical files) and
  returns its manifest. The manifest is written last, so a corpus with one is complete."""
  root = pathlib.Path(out_dir)
  _prepare(root)
  grid = render.light_grid(config.image_size)
  identity, expr, au, occluded = [], [], [], []
  for i in range(config.num_identities):
    for face in _write_identity(root, i, config, grid):
      identity.append(i)
      expr.append(face["expr"])
      au.append(face["au"])
      occluded.append(face["occluder"] is not None)
  tmp = root / (LATENT + ".tmp.npz")
  np.savez(tmp, identity=np.asarray(identity, np.int32), expr=np.asarray(expr, np.int32),
           au=np.stack(au), occluded=np.asarray(occluded))
  os.replace(tmp, root / LATENT)
  counts = np.bincount(expr, minlength=len(EXPR_NAMES))
  manifest = {"config": dataclasses.asdict(config), "generator_version": GENERATOR_VERSION,
              "identities": config.num_identities, "images": len(identity),
              "expressions": dict(zip(EXPR_NAMES, counts.tolist())),
              "occluded": int(np.sum(occluded))}
  write_text_atomic(root / MANIFEST, json.dumps(manifest, indent=1) + "\n")
  return manifest


def load_latent(root: str | os.PathLike) -> dict[str, np.ndarray]:
  """What each image of a corpus shows, in the order of its sorted paths
  (`<identity>/<k>.jpg`, which is how `faces.index_images` lists them)."""
  with np.load(pathlib.Path(root) / LATENT) as data:
    return {k: data[k] for k in data.files}
