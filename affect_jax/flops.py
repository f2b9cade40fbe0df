"""Model FLOPs of the ViT training steps and devices' peak rates: TFLOP/s and MFU as the
field counts them (PaLM's model FLOPs utilisation), for the benchmarks and the training logs.

A train step is counted as three forward passes of the model's matrix products (the
backward pass takes two products per forward one), attention's two products included;
element-wise work, normalisation, the loss and the optimizer update are left out. The
count does not depend on how the step is compiled (remat, scanned blocks, cuDNN's fused
attention), unlike XLA's cost analysis of a compiled step, which counts a scanned stack's
body once and nothing inside a custom call.
"""

from __future__ import annotations

import math

from affect_jax.models import mae, vit

# Dense bf16 peak FLOP/s per chip (vendor figures, no sparsity). A device kind takes the
# first entry it starts with, so the PCIe/NVL cards come first. CPUs have no entry.
PEAK_FLOPS = {
    "NVIDIA H100 PCIe": 756e12,
    "NVIDIA H100 NVL": 835e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H200 NVL": 835e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100": 312e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,  # v5e
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,  # v5p's device kind (after v5 lite, which it prefixes)
    "TPU v6 lite": 918e12,  # v6e
}


def peak_flops(device, override_tflops: float | None = None) -> float | None:
  """The device's peak FLOP/s (`override_tflops` TFLOP/s where given), None if unknown."""
  if override_tflops:
    return override_tflops * 1e12
  for name, flops in PEAK_FLOPS.items():
    if device.device_kind.startswith(name):
      return flops
  return None


def _blocks(part: str, batch: int, length: int, width: int, depth: int, heads: int,
            mlp: int) -> list[dict]:
  """The products of `depth` pre-norm transformer blocks over `batch` sequences of `length`."""
  m = batch * length
  rows = [dict(part=part, name=name, kind="dense", shape=(m, k, n), count=depth)
          for name, k, n in (("qkv", width, 3 * width), ("proj", width, width),
                             ("fc1", width, mlp), ("fc2", mlp, width))]
  rows.append(dict(part=part, name="attention", kind="attention",
                   shape=(batch, heads, length, width // heads), count=depth))
  return rows


def mae_matmuls(variant: str, image_size: int, mask_ratio: float, batch: int) -> list[dict]:
  """The MAE's block products, one row per distinct product with how many layers use it.

  Dense rows: shape (m, k, n) = (tokens in the batch, in, out) of the encoder's (CLS and the
  visible patches) and decoder's (CLS and every patch) qkv / proj / fc1 / fc2. Attention
  rows: (batch, heads, length, head_dim). The patch embedding, decoder embedding and
  prediction head are not rows (< 3 % of the FLOPs; `mae_train_flops` adds them).
  """
  v = vit.VARIANTS[variant]
  patches = (image_size // v["patch_size"]) ** 2
  return (_blocks("encoder", batch, mae.num_visible(patches, mask_ratio) + 1, v["width"],
                  v["depth"], v["num_heads"], v["mlp_dim"])
          + _blocks("decoder", batch, patches + 1, v["decoder_width"], v["decoder_depth"],
                    v["decoder_num_heads"], v["decoder_mlp_dim"]))


def _forward(rows: list[dict]) -> float:
  # dense: 2 m k n; attention: q k^T and p v, 2 b h L L d each.
  return float(sum(r["count"] * (2 * math.prod(r["shape"]) if r["kind"] == "dense"
                                 else 4 * math.prod(r["shape"]) * r["shape"][2])
                   for r in rows))


def mae_train_flops(variant: str, image_size: int, mask_ratio: float, batch: int,
                    channels: int = 3) -> float:
  """Model FLOPs of one MAE pretraining step on `batch` images: the blocks
  (`mae_matmuls`), the patch embedding of every patch (the model embeds before masking),
  the decoder embedding (CLS and the visible tokens) and the prediction head (CLS and every
  patch)."""
  v = vit.VARIANTS[variant]
  patches = (image_size // v["patch_size"]) ** 2
  pixels = v["patch_size"] ** 2 * channels
  visible = mae.num_visible(patches, mask_ratio)
  forward = _forward(mae_matmuls(variant, image_size, mask_ratio, batch))
  forward += 2 * batch * (patches * pixels * v["width"]
                          + (visible + 1) * v["width"] * v["decoder_width"]
                          + (patches + 1) * v["decoder_width"] * pixels)
  return 3.0 * forward


def vit_train_flops(variant: str, image_size: int, batch: int, num_classes: int,
                    channels: int = 3) -> float:
  """Model FLOPs of one fine-tuning step of the ViT classifier on `batch` images: the patch
  embedding, the encoder's blocks over CLS and every patch, and the head."""
  v = vit.VARIANTS[variant]
  patches = (image_size // v["patch_size"]) ** 2
  forward = _forward(_blocks("encoder", batch, patches + 1, v["width"], v["depth"],
                             v["num_heads"], v["mlp_dim"]))
  forward += 2 * batch * (patches * v["patch_size"] ** 2 * channels * v["width"]
                          + v["width"] * num_classes)
  return 3.0 * forward
