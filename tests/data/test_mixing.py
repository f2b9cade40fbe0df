"""Mixup / CutMix against hand computations, and the mixed loss against soft-target CE."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from affect_jax import losses
from affect_jax.data import mixing


def _images(b=6, h=16, w=12):
  return jax.random.normal(jax.random.key(0), (b, h, w, 3))


def test_off_is_the_identity():
  x = _images()
  out, partner, lam = mixing.mix_batch(jax.random.key(1), x)
  np.testing.assert_array_equal(out, x)
  assert float(lam) == 1.0 and list(partner) == [5, 4, 3, 2, 1, 0]


def test_mixup_is_a_convex_blend_with_the_mirrored_batch():
  x = np.asarray(_images())
  out, partner, lam = mixing.mix_batch(jax.random.key(2), jnp.asarray(x), mixup_alpha=0.8)
  lam = float(lam)
  assert 0.0 <= lam <= 1.0
  np.testing.assert_allclose(out, lam * x + (1 - lam) * x[::-1], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("seed", range(5))
def test_cutmix_pastes_one_box_and_lambda_is_the_kept_area(seed):
  x = np.asarray(_images())
  out, _, lam = mixing.mix_batch(jax.random.key(seed), jnp.asarray(x), cutmix_alpha=1.0)
  out = np.asarray(out)
  from_partner = np.all(out == x[::-1], axis=-1) & ~np.all(out == x, axis=-1)
  kept = np.all(out == x, axis=-1)
  assert np.all(from_partner | kept)
  region = from_partner[0]
  if region.any():  # one axis-aligned rectangle, the same for every image
    rows, cols = np.flatnonzero(region.any(1)), np.flatnonzero(region.any(0))
    assert region[rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()
    assert (from_partner == region).all()
  np.testing.assert_allclose(float(lam), 1 - region.sum() / region.size, rtol=1e-6)


def test_both_on_picks_one_of_the_two_per_batch():
  x = np.asarray(_images())
  kinds = set()
  for seed in range(12):
    out, _, lam = mixing.mix_batch(jax.random.key(seed), jnp.asarray(x), mixup_alpha=0.8,
                                   cutmix_alpha=1.0)
    blend = np.allclose(out, float(lam) * x + (1 - float(lam)) * x[::-1], atol=1e-5)
    kinds.add("mixup" if blend else "cutmix")
  assert kinds == {"mixup", "cutmix"}


def test_lambda_weighted_loss_equals_cross_entropy_on_mixed_soft_targets():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(6, 8)).astype(np.float32)
  labels = rng.integers(0, 8, 6)
  partner = np.arange(6)[::-1]
  lam, smooth = 0.3, 0.1
  ce = lambda y: losses.masked_cross_entropy(logits, y, np.ones(6), label_smoothing=smooth)
  ours = lam * ce(labels) + (1 - lam) * ce(labels[partner])
  onehot = lambda y: (1 - smooth) * np.eye(8)[y] + smooth / 8
  target = lam * onehot(labels) + (1 - lam) * onehot(labels[partner])
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  np.testing.assert_allclose(float(ours), -(target * logp).sum(-1).mean(), rtol=1e-5)


def test_pairs_stay_within_each_devices_shard():
  x = np.arange(8)
  assert list(mixing.mirror(jnp.asarray(x), 4)) == [1, 0, 3, 2, 5, 4, 7, 6]
  assert list(mixing.partner_index(8, 2)) == [3, 2, 1, 0, 7, 6, 5, 4]
  with pytest.raises(ValueError, match="does not split into 3 shards"):
    mixing.mirror(jnp.asarray(x), 3)
  # On a 4-device mesh with the batch split over the devices, mixing moves no image between
  # them: no collective in the compiled step (the whole-batch mirror all-gathers the images).
  from jax.sharding import NamedSharding, PartitionSpec as P
  from affect_jax import sharding
  mesh = sharding.make_mesh((4, 1, 1), jax.devices()[:4])
  spec = NamedSharding(mesh, P(("data", "fsdp")))
  images = jax.device_put(jnp.zeros((8, 16, 16, 3)), spec)

  def compiled(shards):
    f = jax.jit(lambda rng, x: mixing.mix_batch(rng, x, mixup_alpha=0.8, cutmix_alpha=1.0,
                                                num_shards=shards)[0], out_shardings=spec)
    return f.lower(jax.random.key(0), images).compile().as_text()
  collectives = ("all-gather", "all-to-all", "collective-permute", "all-reduce")
  assert not any(c in compiled(4) for c in collectives)
  assert any(c in compiled(1) for c in collectives)
