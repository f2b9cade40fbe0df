"""Batch-level Mixup and CutMix on device (the MAE / DeiT fine-tuning recipe), inside a jitted step.

  images, partner, lam = mix_batch(rng, images, mixup_alpha=0.8, cutmix_alpha=1.0)
  loss = lam * ce(logits, labels) + (1 - lam) * ce(logits, labels[partner])

As in timm's `Mixup` (mode 'batch'): one lambda per batch drawn from Beta(alpha, alpha), each
image mixed with its mirror in the batch (image i with image B-1-i), CutMix chosen over Mixup
with probability `switch_prob` when both are on, and CutMix's lambda corrected to the area of
the box actually pasted. Cross-entropy is linear in its targets, so the loss on the mixed
targets is exactly the lambda-weighted sum of the losses on the two integer labels.

On a mesh the batch is split into `num_shards` contiguous blocks, one per data-parallel device;
with `num_shards` set to that count each image is mirrored within its own block, so pairing
never moves an image between devices (a mirror of the whole batch would gather it on every
device). `num_shards=1` is timm's pairing.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def mirror(x: jax.Array, num_shards: int = 1) -> jax.Array:
  """x with each of its `num_shards` contiguous blocks of rows reversed (timm's `x.flip(0)`
  when 1): a reverse along an axis that is not sharded, so each device keeps its own rows."""
  if x.shape[0] % num_shards:
    raise ValueError(f"batch of {x.shape[0]} does not split into {num_shards} shards")
  blocks = x.reshape(num_shards, x.shape[0] // num_shards, *x.shape[1:])
  return blocks[:, ::-1].reshape(x.shape)


def partner_index(batch_size: int, num_shards: int = 1) -> jax.Array:
  """Whom each sample is mixed with: `mirror` of the row indices."""
  return mirror(jnp.arange(batch_size), num_shards)


def cutmix_box_mask(rng, height: int, width: int, lam) -> tuple[jax.Array, jax.Array]:
  """(bool [H, W] box of area ~(1 - lam) H W at a uniform centre, clipped to the image;
  lambda corrected to 1 - box area / image area)."""
  cut = jnp.sqrt(1.0 - lam)
  cut_h, cut_w = jnp.round(height * cut), jnp.round(width * cut)
  cy_rng, cx_rng = jax.random.split(rng)
  cy = jax.random.randint(cy_rng, (), 0, height)
  cx = jax.random.randint(cx_rng, (), 0, width)
  y0 = jnp.clip(cy - cut_h // 2, 0, height)
  y1 = jnp.clip(cy + cut_h // 2, 0, height)
  x0 = jnp.clip(cx - cut_w // 2, 0, width)
  x1 = jnp.clip(cx + cut_w // 2, 0, width)
  rows, cols = jnp.arange(height)[:, None], jnp.arange(width)[None, :]
  box = (rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1)
  return box, 1.0 - (y1 - y0) * (x1 - x0) / (height * width)


def mix_batch(rng, images: jax.Array, *, mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0,
              switch_prob: float = 0.5, num_shards: int = 1
              ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Mixes a batch of images [B, H, W, C] (float); returns (images, partner [B], lam), the
  partners paired within each of `num_shards` blocks (the labels' partners: `mirror`).

  With both alphas 0 the batch comes back unchanged with lam = 1.
  """
  batch = images.shape[0]
  partner = partner_index(batch, num_shards)
  if not (mixup_alpha > 0 or cutmix_alpha > 0):
    return images, partner, jnp.float32(1.0)
  choice_rng, mix_rng, cut_rng, box_rng = jax.random.split(rng, 4)
  if mixup_alpha > 0 and cutmix_alpha > 0:
    use_cutmix = jax.random.uniform(choice_rng) < switch_prob
  else:
    use_cutmix = jnp.bool_(cutmix_alpha > 0)
  mirrored = mirror(images, num_shards)

  lam_mix = jax.random.beta(mix_rng, mixup_alpha, mixup_alpha) if mixup_alpha > 0 else 1.0
  mixed = lam_mix * images + (1.0 - lam_mix) * mirrored

  lam_cut = jax.random.beta(cut_rng, cutmix_alpha, cutmix_alpha) if cutmix_alpha > 0 else 1.0
  box, lam_cut = cutmix_box_mask(box_rng, images.shape[1], images.shape[2], lam_cut)
  cut = jnp.where(box[None, :, :, None], mirrored, images)

  out = jnp.where(use_cutmix, cut, mixed).astype(images.dtype)
  lam = jnp.where(use_cutmix, lam_cut, lam_mix).astype(jnp.float32)
  return out, partner, lam
