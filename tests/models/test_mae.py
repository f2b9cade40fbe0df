"""MAE masking, loss and model against numpy and the PyTorch reference's parameter count."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from affect_jax.models import mae, vit

TINY = dict(patch_size=4, width=32, depth=1, num_heads=4, mlp_dim=64, decoder_width=16,
            decoder_depth=1, decoder_num_heads=2, decoder_mlp_dim=32)
IMG = 16  # 16 patches


@pytest.mark.parametrize("n,ratio,visible", [
    (196, 0.75, 49), (16, 0.75, 4), (50, 0.5, 25), (7, 0.3, 5),
    (10, 0.9, 1),  # int(10 * (1 - 0.9)) would give 0: float error, not intent
    (16, 0.0, 16),
])
def test_random_masking(n, ratio, visible):
  batch, width = 6, 3
  # Token i of sample b carries (b, i, -i) so kept tokens can be traced back.
  ids = np.arange(n, dtype=np.float32)
  x = np.stack([np.stack([np.full(n, b), ids, -ids], -1) for b in range(batch)])
  x_visible, mask, ids_restore = mae.random_masking(jnp.asarray(x), ratio, jax.random.key(0))
  x_visible, mask, ids_restore = map(np.asarray, (x_visible, mask, ids_restore))

  assert x_visible.shape == (batch, visible, width)
  np.testing.assert_array_equal(mask.sum(1), n - visible)
  for b in range(batch):
    ids_shuffle = np.argsort(ids_restore[b])
    np.testing.assert_array_equal(ids_shuffle[ids_restore[b]], np.arange(n))  # inverse perm
    kept = x_visible[b, :, 1].astype(int)
    np.testing.assert_array_equal(kept, ids_shuffle[:visible])  # the shuffle's prefix...
    np.testing.assert_array_equal(np.sort(kept), np.flatnonzero(mask[b] == 0))  # ...= unmasked
    np.testing.assert_array_equal(x_visible[b], x[b, kept])
  if 0 < visible < n:
    assert len({m.tobytes() for m in mask}) > 1  # samples get their own masks


def test_masking_is_a_function_of_the_rng():
  x = jnp.ones((4, 16, 2))
  same = [mae.random_masking(x, 0.75, jax.random.key(3))[1] for _ in range(2)]
  other = mae.random_masking(x, 0.75, jax.random.key(4))[1]
  np.testing.assert_array_equal(same[0], same[1])
  assert not np.array_equal(same[0], other)


def _np_loss(pred, target, mask, norm_pix_loss):
  pred, target = np.float64(pred), np.float64(target)
  if norm_pix_loss:
    mean = target.mean(-1, keepdims=True)
    var = target.var(-1, keepdims=True, ddof=1)  # torch's default unbiased var
    target = (target - mean) / (var + 1e-6) ** 0.5
  per_patch = ((pred - target) ** 2).mean(-1)
  return (per_patch * mask).sum() / mask.sum()


@pytest.mark.parametrize("norm_pix_loss", [True, False])
def test_loss_is_mse_on_masked_patches_only(norm_pix_loss):
  rng = np.random.default_rng(0)
  pred, target = rng.normal(size=(2, 2, 9, 12)).astype(np.float32)
  mask = (rng.uniform(size=(2, 9)) < 0.7).astype(np.float32)
  loss = mae.mae_loss(pred, target, mask, norm_pix_loss)
  np.testing.assert_allclose(loss, _np_loss(pred, target, mask, norm_pix_loss), rtol=1e-5)
  visible = np.argwhere(mask == 0)[0]
  pred[tuple(visible)] += 100.0
  np.testing.assert_allclose(mae.mae_loss(pred, target, mask, norm_pix_loss), loss, rtol=1e-6)


def test_base_parameter_count_matches_the_pytorch_reference():
  model = mae.MaskedAutoencoder(**vit.variant_config("base"))
  shapes = jax.eval_shape(
      lambda: model.init({"params": jax.random.key(0), "masking": jax.random.key(1)},
                         jnp.zeros((1, 224, 224, 3)), train=False))
  assert set(shapes) == {"params"}  # position embeddings are constants, not variables
  params = nn.unbox(shapes["params"])
  assert sum(x.size for x in jax.tree.leaves(params)) == 111_655_680
  assert params["cls_token"].shape == (1, 1, 768)
  assert params["mask_token"].shape == (1, 1, 512)


@pytest.fixture(scope="module")
def tiny_mae():
  model = mae.MaskedAutoencoder(**TINY)
  imgs = jax.random.normal(jax.random.key(0), (3, IMG, IMG, 3))
  init = jax.jit(lambda x: model.init(
      {"params": jax.random.key(1), "masking": jax.random.key(2)}, x, train=False))
  return model, nn.unbox(init(imgs)["params"]), imgs


def test_forward_shapes_loss_and_init(tiny_mae):
  model, params, imgs = tiny_mae
  loss, pred, mask = jax.jit(lambda p, x: model.apply(
      {"params": p}, x, train=False, rngs={"masking": jax.random.key(5)}))(params, imgs)
  assert pred.shape == (3, 16, 4 * 4 * 3) and mask.shape == (3, 16)
  np.testing.assert_array_equal(mask.sum(1), 12)
  np.testing.assert_allclose(
      loss, _np_loss(pred, vit.patchify(imgs, 4), mask, norm_pix_loss=True), rtol=1e-5)
  # MAE's init: tokens N(0, .02), LayerNorm 1/0, xavier-uniform kernels, zero biases.
  assert 0.005 < float(jnp.std(params["cls_token"])) < 0.05
  block = params["encoder"]["blocks_0"]
  np.testing.assert_array_equal(block["norm1"]["scale"], 1)
  np.testing.assert_array_equal(block["mlp"]["fc1"]["bias"], 0)
  limit = np.sqrt(6 / (32 + 3 * 32))  # qkv: fan_in D, fan_out 3D, as timm's [3D, D] Linear
  qkv = np.asarray(block["attn"]["qkv"]["kernel"])
  assert np.abs(qkv).max() <= limit and np.abs(qkv).max() > 0.9 * limit


def test_drop_path_draws_from_the_dropout_rng(tiny_mae):
  _, _, imgs = tiny_mae
  # Rates grow over depth from 0, so block 0 never drops: two blocks.
  model = mae.MaskedAutoencoder(**{**TINY, "depth": 2}, drop_path_rate=0.5)
  rngs = {"params": jax.random.key(1), "masking": jax.random.key(5)}
  params = jax.jit(lambda: model.init(rngs, imgs, train=False))()["params"]
  loss = jax.jit(lambda rng: model.apply({"params": params}, imgs, train=True,
                                         rngs={**rngs, "dropout": rng})[0])
  assert len({float(loss(jax.random.key(i))) for i in range(4)}) > 1


def test_bf16_train_step_compiles_runs_and_tracks_float32(tiny_mae):
  _, params, imgs = tiny_mae

  def grads(dtype):
    model = mae.MaskedAutoencoder(**TINY, dtype=dtype)
    loss_fn = lambda p: model.apply({"params": p}, imgs, train=True,
                                    rngs={"masking": jax.random.key(7)})[0]
    return jax.jit(jax.value_and_grad(loss_fn))(params)

  (loss32, g32), (loss16, g16) = grads(jnp.float32), grads(jnp.bfloat16)
  np.testing.assert_allclose(loss16, loss32, rtol=0.03)
  for a, b in zip(jax.tree.leaves(g16), jax.tree.leaves(g32)):
    assert a.dtype == jnp.float32  # params stay float32, so do their gradients
  cos = lambda a, b: jnp.vdot(a, b) / (jnp.linalg.norm(a) * jnp.linalg.norm(b))
  flat16, flat32 = (jnp.concatenate([x.ravel() for x in jax.tree.leaves(g)]) for g in (g16, g32))
  assert float(cos(flat16, flat32)) > 0.99
