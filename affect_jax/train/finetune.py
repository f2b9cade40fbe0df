"""Frame fine-tuning: the MAE encoder + pooling + linear head on expression labels.

  model = create_model(config)
  state = create_train_state(config, model, rng, mesh, schedule, init_params)
  state, metrics = train_step(state, batch)           # jitted, sharded, state donated
  train_and_evaluate(config, workdir)                  # launch/finetune.py; best by macro-F1
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from affect_jax import checkpoint, flops, losses, metrics, optim, sharding
from affect_jax.data import affwild2, augment, loaders, mixing, sources
from affect_jax.models import vit
from affect_jax.train import loop, pretrain

TASK = "EXPR"
NUM_CLASSES = len(affwild2.EXPR_NAMES)


def frame_records(root: str, split: str,
                  max_unmatched: float = affwild2.MAX_UNMATCHED_FRAMES) -> list[dict]:
  """{'path', 'label'} for every frame of `split` of the tree at `root` with a valid
  expression label (`sources.FolderFrames.expr_records`)."""
  return sources.FolderFrames(root, max_unmatched).expr_records(split)


def expr_records(config: ml_collections.ConfigDict, split: str) -> Sequence:
  """The labelled frames of `split` from the config's source (`sources.frames`): the tree at
  data.root or the built aff_wild2_frames dataset, the same records (bytes for paths)."""
  return sources.frames(config).expr_records(split)


def class_weights(labels: np.ndarray, kind: str) -> np.ndarray | None:
  """Per-class loss weights from training frequencies, normalised to mean 1 over present
  classes; classes absent from training get weight 0 (they have no examples anyway)."""
  if kind == "none":
    return None
  counts = np.bincount(labels, minlength=NUM_CLASSES).astype(np.float64)
  if kind == "inverse":
    w = np.where(counts > 0, 1.0 / np.maximum(counts, 1), 0.0)
  elif kind == "sqrt_inverse":
    w = np.where(counts > 0, 1.0 / np.sqrt(np.maximum(counts, 1)), 0.0)
  else:
    raise ValueError(f"config.class_weighting: unknown {kind!r} (none | inverse | sqrt_inverse)")
  return (w / w[counts > 0].mean()).astype(np.float32)


def create_model(config: ml_collections.ConfigDict, num_classes: int = NUM_CLASSES) -> vit.VisionTransformer:
  m = config.model
  return vit.VisionTransformer(
      **vit.variant_config(m.variant, decoder=False), num_classes=num_classes, pool=m.pool,
      drop_path_rate=m.drop_path_rate, dtype=jnp.dtype(m.dtype),
      kernels=m.get("kernels", "auto"), remat=m.get("remat", "none"),
      scan_layers=m.get("scan_layers", False), pos_embed=m.get("pos_embed", "sincos"))


def train_flops(config: ml_collections.ConfigDict, batch: int,
                num_classes: int = NUM_CLASSES) -> float:
  """Model FLOPs of the train step of `config` on `batch` images (`flops.vit_train_flops`):
  what the logged TFLOP/s and MFU, and the benchmarks', count."""
  return flops.vit_train_flops(config.model.variant, config.data.image_size, batch, num_classes)


def initial_encoder(config: ml_collections.ConfigDict) -> dict | None:
  """Pretrained params to start from (host arrays), or None for random init."""
  kind = config.init.kind
  if kind == "random":
    return None
  if kind == "mae":
    if not config.init.mae_workdir:
      raise ValueError("config.init.kind='mae' needs config.init.mae_workdir (a pretraining --workdir)")
    mae_config, params = pretrain.load_pretrained(config.init.mae_workdir)
    if mae_config.model.variant != config.model.variant:
      raise ValueError(f"{config.init.mae_workdir}: pretrained variant {mae_config.model.variant!r}, "
                       f"config.model.variant is {config.model.variant!r}")
    return params
  if kind == "converted":
    if not config.init.params_path:
      raise ValueError("config.init.kind='converted' needs config.init.params_path")
    return checkpoint.restore_tree(config.init.params_path)
  raise ValueError(f"config.init.kind: unknown {kind!r} (mae | converted | random)")


def create_train_state(config, model, rng, mesh, schedule, pretrained: dict | None,
                       abstract: bool = False):
  """Sharded TrainState: AdamW with layer-wise LR decay over the ViT's params, the encoder's
  filled from `pretrained` (host arrays) when given."""
  size = config.data.image_size
  tx = optax.chain(optim.make_optimizer(config.optim, schedule=schedule),
                   optim.layerwise_lr_decay(config.layer_decay, model.depth))

  def init(r):
    params = model.init({"params": r}, jnp.zeros((1, size, size, 3), jnp.float32))["params"]
    if pretrained is not None:
      # Keep the logical-axis boxes of the fresh init; fill them with the pretrained values.
      loaded = vit.load_mae_encoder(nn.meta.unbox(params), pretrained)
      params = jax.tree.map(lambda box, value: box.replace_boxed(value) if isinstance(
          box, nn.meta.AxisMetadata) else value, params, loaded,
          is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))
    return loop.TrainState.create(apply_fn=model.apply, params=params, tx=tx)

  return loop.create_state(config, init, rng, mesh, abstract)


def train_step(state, batch, *, model, seed, schedule, weights, label_smoothing, image_size,
               mixup_alpha=0.0, cutmix_alpha=0.0, mix_switch_prob=0.5, mix_shards=1,
               grad_accum_steps=1):
  """One step of masked (class-weighted, label-smoothed) cross-entropy on augmented images
  (or augmented here: `augment.batch_images`), on Mixup/CutMix
  batches when their alphas are > 0 (`affect_jax.data.mixing`; pairs within each of
  `mix_shards` blocks of the batch, one per data-parallel device). With `grad_accum_steps`
  > 1 the gradient is the mean over that many micro-batches (`optim.accumulate_gradients`)."""
  rng = jax.random.fold_in(jax.random.key(seed), state.step)
  mixed = mixup_alpha > 0 or cutmix_alpha > 0

  def loss_and_grad(params, micro, index):
    micro_rng = rng if grad_accum_steps == 1 else jax.random.fold_in(rng, index + 2)
    images, labels = augment.batch_images(micro, image_size), micro["label"]
    if mixed:
      images, _, lam = mixing.mix_batch(
          jax.random.fold_in(micro_rng, 1), images, mixup_alpha=mixup_alpha,
          cutmix_alpha=cutmix_alpha, switch_prob=mix_switch_prob, num_shards=mix_shards)
    mask = jnp.ones(labels.shape, jnp.float32)

    def loss_fn(p):
      logits = model.apply({"params": p}, images, train=True, rngs={"dropout": micro_rng})
      ce = functools.partial(losses.masked_cross_entropy, logits, mask=mask,
                             class_weights=weights, label_smoothing=label_smoothing)
      loss = ce(labels)
      if mixed:
        loss = lam * loss + (1.0 - lam) * ce(mixing.mirror(labels, mix_shards))
      return loss, jnp.mean(jnp.argmax(logits, -1) == labels)
    return jax.value_and_grad(loss_fn, has_aux=True)(params)

  (loss, acc), grads = optim.accumulate_gradients(loss_and_grad, state.params, batch,
                                                  grad_accum_steps)
  acc = jnp.mean(acc)
  return state.apply_gradients(grads=grads), {
      "loss": loss, "accuracy": acc, "grad_norm": optim.global_norm(grads), "lr": schedule(state.step)}


def jit_train_step(model, config, schedule, state_shardings, mesh, weights=None):
  """The sharded, jitted step (`loop.jit_step`)."""
  step = functools.partial(train_step, model=model, seed=config.seed, schedule=schedule,
                           weights=None if weights is None else jnp.asarray(weights),
                           label_smoothing=config.label_smoothing,
                           image_size=config.data.image_size,
                           mixup_alpha=config.get("mixup", 0.0),
                           cutmix_alpha=config.get("cutmix", 0.0),
                           mix_switch_prob=config.get("mix_switch_prob", 0.5),
                           mix_shards=sharding.batch_divisor(mesh),
                           grad_accum_steps=config.get("grad_accum_steps", 1))
  return loop.jit_step(step, config, mesh, state_shardings,
                       {"image": sharding.batch_sharding(mesh, 4),
                        "label": sharding.batch_sharding(mesh, 1),
                        **augment.batch_shardings(mesh, config.data)})


def make_apply_fn(model, mesh):
  """jitted (params, uint8 images [B, H, W, 3]) -> logits [B, C], split over the batch."""
  return jax.jit(lambda p, x: model.apply({"params": p}, loaders.normalize_images(x)),
                 out_shardings=sharding.batch_sharding(mesh, 2))


def predict_logits(model, params, records, *, image_size: int, batch_size: int, mesh,
                   apply_fn=None, **loader_options) -> tuple[np.ndarray, np.ndarray]:
  """(logits [N, C], labels [N]) over the readable records, all processes' together (each
  process computes its share of the records; `loader_options` as `loaders.options`)."""
  fn = apply_fn or make_apply_fn(model, mesh)
  rows = sharding.batch_rows(batch_size, mesh)
  spec = {"image": jax.ShapeDtypeStruct((image_size, image_size, 3), np.uint8)}
  outs, labels = [], []
  for batch, logits in sharding.map_batches(
      lambda b: fn(params, b["image"]), loaders.eval_dataset(records, image_size=image_size,
                                                            batch_size=rows, **loader_options),
      mesh, rows=rows, row_spec=spec):
    outs.append(logits)
    labels.append(batch["label"])
  num_classes = model.num_classes
  logits = np.concatenate(outs) if outs else np.zeros((0, num_classes), np.float32)
  labels = np.concatenate(labels) if labels else np.zeros((0,), np.int32)
  return sharding.allgather_rows(logits), sharding.allgather_rows(labels)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, hooks: tuple = ()) -> dict[str, Any]:
  """Fine-tunes (or resumes) in `workdir`; the state with the best validation macro-F1 is
  exported to `workdir/best`. Returns the final state, history and the best record."""
  stage = loop.Stage.open(config, workdir, "finetune")
  workdir, mesh = stage.workdir, stage.mesh
  train, val = (expr_records(config, split) for split in (affwild2.TRAIN_SET, affwild2.VALIDATION_SET))
  train_labels = train.column("label") if hasattr(train, "column") else np.array([r["label"] for r in train])
  weights = class_weights(train_labels, config.class_weighting)
  steps_per_epoch = max(len(train) // config.batch_size, 1)
  total = stage.plan(steps_per_epoch)
  model = create_model(config)
  state, shardings = create_train_state(config, model, jax.random.key(config.seed), mesh,
                                        stage.schedule, initial_encoder(config))
  train_fn = jit_train_step(model, config, stage.schedule, shardings, mesh, weights)
  apply_fn = make_apply_fn(model, mesh)

  def evaluate(st):
    logits, labels = predict_logits(model, st.params, val, image_size=config.data.image_size,
                                    batch_size=config.eval_batch_size, mesh=mesh, apply_fn=apply_fn,
                                    **loaders.options(config.data))
    pred = logits.argmax(-1)
    return {"f1": metrics.expr_f1(pred, labels), "accuracy": float(np.mean(pred == labels))}

  data = stage.image_batches(train)
  logging.info("fine-tune %s (init %s): %d train / %d val frames, %d steps of %d",
               config.model.variant, config.init.kind, len(train), len(val), total, config.batch_size)
  state, history = stage.run(
      state, train_fn, data, items_per_step=config.batch_size, unit="img",
      flops_per_item=train_flops(config, 1, model.num_classes),
      prefetch=config.data.prefetch, hooks=tuple(hooks), eval_fn=evaluate,
      eval_every=max(int(round(config.eval_every_epochs * steps_per_epoch)), 1),
      best_metric="f1", best_mode="max")
  return {"state": state, "history": history, "best": checkpoint.read_best(workdir), "num_steps": total}


def load_finetuned(workdir: str) -> tuple[ml_collections.ConfigDict, vit.VisionTransformer, dict]:
  """(config, model, params) of the best state of a fine-tuning run, as host arrays (any
  mesh or process count may have written it)."""
  config = checkpoint.run_config(workdir)
  return config, create_model(config), checkpoint.load_params(workdir, "best")["params"]
