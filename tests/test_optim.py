import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from affect_jax import optim
from affect_jax.models import vit


def _cfg(**kw):
  c = ml_collections.ConfigDict(dict(name="adamw", lr=None, base_lr=1.5e-4, b1=0.9, b2=0.95,
                                     eps=1e-8, weight_decay=0.05, schedule="cosine", min_lr=0.0,
                                     init_lr=0.0, grad_clip=0.0))
  c.update(kw)
  return c


def test_lr_scaled_by_batch():
  assert optim.learning_rate(_cfg(), 512) == 1.5e-4 * 2
  assert optim.learning_rate(_cfg(lr=3e-5), 512) == 3e-5


def test_warmup_then_cosine_matches_formula():
  total, warm, peak = 100, 10, 1.5e-4 * 64 / 256
  sched = optim.lr_schedule(_cfg(min_lr=1e-6), batch_size=64, total_steps=total, warmup_steps=warm)
  for s in [0, 5, 10, 37, 99]:
    if s < warm:
      want = peak * s / warm
    else:
      t = (s - warm) / (total - warm)
      want = 1e-6 + (peak - 1e-6) * 0.5 * (1 + np.cos(np.pi * t))
    np.testing.assert_allclose(float(sched(s)), want, rtol=1e-5, atol=1e-12)


def test_decay_mask_exempts_vectors_and_tokens():
  params = {"dense": {"kernel": jnp.ones((3, 4)), "bias": jnp.ones(4)},
            "ln": {"scale": jnp.ones(4)}, "cls_token": jnp.ones((1, 1, 4)),
            "mask_token": jnp.ones((1, 1, 4))}
  m = optim.decay_mask(params)
  assert m == {"dense": {"kernel": True, "bias": False}, "ln": {"scale": False},
               "cls_token": False, "mask_token": False}


def test_adamw_step_matches_hand_computation():
  # One AdamW step from zero moments: update = -lr * (g / (|g| + eps) + wd * p) on decayed
  # params (bias correction makes m_hat = g, v_hat = g^2), -lr * g/(|g|+eps) on the rest.
  cfg = _cfg(lr=0.1, weight_decay=0.5, schedule="constant")
  sched = optim.lr_schedule(cfg, batch_size=1, total_steps=10, warmup_steps=0)
  params = {"kernel": jnp.array([[1.0, -2.0]]), "bias": jnp.array([3.0])}
  grads = {"kernel": jnp.array([[0.5, 0.25]]), "bias": jnp.array([-1.0])}
  tx = optim.make_optimizer(cfg, schedule=sched)
  updates, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(updates["kernel"], -0.1 * (np.sign([[0.5, 0.25]]) + 0.5 * np.array([[1.0, -2.0]])), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(updates["bias"], [0.1], rtol=1e-5)


def test_grad_clip_by_global_norm():
  # Gradient of global norm 20 is clipped to norm 1 (0.5 per entry) before Adam; with eps=1
  # the first update is -lr * g / (|g| + 1), which tells the clipped and unclipped cases apart.
  cfg = _cfg(lr=1.0, weight_decay=0.0, schedule="constant", grad_clip=1.0, eps=1.0)
  tx = optim.make_optimizer(cfg, schedule=optax.constant_schedule(1.0))
  params = {"kernel": jnp.zeros((2, 2))}
  upd, _ = tx.update({"kernel": jnp.full((2, 2), 10.0)}, tx.init(params), params)
  np.testing.assert_allclose(upd["kernel"], np.full((2, 2), -0.5 / 1.5), rtol=1e-5)


def test_layerwise_decay_scales_updates_by_depth():
  params = {"patch_embed": {"kernel": jnp.ones((2, 2))}, "cls_token": jnp.ones((1, 1, 2)),
            "encoder": {"blocks_0": {"w": jnp.ones(2)}, "blocks_1": {"w": jnp.ones(2)},
                        "norm": {"scale": jnp.ones(2)}},
            "head": {"kernel": jnp.ones((2, 3))}}
  tx = optim.layerwise_lr_decay(0.5, num_layers=2)
  ones = jax.tree.map(jnp.ones_like, params)
  upd, _ = tx.update(ones, tx.init(params), params)
  # L = 2: embeddings 0.5^3, block 0 0.5^2, block 1 0.5^1, norm/head 1.
  assert float(upd["patch_embed"]["kernel"][0, 0]) == 0.125
  assert float(upd["cls_token"][0, 0, 0]) == 0.125
  assert float(upd["encoder"]["blocks_0"]["w"][0]) == 0.25
  assert float(upd["encoder"]["blocks_1"]["w"][0]) == 0.5
  assert float(upd["encoder"]["norm"]["scale"][0]) == 1.0
  assert float(upd["head"]["kernel"][0, 0]) == 1.0

  # The scanned layout (blocks stacked on a leading layer axis): the same scale per slice.
  stacked = vit.stack_blocks(params)
  upd_s, _ = tx.update(jax.tree.map(jnp.ones_like, stacked), tx.init(stacked), stacked)
  assert jax.tree.structure(upd_s) == jax.tree.structure(vit.stack_blocks(upd))
  jax.tree.map(np.testing.assert_array_equal, upd_s, vit.stack_blocks(upd))
  with pytest.raises(ValueError, match="leading size"):
    optim.layerwise_lr_decay(0.5, num_layers=3).update(upd_s, optax.EmptyState())


def test_total_steps_and_warmup_fraction():
  c = ml_collections.ConfigDict(dict(optim=_cfg(lr=1.0, init_lr=0.0, min_lr=0.0), num_steps=-1,
                                     num_epochs=10, warmup_epochs=2, batch_size=4))
  assert optim.total_steps(c, steps_per_epoch=7.5) == 75
  c.num_steps = 40  # a shortened run warms up for the same fifth of it
  total = optim.total_steps(c, steps_per_epoch=7.5)
  sched = optim.schedule_for(c, total)
  assert total == 40
  np.testing.assert_allclose([float(sched(4)), float(sched(8))], [0.5, 1.0], rtol=1e-6)


def test_global_norm_matches_numpy_over_all_leaves():
  rng = np.random.default_rng(0)
  tree = {"a": rng.normal(size=(5, 7)).astype(np.float32),
          "b": [rng.normal(size=(3,)).astype(np.float32),
                rng.normal(size=(2, 2, 2)).astype(jnp.bfloat16)]}
  want = np.sqrt(sum(np.sum(np.asarray(x, np.float64) ** 2) for x in jax.tree.leaves(tree)))
  got = optim.global_norm(jax.tree.map(jnp.asarray, tree))
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, want, rtol=1e-6)
  np.testing.assert_allclose(got, optax.tree.norm(jax.tree.map(
      lambda x: jnp.asarray(x, jnp.float32), tree)), rtol=1e-6)
  assert float(optim.global_norm({})) == 0.0


def test_accumulated_gradients_are_the_mean_over_strided_micro_batches():
  x = jnp.arange(24.0).reshape(12, 2)
  y = jnp.sin(jnp.arange(12.0))
  params = {"w": jnp.array([0.3, -0.2]), "b": jnp.array(0.1)}
  seen = []

  def loss_and_grad(p, batch, index):
    seen.append(batch["x"].shape)
    f = lambda p: (jnp.mean((batch["x"] @ p["w"] + p["b"] - batch["y"]) ** 2), index)
    return jax.value_and_grad(f, has_aux=True)(p)

  batch = {"x": x, "y": y}
  (loss, idx), grads = optim.accumulate_gradients(loss_and_grad, params, batch, 3)
  assert seen[-1] == (4, 2) and list(idx) == [0, 1, 2]
  np.testing.assert_array_equal(optim.micro_batches(batch, 3)["x"][1], x[1::3])
  # A mean loss over equal micro-batches: the same loss and gradient as the whole batch.
  (full, _), full_grads = loss_and_grad(params, batch, 0)
  np.testing.assert_allclose(loss, full, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(full_grads)):
    np.testing.assert_allclose(a, b, rtol=1e-6)
  with pytest.raises(ValueError, match="does not split into 5 micro-batches"):
    optim.micro_batches(batch, 5)
