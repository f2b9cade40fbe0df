"""Frame fine-tuning: records, class weights, MAE initialisation, best-state export."""

import functools
import json

import jax
import numpy as np
import pytest

from affect_jax import optim, sharding
from affect_jax.models import vit
from affect_jax.train import finetune, pretrain
from configs import expr_finetune

from tests.train.conftest import IMAGE


def test_frame_records_cover_every_valid_label(synthetic_root):
  manifest = json.loads((synthetic_root / "synthetic_manifest.json").read_text())
  recs = finetune.frame_records(str(synthetic_root), "Train_Set")
  want = sum(v["tasks"]["EXPR"]["valid"] for v in manifest["videos"].values()
             if v["tasks"].get("EXPR", {}).get("split") == "Train_Set")
  assert len(recs) == want
  assert all(0 <= r["label"] < 8 for r in recs)


def test_class_weights_inverse_frequency():
  labels = np.array([0, 0, 0, 1, 2, 2])
  w = finetune.class_weights(labels, "inverse")
  # 1/3, 1, 1/2 normalised to mean 1 over the three present classes; absent classes 0.
  raw = np.array([1 / 3, 1, 1 / 2])
  np.testing.assert_allclose(w[:3], raw / raw.mean(), rtol=1e-6)
  assert (w[3:] == 0).all()
  assert finetune.class_weights(labels, "none") is None
  with pytest.raises(ValueError, match="class_weighting"):
    finetune.class_weights(labels, "balanced")


def _ft_config(root, **kw):
  c = expr_finetune.get_config("tiny")
  c.data.root, c.data.image_size = str(root), IMAGE
  c.batch_size, c.eval_batch_size = 16, 64
  c.update(kw)
  return c


def test_mae_init_copies_the_pretrained_encoder(synthetic_root, mae_workdir):
  c = _ft_config(synthetic_root)
  c.init.mae_workdir = str(mae_workdir)
  model = finetune.create_model(c)
  mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  _, mae_params = pretrain.load_pretrained(str(mae_workdir))
  state, _ = finetune.create_train_state(c, model, jax.random.key(1), mesh,
                                         lambda s: 1e-3, finetune.initial_encoder(c))
  for key in ("patch_embed", "cls_token"):
    for a, b in zip(jax.tree.leaves(state.params[key]), jax.tree.leaves(mae_params[key])):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  blk = state.params["encoder"]["blocks_0"]["mlp"]
  np.testing.assert_array_equal(np.asarray(jax.tree.leaves(blk)[0]),
                                np.asarray(jax.tree.leaves(mae_params["encoder"]["blocks_0"]["mlp"])[0]))
  random_state, _ = finetune.create_train_state(c, model, jax.random.key(1), mesh,
                                                lambda s: 1e-3, None)
  assert not np.array_equal(np.asarray(random_state.params["cls_token"]),
                            np.asarray(mae_params["cls_token"]))
  # A scan_layers classifier starts from the same (unrolled) MAE: its blocks stacked.
  c.model.scan_layers = True
  scanned, _ = finetune.create_train_state(c, finetune.create_model(c), jax.random.key(1), mesh,
                                           lambda s: 1e-3, finetune.initial_encoder(c))
  jax.tree.map(np.testing.assert_array_equal, vit.unstack_blocks(
      jax.device_get(scanned.params["encoder"])), jax.device_get(state.params["encoder"]))


def test_short_run_exports_best_and_loads_back(synthetic_root, tmp_path):
  c = _ft_config(synthetic_root, num_steps=6, log_every=3, eval_every_epochs=0.01,
                 checkpoint_every=6)
  c.init.kind = "random"
  out = finetune.train_and_evaluate(c, str(tmp_path / "ft"))
  evals = [h["eval/f1"] for h in out["history"] if "eval/f1" in h]
  assert out["best"]["value"] == max(evals)
  config, model, params = finetune.load_finetuned(str(tmp_path / "ft"))
  assert config.model.variant == "tiny" and model.num_classes == 8
  val = finetune.frame_records(str(synthetic_root), "Validation_Set")
  logits, labels = finetune.predict_logits(model, params, val, image_size=IMAGE, batch_size=64,
                                           mesh=sharding.make_mesh((1, 1, 1), jax.devices()[:1]))
  from affect_jax import metrics
  np.testing.assert_allclose(metrics.expr_f1(logits.argmax(-1), labels), out["best"]["value"],
                             atol=1e-6)


def _tiny_vit_state(seed: int, pos_embed: np.ndarray) -> dict:
  """A random timm-layout state dict of the tiny ViT encoder with the given position table."""
  from affect_jax.models import vit
  from tests.models.test_convert import _blocks
  t = vit.VARIANTS["tiny"]
  d, p = t["width"], t["patch_size"]
  rng = np.random.default_rng(seed)
  state = {"cls_token": 0.02 * rng.normal(size=(1, 1, d)), "pos_embed": pos_embed,
           "patch_embed.proj.weight": rng.normal(size=(d, 3, p, p)) / (3 * p * p) ** 0.5,
           "patch_embed.proj.bias": 0.1 * rng.normal(size=d),
           "norm.weight": np.ones(d), "norm.bias": np.zeros(d),
           **_blocks(rng, "blocks", t["depth"], d, t["mlp_dim"])}
  return {k: np.asarray(v, np.float32) for k, v in state.items()}


def test_converted_timm_checkpoint_initialises_fine_tuning(synthetic_root, tmp_path):
  """launch/convert_weights.py output (a public MAE ViT in timm layout) -> init.kind='converted'."""
  import safetensors.numpy
  from affect_jax.models import convert, vit
  t = vit.VARIANTS["tiny"]
  d, grid = t["width"], IMAGE // t["patch_size"]
  state = _tiny_vit_state(3, vit.sincos_pos_embed_2d(d, (grid, grid))[None])
  safetensors.numpy.save_file(state, str(tmp_path / "mae_vit.safetensors"))
  convert.save_params(convert.convert_checkpoint(str(tmp_path / "mae_vit.safetensors"), "vit",
                                                 "tiny"), str(tmp_path / "converted"))

  c = _ft_config(synthetic_root, num_steps=2, log_every=1, eval_every_epochs=100.0)
  c.init.kind, c.init.params_path = "converted", str(tmp_path / "converted")
  model = finetune.create_model(c)
  mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  ft_state, _ = finetune.create_train_state(c, model, jax.random.key(1), mesh,
                                            lambda s: 1e-3, finetune.initial_encoder(c))
  qkv = np.asarray(ft_state.params["encoder"]["blocks_1"]["attn"]["qkv"]["kernel"])
  heads = t["num_heads"]
  np.testing.assert_array_equal(
      qkv, state["blocks.1.attn.qkv.weight"].T.reshape(d, 3, heads, d // heads))
  np.testing.assert_array_equal(np.asarray(ft_state.params["cls_token"]), state["cls_token"])
  out = finetune.train_and_evaluate(c, str(tmp_path / "ft"))
  assert np.isfinite([h["loss"] for h in out["history"] if "loss" in h]).all()


def test_a_timm_vit_with_a_learned_position_table_initialises_fine_tuning(synthetic_root, tmp_path):
  """A supervised timm ViT (learned pos_embed, trained at another image size) -> converted
  for this image size -> config.model.pos_embed='learned'; with 'sincos' it is refused."""
  import safetensors.numpy
  from affect_jax.models import convert, vit
  t = vit.VARIANTS["tiny"]
  d, grid = t["width"], IMAGE // t["patch_size"]
  table = 0.02 * np.random.default_rng(4).normal(size=(1, 1 + (grid + 2) ** 2, d))
  state = _tiny_vit_state(4, table)
  safetensors.numpy.save_file(state, str(tmp_path / "timm_vit.safetensors"))
  convert.save_params(convert.convert_checkpoint(str(tmp_path / "timm_vit.safetensors"), "vit",
                                                 "tiny", image_size=IMAGE),
                      str(tmp_path / "converted"))
  c = _ft_config(synthetic_root)
  c.init.kind, c.init.params_path = "converted", str(tmp_path / "converted")
  mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  with pytest.raises(ValueError, match="set config.model.pos_embed='learned'"):
    finetune.create_train_state(c, finetune.create_model(c), jax.random.key(1), mesh,
                                lambda s: 1e-3, finetune.initial_encoder(c))
  c.model.pos_embed = "learned"
  ft_state, _ = finetune.create_train_state(c, finetune.create_model(c), jax.random.key(1), mesh,
                                            lambda s: 1e-3, finetune.initial_encoder(c))
  np.testing.assert_allclose(np.asarray(ft_state.params["pos_embed"])[0],
                             vit.resample_pos_embed(state["pos_embed"][0], (grid, grid)), rtol=1e-6)


def test_mixup_cutmix_run_on_the_sharded_step(synthetic_root, tmp_path):
  c = _ft_config(synthetic_root, num_steps=3, log_every=1, eval_every_epochs=100.0,
                 mixup=0.8, cutmix=1.0)
  c.init.kind = "random"
  out = finetune.train_and_evaluate(c, str(tmp_path / "ft"))
  losses = [h["loss"] for h in out["history"] if "loss" in h]
  assert len(losses) == 3 and np.isfinite(losses).all()


def test_rerun_into_a_used_workdir_with_another_seed_is_refused(synthetic_root, mae_workdir,
                                                                finetune_workdir):
  from configs import expr_finetune
  c = expr_finetune.get_config("tiny")
  c.data.root, c.data.image_size = str(synthetic_root), 32
  c.batch_size, c.eval_batch_size = 16, 64
  c.num_steps, c.log_every, c.eval_every_epochs = 4, 2, 100.0
  c.init.mae_workdir = str(mae_workdir)
  c.seed = 1
  with pytest.raises(FileExistsError, match=r"holds a finetune run of another config \(seed: 0 -> 1\)"):
    finetune.train_and_evaluate(c, str(finetune_workdir))


def test_accumulated_step_is_the_whole_batch_step(synthetic_root):
  """Deterministic fine-tuning (no drop-path, Mixup, smoothing): the mean cross-entropy of two
  equal micro-batches is the batch's, so grad_accum_steps=2 gives the plain step's update."""
  out = []
  for steps in (1, 2):
    c = _ft_config(synthetic_root, grad_accum_steps=steps, label_smoothing=0.0)
    c.model.drop_path_rate = 0.0
    mesh = sharding.make_mesh((8, 1, 1))
    model = finetune.create_model(c)
    schedule = optim.schedule_for(c, 10)
    state, shardings = finetune.create_train_state(c, model, jax.random.key(1), mesh, schedule,
                                                   None)
    step = jax.jit(functools.partial(
        finetune.train_step, model=model, seed=0, schedule=schedule, weights=None,
        label_smoothing=0.0, image_size=IMAGE, grad_accum_steps=steps, mix_shards=8))
    rng = np.random.default_rng(0)
    batch = {"image": rng.integers(0, 256, (16, IMAGE, IMAGE, 3), dtype=np.uint8),
             "label": rng.integers(0, 8, 16).astype(np.int32)}
    out.append(step(state, sharding.shard_batch(batch, mesh)))
  (s1, m1), (s2, m2) = out
  for key in ("loss", "accuracy", "grad_norm"):
    np.testing.assert_allclose(float(m2[key]), float(m1[key]), rtol=1e-5)
  for a, b in zip(jax.tree.leaves(s2.params), jax.tree.leaves(s1.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
