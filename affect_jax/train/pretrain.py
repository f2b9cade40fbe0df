"""MAE self-pretraining: pure step functions and the loop around them.

  state = create_train_state(config, model, rng, total_steps, mesh)
  state, metrics = train_step(state, batch)          # jitted, sharded, state donated
  train_and_evaluate(config, workdir)                 # what launch/pretrain.py calls
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from PIL import Image

from affect_jax import checkpoint, fileio, flops, optim, sharding
from affect_jax.data import augment, loaders, sources
from affect_jax.models import mae, vit
from affect_jax.train import loop


def create_model(config: ml_collections.ConfigDict) -> mae.MaskedAutoencoder:
  m = config.model
  return mae.MaskedAutoencoder(
      **vit.variant_config(m.variant), mask_ratio=m.mask_ratio, norm_pix_loss=m.norm_pix_loss,
      drop_path_rate=m.drop_path_rate, dtype=jnp.dtype(m.dtype),
      kernels=m.get("kernels", "auto"), remat=m.get("remat", "none"),
      scan_layers=m.get("scan_layers", False))


def train_flops(config: ml_collections.ConfigDict, batch: int) -> float:
  """Model FLOPs of the train step of `config` on `batch` images (`flops.mae_train_flops`):
  what the logged TFLOP/s and MFU, and the benchmarks', count."""
  return flops.mae_train_flops(config.model.variant, config.data.image_size,
                               config.model.mask_ratio, batch)


def create_train_state(config, model, rng, mesh, schedule, abstract: bool = False):
  """Sharded TrainState; parameters and AdamW moments laid out by the logical rules."""
  size = config.data.image_size
  tx = optim.make_optimizer(config.optim, schedule=schedule)

  def init(r):
    params_rng, mask_rng = jax.random.split(r)
    variables = model.init({"params": params_rng, "masking": mask_rng},
                           jnp.zeros((1, size, size, 3), jnp.float32), train=False)
    return loop.TrainState.create(apply_fn=model.apply, params=variables["params"], tx=tx)

  return loop.create_state(config, init, rng, mesh, abstract)


def train_step(state: loop.TrainState, batch: dict, *, model: mae.MaskedAutoencoder, seed: int,
               schedule, image_size: int, grad_accum_steps: int = 1) -> tuple[loop.TrainState, dict]:
  """One AdamW step on the MAE loss. batch['image']: uint8 [B, H, W, 3], augmented, or with
  the crop boxes and flips the device applies (`augment.batch_images`). With
  `grad_accum_steps` > 1 the gradient is the mean over that many micro-batches
  (`optim.accumulate_gradients`), each with masks of its own."""
  # Randomness is a function of (seed, step): a resumed run draws the same masks.
  rng = jax.random.fold_in(jax.random.key(seed), state.step)

  def loss_and_grad(params, micro, index):
    micro_rng = rng if grad_accum_steps == 1 else jax.random.fold_in(rng, index)
    mask_rng, drop_rng = jax.random.split(micro_rng)
    images = augment.batch_images(micro, image_size)

    def loss_fn(p):
      loss, _, _ = model.apply({"params": p}, images, train=True,
                               rngs={"masking": mask_rng, "dropout": drop_rng})
      return loss, ()
    return jax.value_and_grad(loss_fn, has_aux=True)(params)

  (loss, _), grads = optim.accumulate_gradients(loss_and_grad, state.params, batch,
                                                grad_accum_steps)
  metrics = {"loss": loss, "grad_norm": optim.global_norm(grads), "lr": schedule(state.step)}
  return state.apply_gradients(grads=grads), metrics


def jit_train_step(model, config, schedule, state_shardings, mesh):
  """The sharded, jitted step (`loop.jit_step`)."""
  step = functools.partial(train_step, model=model, seed=config.seed, schedule=schedule,
                           image_size=config.data.image_size,
                           grad_accum_steps=config.get("grad_accum_steps", 1))
  return loop.jit_step(step, config, mesh, state_shardings,
                       {"image": sharding.batch_sharding(mesh, 4),
                        **augment.batch_shardings(mesh, config.data)})


def heldout_loss(model: mae.MaskedAutoencoder, params, paths, *, image_size: int, seed: int = 0,
                 batch_size: int = 64) -> float:
  """Mean MAE loss over the images `paths` (resized, no augmentation), each batch masked with
  fold_in(key(seed), batch index): a reproducible reconstruction score of a set of weights on
  images it never trained on. Full batches only; one process."""
  loss_fn = jax.jit(lambda p, x, rng: model.apply(
      {"params": p}, loaders.normalize_images(x), train=False, rngs={"masking": rng})[0])
  losses = []
  ds = loaders.eval_dataset(list(paths), image_size=image_size, batch_size=batch_size,
                            shard_index=0, shard_count=1)
  for i, batch in enumerate(ds):
    if len(batch["image"]) == batch_size:
      losses.append(float(loss_fn(params, batch["image"], jax.random.fold_in(jax.random.key(seed), i))))
  if not losses:
    raise ValueError(f"heldout_loss: fewer than {batch_size} readable images")
  return float(np.mean(losses))


# ---- Reconstruction picture ----


def reconstruct(model: mae.MaskedAutoencoder, params, images_uint8: np.ndarray, seed: int = 0):
  """(masked, reconstruction) pixel images in [0, 255], float [B, H, W, 3], MAE-paper style: the
  visible patches are pasted over the prediction, which is de-normalised per patch when the
  model predicts normalised pixels."""
  x = loaders.normalize_images(images_uint8)
  _, pred, mask = model.apply({"params": params}, x, train=False,
                              rngs={"masking": jax.random.key(seed)})
  p = model.patch_size
  target = vit.patchify(x, p)
  if model.norm_pix_loss:
    mean = target.mean(-1, keepdims=True)
    var = target.var(-1, keepdims=True, ddof=1)
    pred = pred * jnp.sqrt(var + 1e-6) + mean
  m = mask[..., None]
  grid = (x.shape[1] // p, x.shape[2] // p)
  masked = vit.unpatchify(target * (1 - m), p, grid)
  recon = vit.unpatchify(pred * m + target * (1 - m), p, grid)
  to_pixels = lambda y: jnp.clip((y * loaders.IMAGENET_STD + loaders.IMAGENET_MEAN) * 255, 0, 255)
  return to_pixels(masked), to_pixels(recon)


def reconstruction_grid(images: np.ndarray, masked: np.ndarray, recon: np.ndarray) -> np.ndarray:
  """Rows: original / masked / reconstruction; one column per image (uint8 [3H, B*W, 3])."""
  rows = [np.concatenate(list(np.asarray(a).round().astype(np.uint8)), axis=1)
          for a in (images, masked, recon)]
  return np.concatenate(rows, axis=0)


def save_png(path, image: np.ndarray) -> None:
  """Process 0 writes the PNG (atomically); the other processes' calls do nothing."""
  if jax.process_index() == 0:
    fileio.atomic_write(path, Image.fromarray(image).save)


# ---- The loop ----


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       hooks: tuple = ()) -> dict[str, Any]:
  """Pretrains (or resumes) in `workdir`; returns the final state and the loss history.

  `hooks` run after each logged step with (step, state, metrics), after that step's
  checkpoint (if due) was started.
  """
  stage = loop.Stage.open(config, workdir, "pretrain")
  workdir, mesh = stage.workdir, stage.mesh
  paths = sources.face_items(config)
  loaders.check_readable(paths, ",".join(sources.face_roots(config)), "the face corpus")
  total = stage.plan(len(paths) / config.batch_size)
  model = create_model(config)
  state, shardings = create_train_state(config, model, jax.random.key(config.seed), mesh,
                                        stage.schedule)
  train_fn = jit_train_step(model, config, stage.schedule, shardings, mesh)
  ds = stage.image_batches(paths)
  logging.info("MAE %s: %d images, %d steps of %d, %.1fM params, mesh %s", config.model.variant,
               len(paths), total, config.batch_size,
               sum(x.size for x in jax.tree.leaves(state.params)) / 1e6, dict(mesh.shape))

  writer = loop.MetricWriter(workdir / "tb")
  hooks = list(hooks)
  if config.recon_every:
    # The same images on every process: the picture is computed by all, written by one.
    sample = next(iter(loaders.pretrain_dataset(
        paths, image_size=config.data.image_size, batch_size=8, seed=12345, num_epochs=1,
        crop_scale=(1.0, 1.0), flip=False, shard_index=0, shard_count=1,
        worker_count=0)))["image"]  # 8 images: no worker processes for them
    recon_fn = jax.jit(functools.partial(reconstruct, model), out_shardings=sharding.replicated(mesh))

    def recon_hook(step, st, _):
      if step % config.recon_every and step != total:
        return
      masked, recon = recon_fn(st.params, sample)
      grid = reconstruction_grid(sample, masked, recon)
      save_png(workdir / "recon" / f"step_{step:07d}.png", grid)
      save_png(workdir / "recon" / "latest.png", grid)
      writer.image("reconstruction", step, grid)

    hooks.append(recon_hook)
  state, history = stage.run(
      state, train_fn, ds, items_per_step=config.batch_size, unit="img",
      flops_per_item=train_flops(config, 1),
      prefetch=config.data.prefetch, writer=writer, hooks=tuple(hooks))
  writer.close()
  return {"state": state, "history": history, "num_steps": total, "num_images": len(paths)}


def load_pretrained(workdir: str) -> tuple[ml_collections.ConfigDict, dict]:
  """(config, params) of the newest checkpoint of a pretraining run, as host arrays (any
  mesh or process count may have written it)."""
  config = checkpoint.run_config(workdir)
  return config, checkpoint.load_params(workdir, "latest")["params"]
