"""The synthetic face corpus for MAE pretraining: layout, determinism, variety, no overlap
with the videos' people, read by the pretraining face index."""

import hashlib
import json

import numpy as np
import pytest
from PIL import Image

from affect_jax.data import faces
from affect_jax.data.affwild2 import AU_NAMES, EXPR_NAMES
from affect_jax.data.synthetic import corpus, render

CONFIG = corpus.FaceCorpusConfig(num_identities=60, min_images=1, max_images=3, image_size=32,
                                 seed=4)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
  root = tmp_path_factory.mktemp("corpus")
  return root, corpus.generate_corpus(root, CONFIG)


def _digest(root):
  h = hashlib.sha256()
  for p in sorted(root.rglob("*")):
    if p.is_file():
      h.update(str(p.relative_to(root)).encode())
      h.update(p.read_bytes())
  return h.hexdigest()


def test_layout_manifest_and_latent_agree(written):
  root, manifest = written
  paths = faces.index_images(root, cache_dir=None)
  latent = corpus.load_latent(root)
  assert json.loads((root / corpus.MANIFEST).read_text()) == manifest
  assert manifest["images"] == len(paths) == len(latent["expr"])
  assert manifest["generator_version"] == corpus.GENERATOR_VERSION
  folders = sorted({p.split("/")[-2] for p in paths})
  assert folders == [corpus.identity_name(i) for i in range(CONFIG.num_identities)]
  # The latent is in the index's (sorted) order: identity i's images sit under its folder.
  assert [p.split("/")[-2] for p in paths] == [corpus.identity_name(i) for i in latent["identity"]]
  per_id = np.bincount(latent["identity"], minlength=CONFIG.num_identities)
  assert per_id.min() >= CONFIG.min_images and per_id.max() <= CONFIG.max_images
  assert latent["au"].shape == (len(paths), len(AU_NAMES)) and latent["au"].dtype == np.float32
  assert 0 <= latent["au"].min() and latent["au"].max() <= 1
  assert sum(manifest["expressions"].values()) == len(paths)
  assert manifest["occluded"] == int(latent["occluded"].sum())
  img = np.asarray(Image.open(paths[0]))
  assert img.shape == (32, 32, 3) and img.dtype == np.uint8


def test_every_expression_and_occluders_occur():
  # Larger, images only counted (nothing written): the draws of `sample_face`.
  config = corpus.FaceCorpusConfig(num_identities=1, occluded_fraction=0.1)
  rng = np.random.default_rng(0)
  draws = [corpus.sample_face(rng, config) for _ in range(2000)]
  counts = np.bincount([d["expr"] for d in draws], minlength=len(EXPR_NAMES))
  assert counts.min() > 100, dict(zip(EXPR_NAMES, counts))
  assert 0.2 < counts[EXPR_NAMES.index("Neutral")] / 2000 < 0.35
  occluded = np.mean([d["occluder"] is not None for d in draws])
  assert 0.07 < occluded < 0.13
  poses = np.array([d["pose"] for d in draws])
  assert 0.1 < poses[:, 2].std() < 0.2  # head roll varies more than in a video


def test_same_seed_same_bytes_other_seed_other_people(written, tmp_path):
  root, _ = written
  again = tmp_path / "again"
  corpus.generate_corpus(again, CONFIG)
  assert _digest(again) == _digest(root)
  # Rewriting into the same folder replaces the old corpus (fewer identities: no leftovers).
  corpus.generate_corpus(again, corpus.FaceCorpusConfig(num_identities=3, image_size=32, seed=5))
  assert sorted(p.name for p in again.iterdir() if p.is_dir()) == [
      corpus.identity_name(i) for i in range(3)]
  first = render.sample_identity(corpus._rng(4, 0))
  assert render.sample_identity(corpus._rng(5, 0)) != first


def test_refuses_a_foreign_folder(tmp_path):
  (tmp_path / "mine.txt").write_text("keep me")
  with pytest.raises(FileExistsError, match=corpus.MANIFEST):
    corpus.generate_corpus(tmp_path, CONFIG)
  assert (tmp_path / "mine.txt").read_text() == "keep me"


def test_config_is_checked():
  with pytest.raises(ValueError, match="min_images"):
    corpus.FaceCorpusConfig(min_images=3, max_images=2)
  with pytest.raises(ValueError, match="image_size"):
    corpus.FaceCorpusConfig(image_size=4)
