"""The MAE weights affect-jax ships: readable through the converter as a public MAE checkpoint,
described by their manifest, and they still reconstruct held-out faces as the manifest says."""

import json
import os

import pytest

from affect_jax import demo
from affect_jax.data.synthetic import corpus
from affect_jax.models import convert
from configs import demo as demo_config

CONFIGS = {p: demo_config.get_config(p) for p in demo_config.PRESETS}
SHIPPED = [c.mae.shipped for c in CONFIGS.values() if c.mae.shipped]


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_mae_weights_match_their_manifest(name, tmp_path):
  path, manifest = demo.shipped_weights(name)
  preset = next(p for p, c in CONFIGS.items() if c.mae.shipped == name)
  demo_cfg = CONFIGS[preset]
  assert os.path.getsize(path) == manifest["bytes"] <= 10 * 2**20
  assert demo._file_sha256(path) == manifest["sha256"]
  # The manifest records how they were made, and it is this version's recipe.
  config = demo.stage_configs(demo_cfg, "", str(tmp_path))["mae"]
  assert manifest["command"] == f"python launch/demo.py --preset={preset} --mae=scratch"
  assert manifest["corpus"] == json.loads(json.dumps(demo_cfg.mae.corpus.to_dict()))
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
  corpus.generate_corpus(heldout, demo.heldout_corpus(demo_cfg))
  loss = demo.score_mae_weights(path, config, str(heldout))
  assert loss == pytest.approx(manifest["heldout_loss"], rel=1e-3)
  # And the weights learned something: far below the loss of an untrained MAE.
  assert loss < 0.8 * manifest["untrained_heldout_loss"]
