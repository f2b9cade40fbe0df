"""The MAE weights affect-jax ships: readable through the converter as a public MAE checkpoint,
described by their manifest, and they still reconstruct held-out faces as the manifest says."""

import json
import os

import pytest

from affect_jax import demo
from affect_jax.data.synthetic import corpus
from affect_jax.models import convert

SHIPPED = [r["shipped"] for r in demo.MAE_RECIPES.values() if r["shipped"]]


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_mae_weights_match_their_manifest(name, tmp_path):
  path, manifest = demo.shipped_weights(name)
  preset = next(k for k, r in demo.MAE_RECIPES.items() if r["shipped"] == name)
  recipe = demo.MAE_RECIPES[preset]
  assert os.path.getsize(path) == manifest["bytes"] <= 10 * 2**20
  assert demo._file_sha256(path) == manifest["sha256"]
  # The manifest records how they were made, and it is this version's recipe.
  config = demo._configs(demo.PRESETS[preset], "", str(tmp_path), recipe)["mae"]
  assert manifest["command"] == f"python launch/demo.py --preset={preset} --mae=scratch"
  assert manifest["corpus"] == json.loads(json.dumps(demo.dataclasses.asdict(recipe["corpus"])))
  assert manifest["generator_version"] == corpus.GENERATOR_VERSION
  saved = manifest["config"]
  for key in ("num_steps", "batch_size", "seed", "data.image_size", "data.crop_scale",
              "model.variant", "model.mask_ratio", "model.norm_pix_loss", "optim.base_lr",
              "optim.weight_decay"):
    *parents, leaf = key.split(".")
    want, got = config, saved
    for k in parents:
      want, got = want[k], got[k]
    assert got[leaf] == (list(want[leaf]) if isinstance(want[leaf], tuple) else want[leaf]), key
  assert saved["data"]["roots"] == "<out_dir>/faces"
  assert manifest["seed"] == config.seed and manifest["wall_s"] > 0
  assert len(manifest["final_losses"]) == 5
  # A public-MAE-style state dict (with its position tables) that converts without complaint.
  state = convert.load_state_dict(path)
  assert "pos_embed" in state and "decoder_pred.weight" in state
  # Re-scored on the held-out faces (regenerated: same config, same bytes) as when made.
  heldout = tmp_path / "heldout"
  corpus.generate_corpus(heldout, demo.heldout_corpus(recipe))
  loss = demo.score_mae_weights(path, config, str(heldout))
  assert loss == pytest.approx(manifest["heldout_loss"], rel=1e-3)
  # And the weights learned something: far below the loss of an untrained MAE.
  assert loss < 0.8 * manifest["untrained_heldout_loss"]
