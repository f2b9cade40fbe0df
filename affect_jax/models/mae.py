"""Masked Autoencoder (He et al. 2022), in the facebookresearch/mae layout.

The encoder sees only the visible patches (+ CLS); a light decoder sees every position, with
a shared learned mask token where a patch was removed, and predicts its pixels. The loss is
the MSE on the removed patches only, against per-patch normalised pixels.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from affect_jax.models import layers, vit
from affect_jax.models.vit import patchify, unpatchify  # noqa: F401  (re-exported)

Dtype = Any


def num_visible(num_patches: int, mask_ratio: float) -> int:
  """Patches the encoder keeps: round(N * (1 - mask_ratio)).

  The reference truncates (`int(N * (1 - mask_ratio))`); both give 49 of 196 at 0.75, but
  truncation loses one patch to float error elsewhere (10 * (1 - 0.9) = 0.999...).
  """
  return int(round(num_patches * (1.0 - mask_ratio)))


def random_masking(x, mask_ratio: float, rng):
  """Per-sample random masking by argsort of uniform noise, as in MAE.

  Args:
    x: [B, N, D] tokens.
    mask_ratio: fraction removed; a Python float (it fixes the visible token count).
    rng: PRNG key.

  Returns:
    x_visible: [B, K, D] the kept tokens, K = num_visible(N, mask_ratio), in shuffled order.
    mask: [B, N] float32, 1 where removed, 0 where kept.
    ids_restore: [B, N] int32, the inverse permutation that unshuffles [kept, removed].
  """
  batch, n, _ = x.shape
  keep = num_visible(n, mask_ratio)
  noise = jax.random.uniform(rng, (batch, n))
  ids_shuffle = jnp.argsort(noise, axis=1)  # ascending: the smallest noise is kept
  ids_restore = jnp.argsort(ids_shuffle, axis=1)
  x_visible = jnp.take_along_axis(x, ids_shuffle[:, :keep, None], axis=1)  # [B, K, D]
  # Token i is removed iff its rank in the shuffle is past the kept prefix.
  mask = (ids_restore >= keep).astype(jnp.float32)
  return x_visible, mask, ids_restore.astype(jnp.int32)


def mae_loss(pred, target, mask, norm_pix_loss: bool = True):
  """Mean over removed patches of the per-patch pixel MSE. Float32.

  Args:
    pred, target: [B, N, p*p*C]; target is `patchify(imgs)`.
    mask: [B, N], 1 on removed patches.
    norm_pix_loss: normalise each target patch by its mean and unbiased variance (torch's
      `var` default, as the reference), eps 1e-6 inside the square root.
  """
  pred, target, mask = (a.astype(jnp.float32) for a in (pred, target, mask))
  if norm_pix_loss:
    mean = target.mean(axis=-1, keepdims=True)
    var = target.var(axis=-1, keepdims=True, ddof=1)
    target = (target - mean) / jnp.sqrt(var + 1e-6)
  loss = jnp.mean((pred - target) ** 2, axis=-1)  # [B, N]
  # max(., 1): mask_ratio=0 (nothing removed) gives loss 0 rather than the reference's NaN.
  return jnp.sum(loss * mask) / jnp.maximum(jnp.sum(mask), 1.0)


class MaskedAutoencoder(nn.Module):
  """ViT MAE. `__call__` returns (loss, pred [B, N, p*p*C], mask [B, N]).

  RNG streams: 'masking' (always), 'dropout' (drop-path, when training with a rate > 0).
  """
  patch_size: int
  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  decoder_width: int
  decoder_depth: int
  decoder_num_heads: int
  decoder_mlp_dim: int
  mask_ratio: float = 0.75
  norm_pix_loss: bool = True
  drop_path_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  kernels: str = "auto"
  remat: str = "none"  # vit.REMAT_POLICIES, for the encoder's and decoder's blocks
  scan_layers: bool = False  # vit.Encoder: both stacks under nn.scan, params stacked

  @nn.compact
  def __call__(self, imgs, *, mask_ratio: float | None = None, train: bool):
    mask_ratio = self.mask_ratio if mask_ratio is None else mask_ratio
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype,
              kernels=self.kernels)
    batch = imgs.shape[0]
    grid = (imgs.shape[1] // self.patch_size, imgs.shape[2] // self.patch_size)
    pos = vit.sincos_pos_embed_2d(self.width, grid)  # [1 + N, D]
    decoder_pos = vit.sincos_pos_embed_2d(self.decoder_width, grid)  # [1 + N, Dd]

    # Encoder: visible patches + CLS.
    x = vit.PatchEmbed(self.patch_size, self.width, name="patch_embed", **kw)(imgs)
    x = x + pos[1:]  # [B, N, D]
    x, mask, ids_restore = random_masking(x, mask_ratio, self.make_rng("masking"))
    cls = vit.cls_token_param(self, self.width, self.param_dtype) + pos[:1]
    x = jnp.concatenate([jnp.broadcast_to(cls, (batch, 1, self.width)), x], axis=1)
    x = vit.Encoder(self.depth, self.num_heads, self.mlp_dim, self.drop_path_rate,
                    name="encoder", remat=self.remat, scan_layers=self.scan_layers, **kw)(
                        x, deterministic=not train)  # [B, 1 + K, D]

    # Decoder: every position, mask tokens where patches were removed, back in grid order.
    # ('embed', None): both widths are 'embed', and one mesh axis cannot shard two dims.
    x = layers.Dense(self.decoder_width, ("embed", None), name="decoder_embed",
                     **kw)(x)  # [B, 1 + K, Dd]
    mask_token = self.param(
        "mask_token",
        nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, None, "embed")),
        (1, 1, self.decoder_width), self.param_dtype)
    num_removed = mask.shape[1] - (x.shape[1] - 1)
    y = jnp.concatenate(
        [x[:, 1:], jnp.broadcast_to(mask_token, (batch, num_removed, self.decoder_width))],
        axis=1)  # [B, N, Dd], shuffled order
    y = jnp.take_along_axis(y, ids_restore[:, :, None], axis=1)  # grid order
    y = jnp.concatenate([x[:, :1], y], axis=1) + decoder_pos  # [B, 1 + N, Dd]
    y = vit.Encoder(self.decoder_depth, self.decoder_num_heads, self.decoder_mlp_dim,
                    name="decoder", remat=self.remat, scan_layers=self.scan_layers,
                    **kw)(y, deterministic=not train)
    pred = layers.Dense(self.patch_size ** 2 * imgs.shape[-1], ("embed", "patch"),
                        name="decoder_pred", **kw)(y)[:, 1:]  # [B, N, p*p*C]
    pred = pred.astype(jnp.float32)

    loss = mae_loss(pred, patchify(imgs, self.patch_size), mask, self.norm_pix_loss)
    return loss, pred, mask
