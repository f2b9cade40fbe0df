"""MAE's random-resized-crop + flip on the device, inside the jitted step (`data.augment='device'`).

On a host feeding accelerators the bicubic crop-resize costs more CPU than anything else the
loader does (more than decoding a 224 px JPEG); on the device it is two small matmuls per
image. The host then only decodes and draws the random numbers: `loaders.CropBoxFlip` ships
the image at its stored size with its crop box and flip, drawn exactly as the host
augmentation (`loaders.RandomResizedCropFlip`) draws them, and the step calls `batch_images`:

  images = augment.batch_images(batch, image_size)   # float32, normalised, [B, S, S, 3]

The resampling is PIL's bicubic (Keys a = -0.5, half-pixel centres, the kernel widened by the
downscale factor, taps clamped to the image and renormalised; `jax.image.scale_and_translate`),
one pass along the rows and then one along the columns, each back to whole levels as PIL's
uint8 passes are: the two differ by at most one level (PIL's weights are fixed-point). Each
image is resampled alone, so the batch stays split over the devices as it arrived (no
collective).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from affect_jax import sharding
from affect_jax.data import loaders

MODES = ("host", "device")
CROP, FLIP = "crop", "flip"


def mode(data) -> str:
  """A stage's `config.data.augment`, checked."""
  kind = data.get("augment", "host")
  if kind not in MODES:
    raise ValueError(f"config.data.augment: unknown {kind!r} (host | device)")
  return kind


def crop_resize_flip(images: jax.Array, crops: jax.Array, flips: jax.Array, size: int) -> jax.Array:
  """uint8 [B, H, W, C] images, crop boxes float [B, 4] (left, top, right, bottom in pixels,
  PIL's `box`), flips bool [B] -> float32 [B, size, size, C] of integers in [0, 255]: each
  box resized to size x size (bicubic), then mirrored left-right where its flip is set."""

  def to_levels(x):  # PIL's uint8 after each pass: rounded half up, clipped
    return jnp.clip(jnp.floor(x + 0.5), 0.0, 255.0)

  def one(image, crop, flip):
    left, top, right, bottom = crop[0], crop[1], crop[2], crop[3]
    x = image.astype(jnp.float32)
    # PIL's order: along the rows first, then the columns, each pass back to whole levels
    # (bicubic overshoots at sharp edges, and the clip between the passes shows there).
    sx, sy = size / (right - left), size / (bottom - top)
    x = to_levels(jax.image.scale_and_translate(
        x, (x.shape[0], size, x.shape[-1]), (1,), sx[None], (-left * sx)[None],
        method="cubic", antialias=True))
    x = to_levels(jax.image.scale_and_translate(
        x, (size, size, x.shape[-1]), (0,), sy[None], (-top * sy)[None],
        method="cubic", antialias=True))
    return jnp.where(flip, x[:, ::-1], x)

  return jax.vmap(one)(images, crops.astype(jnp.float32), flips)


def batch_images(batch: dict, image_size: int, dtype=None) -> jax.Array:
  """The step's normalised images (`loaders.normalize_images`) of a batch: augmented here
  when the loader left it to the device (the batch has crop boxes), else as they came."""
  images = batch["image"]
  if CROP in batch:
    images = crop_resize_flip(images, batch[CROP], batch[FLIP], image_size)
  return loaders.normalize_images(images, dtype)


def loader_options(data) -> dict:
  """The `loaders.pretrain_dataset` arguments a stage's `config.data` sets: augment,
  source_size."""
  return {"augment": mode(data), "source_size": int(data.get("source_size", 0))}


def batch_shardings(mesh, data) -> dict:
  """The in-shardings of the fields a device-augmented batch adds (none for 'host')."""
  if mode(data) == "host":
    return {}
  return {CROP: sharding.batch_sharding(mesh, 2), FLIP: sharding.batch_sharding(mesh, 1)}
