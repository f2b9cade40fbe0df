"""Optimizers and learning-rate schedules (optax), built from a config.

Config fields (`config.optim`): name ('adamw'), lr (absolute) or base_lr (scaled by
batch/256, the MAE convention), b1, b2, eps, weight_decay, warmup_steps / warmup_epochs,
schedule ('cosine' | 'constant'), min_lr, init_lr, grad_clip (0 = off).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

# Parameters that get no weight decay besides biases and norm scales (all 1-D): the MAE
# recipe also exempts the learned tokens and position embeddings.
NO_DECAY_NAMES = ("cls_token", "mask_token", "pos_embedding", "pos_embed")


def learning_rate(optim: ml_collections.ConfigDict, batch_size: int) -> float:
  if optim.get("lr") is not None:
    return float(optim.lr)
  return float(optim.base_lr) * batch_size / 256


def lr_schedule(optim: ml_collections.ConfigDict, *, batch_size: int, total_steps: int,
                warmup_steps: int) -> optax.Schedule:
  """Linear warmup from `init_lr` then cosine to `min_lr` (or constant), per step."""
  peak = learning_rate(optim, batch_size)
  init = float(optim.get("init_lr", 0.0))
  end = float(optim.get("min_lr", 0.0))
  warmup_steps = min(int(warmup_steps), max(total_steps - 1, 0))
  if optim.get("schedule", "cosine") == "constant":
    main = optax.constant_schedule(peak)
  else:
    main = optax.cosine_decay_schedule(peak, max(total_steps - warmup_steps, 1), alpha=end / peak if peak else 0.0)
  if warmup_steps == 0:
    return main
  warm = optax.linear_schedule(init, peak, warmup_steps)
  return optax.join_schedules([warm, main], [warmup_steps])


def total_steps(config: ml_collections.ConfigDict, steps_per_epoch: float) -> int:
  """config.num_steps when set (> 0), else num_epochs worth of steps."""
  if config.num_steps > 0:
    return int(config.num_steps)
  return max(int(math.ceil(config.num_epochs * steps_per_epoch)), 1)


def schedule_for(config: ml_collections.ConfigDict, total: int) -> optax.Schedule:
  """The config's lr schedule over `total` steps, warming up for the same fraction of the
  run as warmup_epochs / num_epochs (so a run shortened with num_steps keeps its shape)."""
  warmup = int(round(total * config.warmup_epochs / max(config.num_epochs, 1e-9)))
  return lr_schedule(config.optim, batch_size=config.batch_size, total_steps=total,
                     warmup_steps=warmup)


def decay_mask(params):
  """True where weight decay applies: matrices and kernels, not biases/norms/tokens.

  Works on plain and on logically-boxed parameter trees (one bool per box).
  """
  def decide(path, x):
    value = x.unbox() if isinstance(x, nn.meta.AxisMetadata) else x
    name = str(getattr(path[-1], "key", path[-1]))
    return value.ndim > 1 and not any(n in name for n in NO_DECAY_NAMES)
  return jax.tree_util.tree_map_with_path(
      decide, params, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))


def global_norm(tree) -> jax.Array:
  """The L2 norm of all leaves together (what `optax.tree.norm` gives), as float32 dots.

  `optax.tree.norm` squares each leaf; XLA merges that square with AdamW's own g**2, and a
  value with two users is written out: one extra pass over every gradient per step. A dot of
  each leaf with itself reads it once.
  """
  leaves = [x.astype(jnp.float32).ravel() for x in jax.tree.leaves(tree)]
  return jnp.sqrt(sum(jnp.vdot(x, x) for x in leaves)) if leaves else jnp.float32(0.0)


def micro_batches(batch, steps: int):
  """Each [B, ...] leaf as [steps, B / steps, ...], micro-batch i holding rows i, i + steps,
  i + 2 steps, ...: strided, so with the batch split over devices in contiguous blocks every
  micro-batch keeps an equal share on every device (no data moves between them)."""
  def split(x):
    if x.shape[0] % steps:
      raise ValueError(f"a batch of {x.shape[0]} does not split into {steps} micro-batches")
    return jnp.swapaxes(x.reshape(x.shape[0] // steps, steps, *x.shape[1:]), 0, 1)
  return jax.tree.map(split, batch)


def accumulate_gradients(loss_and_grad, params, batch, steps: int):
  """((loss, aux), grads) averaged over `steps` micro-batches (`micro_batches`) of `batch`.

  `loss_and_grad(params, micro_batch, index)` returns ((loss, aux), grads) of one micro-batch
  (`index` is a traced int32, e.g. to fold into an rng). One optimizer update then sees the
  mean gradient of the whole batch while only one micro-batch's activations are alive at a
  time (a `lax.scan`); aux values are stacked along a leading [steps] axis. `steps=1` calls
  it once on the whole batch (index 0), aux without the extra axis.
  """
  if steps == 1:
    return loss_and_grad(params, batch, jnp.int32(0))

  def body(total, inputs):
    index, micro = inputs
    (loss, aux), grads = loss_and_grad(params, micro, index)
    return jax.tree.map(jnp.add, total, (loss.astype(jnp.float32), grads)), aux

  zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
  (loss, grads), aux = jax.lax.scan(body, zeros, (jnp.arange(steps, dtype=jnp.int32),
                                                  micro_batches(batch, steps)))
  return (loss / steps, aux), jax.tree.map(lambda g: g / steps, grads)


def make_optimizer(optim: ml_collections.ConfigDict, *,
                   schedule: optax.Schedule) -> optax.GradientTransformation:
  """optax AdamW (decoupled, masked weight decay) with optional global-norm clipping."""
  if optim.get("name", "adamw") != "adamw":
    raise ValueError(f"config.optim.name: unknown optimizer {optim.name!r} (supported: 'adamw')")
  tx = optax.adamw(schedule, b1=float(optim.b1), b2=float(optim.b2),
                   eps=float(optim.get("eps", 1e-8)),
                   weight_decay=float(optim.get("weight_decay", 0.0)), mask=decay_mask)
  if optim.get("grad_clip", 0.0):
    tx = optax.chain(optax.clip_by_global_norm(float(optim.grad_clip)), tx)
  return tx


def vit_layer_id(path: tuple[str, ...], num_layers: int) -> int | np.ndarray:
  """Layer of a ViT parameter for layer-wise lr decay (BEiT / MAE fine-tuning): patch
  embedding and CLS token 0, encoder block i -> i + 1, the rest (norms, head) num_layers + 1.
  The scanned layout's stacked `blocks` get the vector [1, ..., num_layers]."""
  for name in path:
    if name.startswith("blocks_") and name[len("blocks_"):].isdigit():
      return int(name[len("blocks_"):]) + 1
    if name == "blocks":
      return np.arange(1, num_layers + 1)
  if path and path[0] in ("patch_embed", "cls_token"):
    return 0
  return num_layers + 1


def layerwise_lr_decay(layer_decay: float, num_layers: int) -> optax.GradientTransformation:
  """Scales each parameter's update by layer_decay ** (num_layers + 1 - layer id): the head
  moves at the full lr, block i at decay^(L - i), the embeddings least. Chain it after the
  optimizer, so weight decay is scaled with the lr as in the BEiT/MAE recipe. Stacked
  (scanned) blocks are scaled slice by slice along their leading layer axis. Stateless."""
  def scale(path, update):
    keys = tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)
    layer = vit_layer_id(keys, num_layers)
    factor = np.asarray(layer_decay, np.float64) ** (num_layers + 1 - np.asarray(layer))
    if factor.ndim:
      if update.shape[:1] != factor.shape:
        raise ValueError(f"{'/'.join(keys)}: stacked blocks of leading size {update.shape[:1]}, "
                         f"expected {num_layers} layers")
      factor = factor.reshape((-1,) + (1,) * (update.ndim - 1))
    return update * factor.astype(update.dtype)

  def update_fn(updates, state, params=None):
    del params
    return jax.tree_util.tree_map_with_path(scale, updates), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)
