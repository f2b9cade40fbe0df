"""launch/check_accelerator.py's checks, run here on the emulated CPU devices at small sizes
(on a GPU/TPU host the same code runs at ViT-B's)."""

import pytest

from affect_jax import accelerator
from configs import mae_pretrain


def test_the_checks_run_and_pass_on_cpu():
  # The step benchmark is bench.bench_mae (test_bench.py); the sharded steps' equality with
  # one device is what test_pretrain.py checks at length: both left out here for time.
  tiny = mae_pretrain.get_config("tiny")
  result = accelerator.run(tiny, tiny_config=tiny, batch=16, bench_steps=1, pretrain_steps=4,
                           attention_batch=2, augment_batch=8, skip=("mae_step", "sharded_steps"))
  assert accelerator.failures(result) == [], result
  assert result["backend"] == "cpu" and result["kernels_auto"] == "cpu"
  assert result["kernel_sets"]["float32"]["ok"] and result["kernel_sets"]["bfloat16"]["ok"]
  assert "mae_step" not in result and result["attention"]["xla"]["ms"] > 0
  assert "skipped" in result["mae_step_cudnn"]  # a GPU's alone
  assert result["tiny_pretraining"]["last_loss"] < result["tiny_pretraining"]["first_loss"]
  assert result["device_augmentation"]["max_level_diff"] <= 1.0


def test_failures_are_found_at_any_depth():
  result = {"a": {"ok": True}, "b": {"x": {"ok": False}}, "c": {"error": "boom"}, "d": 1}
  assert accelerator.failures(result) == ["b.x", "c"]


def test_the_step_benchmark_batch_follows_device_memory():
  class Device:
    def __init__(self, platform, gib=None):
      self.platform, self.gib = platform, gib

    def memory_stats(self):
      return None if self.gib is None else {"bytes_limit": int(self.gib * 2**30)}

  assert accelerator.default_batch_per_device(Device("cpu")) == 32
  assert accelerator.default_batch_per_device(Device("gpu", 59.3)) == 256  # H100 80GB, 75 %
  assert accelerator.default_batch_per_device(Device("gpu", 29.6)) == 128  # A100 40GB, 75 %
  assert accelerator.default_batch_per_device(Device("tpu", 15.75)) == 64  # v5e
  assert accelerator.default_batch_per_device(Device("gpu")) == 64  # no memory figure


def test_the_step_benchmark_takes_a_kernel_set(tmp_path):
  tiny = mae_pretrain.get_config("tiny")
  result = accelerator.mae_step(tiny, 8, 1, kernels="xla", profile_dir=str(tmp_path))
  assert result["kernels"] == "xla" and result["img_per_s"] > 0 and result["dtype"] == "bfloat16"
  # Traced too: the XLA set's operations (no CPU kernel) and the compiled step beside them.
  assert result["profile"]["top"] and (tmp_path / "step.hlo.txt").exists()
  assert not any("cpu_kernels" in t["op_name"] for t in result["profile"]["top"])
  # The set reaches the model: cuDNN's attention, asked for on a CPU, fails in the step.
  with pytest.raises(RuntimeError, match="cuDNN"):
    accelerator.mae_step(tiny, 8, 1, kernels="cudnn")
  assert tiny.model.kernels == "auto"  # the caller's config is kept


def test_a_failed_trace_keeps_the_step_figures(monkeypatch, tmp_path):
  from affect_jax import bench

  def no_tracer(*args, **kwargs):
    raise RuntimeError("CUPTI not found")

  monkeypatch.setattr(bench, "op_profile", no_tracer)
  result = accelerator.mae_step(mae_pretrain.get_config("tiny"), 8, 1, profile_dir=str(tmp_path))
  assert result["img_per_s"] > 0 and "CUPTI not found" in result["profile"]["error"]
  assert accelerator.failures({"mae_step": result}) == ["mae_step.profile"]
