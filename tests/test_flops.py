"""Model FLOPs of the train steps against hand counts and XLA's count of the compiled step;
the peak-rate table."""

import pytest

from affect_jax import bench, flops
from configs import expr_finetune


def _block(tokens, d, mlp):  # qkv + out projection + two MLP matmuls
  return 2 * tokens * (4 * d * d + 2 * d * mlp)


def _attention(length, d):  # q k^T and p v
  return 4 * length * length * d


def _tiny_vit_forward(b):
  # tiny at 64 px: patch 8 -> 64 patches + CLS, width 128, depth 4, mlp 512; 8 classes.
  n = 64
  return (4 * (_block(b * (n + 1), 128, 512) + b * _attention(n + 1, 128))
          + 2 * b * n * 192 * 128 + 2 * b * 128 * 8)


def test_vit_train_flops_match_a_hand_count():
  b = 8
  assert flops.vit_train_flops("tiny", 64, b, 8) == 3 * _tiny_vit_forward(b)
  # Linear in the batch: the loop multiplies the count of one image by the images per second.
  assert flops.vit_train_flops("tiny", 64, b, 8) == b * flops.vit_train_flops("tiny", 64, 1, 8)
  assert flops.mae_train_flops("base", 224, 0.75, 8) == 8 * flops.mae_train_flops("base", 224, 0.75, 1)


def test_vit_train_flops_agree_with_the_compiled_fine_tuning_step():
  # XLA's count adds element-wise work and the optimizer update (replicated on each of the 8
  # test devices, all counted) to the model's products.
  config = expr_finetune.get_config("tiny")
  r = bench.bench_memory(config, "finetune", 8, image_size=64, scan_layers=False)
  assert r["flops_per_step"] == 3 * _tiny_vit_forward(8)
  assert 0.95 < r["hlo_flops_per_step"] / (3 * _tiny_vit_forward(8)) < 1.3


@pytest.mark.parametrize("kind, tflops", [("NVIDIA H100 80GB HBM3", 989), ("NVIDIA H100 PCIe", 756),
                                          ("NVIDIA H200", 989), ("NVIDIA A100-SXM4-40GB", 312),
                                          ("TPU v5 lite", 197), ("TPU v5", 459),
                                          ("TPU v6 lite", 918), ("cpu", None)])
def test_peak_flops_per_device_kind(kind, tflops):
  class Device:
    device_kind = kind
  assert flops.peak_flops(Device()) == (tflops * 1e12 if tflops else None)
  assert flops.peak_flops(Device(), 100.0) == 100e12
