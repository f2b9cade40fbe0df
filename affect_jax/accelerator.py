"""What a user runs first on a new GPU/TPU host (`launch/check_accelerator.py`): does this
code compute the same on these devices, and how fast.

1. devices: backend, kinds, count, jax version, the kernel set 'auto' picks here;
2. sharded == one device: two tiny MAE train steps over all devices (data parallel, then
   FSDP) against the same steps on one device;
3. kernel sets: the tiny ViT's loss and gradients with kernels 'xla' against 'cpu' (both are
   plain JAX and run anywhere) on this backend;
4. the MAE ViT-B/16 bf16 train step: img/s, TFLOP/s and MFU (`bench.bench_mae`), on a GPU
   also with cuDNN's attention (model.kernels='cudnn'); optionally traced, with the
   costliest XLA operations listed;
5. attention at ViT-B's shapes, forward and backward, per implementation of
   `jax.nn.dot_product_attention` ('xla', and 'cudnn' on GPUs);
6. the crop-resize + flip of `data.augment='device'` on these devices against PIL's on the
   host (within one level), and its time for a batch at 224 px;
7. a short tiny pretraining run on synthetic faces, augmented on the devices: the loss must
   fall.
Each check reports its figures or its error; the result is one JSON-able dict.

The configs come from the caller (launch/check_accelerator.py builds them from configs/):
the MAE pretraining config of the step benchmark (4.), and the tiny MAE config
(`configs/mae_pretrain.py:get_config("tiny")`) of the small checks (2., 6.), which set its
image size, batch and steps themselves. Neither is changed: the checks work on copies.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
import traceback

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from affect_jax import bench, optim, sharding
from affect_jax.data import augment, loaders, synthetic
from affect_jax.models import layers, vit
from affect_jax.train import pretrain


def _tiny_mae_steps(tiny_config: ml_collections.ConfigDict, mesh_shape, devices,
                    steps: int = 2):
  """(losses, params) of `steps` tiny MAE train steps on `devices` with `mesh_shape`, of
  `tiny_config` (the tiny MAE pretraining config) at 32 px, batch 16."""
  config = tiny_config.copy_and_resolve_references()
  config.data.image_size, config.batch_size = 32, 16
  mesh = sharding.make_mesh(mesh_shape, devices)
  model = pretrain.create_model(config)
  schedule = optim.schedule_for(config, 10)
  state, shardings = pretrain.create_train_state(config, model, jax.random.key(0), mesh, schedule)
  step = pretrain.jit_train_step(model, config, schedule, shardings, mesh)
  rng = np.random.default_rng(0)
  losses = []
  for _ in range(steps):
    images = rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)
    state, metrics = step(state, sharding.shard_batch({"image": images}, mesh))
    losses.append(float(metrics["loss"]))
  return losses, jax.device_get(state.params)


def check_sharded_steps(tiny_config: ml_collections.ConfigDict) -> dict:
  """Two tiny MAE steps (of `tiny_config`) sharded over every device against one device."""
  devices = jax.devices()
  n = len(devices)
  out = {"devices": n}
  if 16 % n:
    return {**out, "skipped": f"the tiny batch of 16 does not split over {n} devices"}
  ref_losses, ref_params = _tiny_mae_steps(tiny_config, (1, 1, 1), devices[:1])
  shapes = {"data_parallel": (n, 1, 1)}
  if n > 1:
    shapes["fsdp"] = (1, n, 1)
  for name, shape in shapes.items():
    losses, params = _tiny_mae_steps(tiny_config, shape, devices)
    diff = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
               for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)))
    rel = max(abs(a - b) / abs(b) for a, b in zip(losses, ref_losses))
    out[name] = {"loss_rel_diff": rel, "max_param_diff": diff, "ok": rel < 1e-3 and diff < 1e-2}
  return out


def check_kernel_sets() -> dict:
  import flax.linen as nn
  tiny = dict(patch_size=4, width=32, depth=2, num_heads=4, mlp_dim=64, num_classes=3)
  x = jnp.asarray(np.random.default_rng(1).uniform(size=(4, 16, 16, 3)), jnp.float32)
  params = nn.unbox(vit.VisionTransformer(**tiny).init(jax.random.key(0), x))["params"]
  out = {}
  for dtype in ("float32", "bfloat16"):
    results = {}
    for kernels in ("xla", "cpu"):
      model = vit.VisionTransformer(**tiny, dtype=jnp.dtype(dtype), kernels=kernels)
      f = lambda p: jnp.sum(jnp.sin(model.apply({"params": p}, x)))
      results[kernels] = jax.jit(jax.value_and_grad(f))(params)
    (va, ga), (vb, gb) = results["xla"], results["cpu"]
    flat = lambda g: np.concatenate([np.ravel(np.asarray(a, np.float64)) for a in jax.tree.leaves(g)])
    rel = float(np.linalg.norm(flat(ga) - flat(gb)) / np.linalg.norm(flat(gb)))
    tol = 1e-4 if dtype == "float32" else 5e-2
    out[dtype] = {"loss_diff": abs(float(va) - float(vb)), "grad_rel_diff": rel, "ok": rel < tol}
  return out


def bench_attention(batch: int = 256, tokens: int = 197, heads: int = 12, head_dim: int = 64,
                    steps: int = 10) -> dict:
  """Forward + backward of `jax.nn.dot_product_attention` in bf16 per implementation (ms)."""
  keys = jax.random.split(jax.random.key(0), 3)
  q, k, v = (jax.random.normal(key, (batch, tokens, heads, head_dim), jnp.bfloat16) for key in keys)
  impls = ["xla"] + (["cudnn"] if jax.default_backend() == "gpu" else [])
  out = {"shape": [batch, tokens, heads, head_dim]}
  for impl in impls:
    try:
      f = jax.jit(jax.grad(lambda q, k, v: jnp.sum(jax.nn.dot_product_attention(
          q, k, v, implementation=impl).astype(jnp.float32)), argnums=(0, 1, 2)))
      times = bench.time_steps(lambda: jax.block_until_ready(f(q, k, v)), steps, warmup=1)
      out[impl] = {"ms": 1e3 * statistics.median(times)}
    except Exception as e:  # noqa: BLE001 - an implementation this device lacks is a finding
      out[impl] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
  return out


def check_device_augmentation(batch: int = 256, source: int = 112, size: int = 224,
                              steps: int = 10) -> dict:
  """`augment.crop_resize_flip` on the default device against PIL's bicubic crop + flip on
  the host, for random boxes of a random `source` px image at `size` (at most one level
  apart, as on a CPU), and its median time for `batch` images."""
  from PIL import Image
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (8, source, source, 3), dtype=np.uint8)
  crops = np.array([loaders.random_resized_crop_box(source, source, rng) for _ in range(8)],
                   np.float32)
  flips = np.arange(8) % 2 == 1
  f = jax.jit(augment.crop_resize_flip, static_argnums=3)
  got = np.asarray(f(images, crops, flips, size))
  diff = 0.0
  for image, crop, flip, out in zip(images, crops, flips, got):
    want = np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BICUBIC,
                                                    box=tuple(float(c) for c in crop)), np.float64)
    diff = max(diff, float(np.abs(out - (want[:, ::-1] if flip else want)).max()))
  many = jnp.asarray(np.resize(images, (batch, source, source, 3)))
  crops_b = jnp.asarray(np.resize(crops, (batch, 4)))
  flips_b = jnp.asarray(np.resize(flips, (batch,)))
  times = bench.time_steps(lambda: f(many, crops_b, flips_b, size).block_until_ready(), steps,
                           warmup=1)
  return {"max_level_diff": diff, "batch": batch, "source": source, "size": size,
          "batch_ms": 1e3 * statistics.median(times), "ok": diff <= 1.0}


def tiny_pretraining(tiny_config: ml_collections.ConfigDict, steps: int = 50) -> dict:
  """`steps` MAE steps of `tiny_config` (the tiny MAE pretraining config) on synthetic faces
  (written to a temporary folder) at 32 px, a batch of about 16, cropped and flipped on the
  devices (`data.augment='device'`)."""
  with tempfile.TemporaryDirectory() as tmp:
    root = os.path.join(tmp, "data")
    synthetic.generate(root, synthetic.SyntheticConfig(num_videos=8, min_frames=60, max_frames=90,
                                                       image_size=32, seed=3))
    config = tiny_config.copy_and_resolve_references()
    config.data.root, config.data.image_size = root, 32
    config.data.augment = "device"
    config.data.index_cache = os.path.join(tmp, "index")
    n = jax.device_count()
    config.batch_size = n * max(2, -(-16 // n))  # about 16, split over every device
    config.num_steps, config.log_every, config.recon_every = steps, max(steps // 5, 1), 0
    config.checkpoint_every = steps
    start = time.perf_counter()
    history = pretrain.train_and_evaluate(config, os.path.join(tmp, "mae"))["history"]
  losses = [h["loss"] for h in history]
  return {"steps": steps, "first_loss": losses[0], "last_loss": losses[-1],
          "seconds": time.perf_counter() - start, "ok": losses[-1] < losses[0]}


def failures(result: dict, prefix: str = "") -> list[str]:
  """The checks (dotted paths) that raised or report ok=False, at any depth."""
  out = []
  for key, value in result.items():
    if isinstance(value, dict):
      if "error" in value or value.get("ok") is False:
        out.append(prefix + key)
      out += failures(value, f"{prefix}{key}.")
  return out


def mae_step(mae_config: ml_collections.ConfigDict, batch: int, steps: int,
             kernels: str | None = None, profile_dir: str | None = None) -> dict:
  """`bench.bench_mae` in bfloat16 (`kernels`: the model's kernel set, None = the config's);
  the per-step times left out. With `profile_dir`, three more steps are traced there and
  the costliest operations reported (`bench.op_profile`)."""
  config = mae_config.copy_and_resolve_references()
  if kernels:
    config.model.kernels = kernels
  result = bench.bench_mae(config, batch, dtype="bfloat16", steps=steps, warmup=2,
                           profile_dir=profile_dir)
  return {"kernels": config.model.kernels,
          **{k: v for k, v in result.items() if not k.endswith("_all")}}


def default_batch_per_device(device: jax.Device) -> int:
  """The MAE step benchmark's batch per device: 32 on a CPU; on a GPU/TPU as large as its
  memory allows for ViT-B (at 256 per device the step needs ~30 GiB; a GPU needs a large
  batch to keep its matrix units busy): 256 from 48 GiB, 128 from 20 GiB, else 64, of the
  memory jax may take (on a GPU 75 % of it by default: 59 GiB of an 80 GB H100)."""
  if device.platform == "cpu":
    return 32
  stats = device.memory_stats() if hasattr(device, "memory_stats") else None
  limit = (stats or {}).get("bytes_limit", 0)
  return 256 if limit >= 48 * 2**30 else 128 if limit >= 20 * 2**30 else 64


def run(mae_config: ml_collections.ConfigDict, *, tiny_config: ml_collections.ConfigDict,
        batch: int = 0, bench_steps: int = 10, pretrain_steps: int = 50,
        attention_batch: int = 256, augment_batch: int = 256, skip=(),
        profile_dir: str | None = None) -> dict:
  """All checks (those named in `skip` left out); a failing check records its error.

  `mae_config`: the MAE pretraining config whose bf16 train step is timed ('mae_step', at
  `batch`, 0 = `default_batch_per_device`; on a GPU again with cuDNN attention,
  'mae_step_cudnn'), e.g. `configs/mae_pretrain.py:get_config("base")`.
  `tiny_config`: the tiny MAE pretraining config, `configs/mae_pretrain.py:
  get_config("tiny")`, of 'sharded_steps' and 'tiny_pretraining' (which run it at 32 px).
  `profile_dir`: where the MAE step checks also trace a few steps (a folder each, with the
  compiled HLO), their costliest operations reported under 'profile'.
  """
  device = jax.devices()[0]
  result = {"backend": jax.default_backend(), "device_kind": device.device_kind,
            "devices": jax.device_count(), "processes": jax.process_count(),
            "jax": jax.__version__, "kernels_auto": layers.resolve("auto")}
  batch = batch or default_batch_per_device(device) * jax.device_count()
  profile = lambda name: os.path.join(profile_dir, name) if profile_dir else None
  checks = {
      "sharded_steps": lambda: check_sharded_steps(tiny_config),
      "kernel_sets": check_kernel_sets,
      "mae_step": lambda: mae_step(mae_config, batch, bench_steps,
                                   profile_dir=profile("mae_step")),
      "mae_step_cudnn": lambda: (mae_step(mae_config, batch, bench_steps, kernels="cudnn",
                                          profile_dir=profile("mae_step_cudnn"))
                                 if jax.default_backend() == "gpu"
                                 else {"skipped": "cuDNN attention needs a GPU"}),
      "attention": lambda: bench_attention(attention_batch, steps=bench_steps),
      "device_augmentation": lambda: check_device_augmentation(augment_batch, steps=bench_steps),
      "tiny_pretraining": lambda: tiny_pretraining(tiny_config, pretrain_steps),
  }
  for name, check in checks.items():
    if name in skip:
      continue
    start = time.perf_counter()
    try:
      result[name] = check()
    except Exception as e:  # noqa: BLE001 - report it and go on with the other checks
      result[name] = {"error": f"{type(e).__name__}: {e}",
                      "traceback": traceback.format_exc(limit=5)}
    result[name]["check_s"] = time.perf_counter() - start
  return result
