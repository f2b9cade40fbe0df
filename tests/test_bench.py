"""The benchmarks run and count what they claim (never timed here: speed is for launch/bench.py)."""

import importlib.util

import numpy as np
import pytest

from affect_jax import bench
from configs import common, expr_finetune, mae_pretrain


def _tiny_mae_forward_flops(b):
  """By hand, tiny at 64 px: width 128, depth 4, mlp 512; decoder 64 x 2, mlp 256; patch 8 ->
  64 patches, 16 kept; patch embedding, decoder embedding and prediction head beside."""
  n, k = 64, 16

  def block(tokens, d, mlp):  # qkv + out projection + two MLP matmuls
    return 2 * tokens * (4 * d * d + 2 * d * mlp)

  def attention(length, d):  # q k^T and p v
    return 4 * length * length * d

  return (4 * (block(b * (k + 1), 128, 512) + b * attention(k + 1, 128))
          + 2 * (block(b * (n + 1), 64, 256) + b * attention(n + 1, 64))
          + 2 * b * n * 192 * 128 + 2 * b * (k + 1) * 128 * 64 + 2 * b * (n + 1) * 64 * 192)


def test_mae_bench_flops_match_a_hand_count_of_the_matmuls(tmp_path):
  r = bench.bench_mae(mae_pretrain.get_config("tiny"), 8, image_size=64, steps=1, warmup=0,
                      profile_dir=str(tmp_path / "profile"), profile_steps=2)
  forward = _tiny_mae_forward_flops(8)
  # The model FLOPs (what TFLOP/s and MFU count) are 3 forward passes of matmuls.
  assert r["flops_per_step"] == 3 * forward
  # XLA's count of the compiled step agrees: element-wise work and the optimizer update
  # (replicated on each of the 8 test devices, all counted) add some percent.
  assert 0.95 < r["hlo_flops_per_step"] / (3 * forward) < 1.3
  assert r["img_per_s"] > 0 and r["params"] > 0 and len(r["step_s_all"]) == 1
  assert r["tflops_per_s"] == pytest.approx(3 * forward / r["step_s"] / 1e12)

  # The traced steps: each listed operation is an instruction of the compiled step (its HLO
  # written beside the trace), ranked by time, and named after the model code it runs.
  profile = r["profile"]
  hlo = (tmp_path / "profile" / "step.hlo.txt").read_text()
  assert profile["steps"] == 2 and profile["ops"] > 20 and profile["op_ms_per_step"] > 0
  top = profile["top"]
  assert len(top) == 30 and [t["ms"] for t in top] == sorted((t["ms"] for t in top), reverse=True)
  assert all(f"%{t['op']} = " in hlo and t["calls"] >= 1 for t in top)
  assert any("MaskedAutoencoder" in t["op_name"] and "dot_general" in t["op_name"] for t in top)
  assert profile["trace"].endswith("perfetto_trace.json.gz")


def test_mae_bench_counts_every_block_of_a_scanned_stack_and_times_per_step(monkeypatch):
  # XLA's cost analysis (jax 0.10) counts a scanned stack's loop body once, so TFLOP/s and
  # MFU taken from it fell ~2.5x for tiny (more for ViT-L/H, scanned by default): the model
  # count is the hand count of the unrolled blocks whatever the layout.
  # Two steps per call: each timed call (1 s here) is two steps' time.
  monkeypatch.setattr(bench, "time_steps", lambda run, steps, warmup: [run(), 1.0][1:])
  config = mae_pretrain.get_config("tiny")
  r = bench.bench_mae(config, 8, image_size=64, steps=1, warmup=0, scan_layers=True,
                      steps_per_call=2)
  assert r["flops_per_step"] == 3 * _tiny_mae_forward_flops(8)
  assert r["steps_per_call"] == 2 and r["step_s"] == 0.5 and r["img_per_s"] == 16
  assert r["tflops_per_s"] == pytest.approx(2 * 3 * _tiny_mae_forward_flops(8) / 1e12)


def test_matmul_bench_reports_both_paths():
  r = bench.bench_matmul(n=128, repeats=2)
  assert r["float32_gflops"] > 0 and r["bfloat16_f32acc_gflops"] > 0


def test_temporal_bench_runs_and_counts_prediction_flops():
  task_configs = {t: common.get_temporal_config(t, "tiny") for t in bench.TEMPORAL_TASKS}
  r = bench.bench_temporal(task_configs, frames=500, batch=8, steps=1, warmup=0, repeats=1)
  assert r["predict_flops"] > 0 and r["predict_s_all_heads"] > 0
  assert np.isfinite(r["train_frames_per_s"]) and r["train_frames_per_s"] > 0


def test_mae_matmul_shapes_are_the_hand_counted_matmuls():
  # tiny at 64 px, batch 8: 64 patches, 16 kept (+ CLS); widths as in the hand count above.
  rows = bench.mae_matmul_shapes(mae_pretrain.get_config("tiny"), 8, 64)
  by = {(r["part"], r["name"]): r for r in rows}
  assert by[("encoder", "qkv")]["shape"] == (8 * 17, 128, 384)
  assert by[("encoder", "fc2")]["shape"] == (8 * 17, 512, 128)
  assert by[("decoder", "fc1")]["shape"] == (8 * 65, 64, 256)
  assert by[("encoder", "attention")]["shape"] == (8, 4, 17, 32)
  assert by[("decoder", "attention")]["shape"] == (8, 4, 65, 16)
  assert {r["count"] for r in rows if r["part"] == "encoder"} == {4}
  assert {r["count"] for r in rows if r["part"] == "decoder"} == {2}
  flops = sum(r["count"] * (2 * np.prod(r["shape"]) if r["kind"] == "dense"
                            else 4 * r["shape"][0] * r["shape"][1] * r["shape"][2] ** 2
                            * r["shape"][3])
              for r in rows)
  b, n, k = 8, 64, 16
  block = lambda tokens, d, mlp: 2 * tokens * (4 * d * d + 2 * d * mlp)
  attention = lambda length, d: 4 * length * length * d
  assert flops == (4 * (block(b * (k + 1), 128, 512) + b * attention(k + 1, 128))
                   + 2 * (block(b * (n + 1), 64, 256) + b * attention(n + 1, 64)))


def test_matmul_layouts_bench_times_three_products_per_matmul():
  config = mae_pretrain.get_config("tiny")
  r = bench.bench_matmul_layouts(config, 2, image_size=32, repeats=1)
  assert len(r["rows"]) == 2 * 5 * 3  # encoder/decoder x (4 dense + attention) x 3 layouts
  # The timed products are the step's own (the shapes checked against the hand count above).
  shapes = {(s["part"], s["name"]): s["shape"] for s in bench.mae_matmul_shapes(config, 2, 32)}
  for row in r["rows"]:
    assert min(row[f"{p}_gflops"] for p in ("float32", "bfloat16_f32acc", "bfloat16_plain")) > 0
    sizes, shape = row["sizes"], shapes[(row["part"], row["name"])]
    if row["name"] == "attention":
      assert (sizes["b"], sizes["h"], sizes["q"], sizes["k"], sizes["d"]) == shape[:3] + shape[2:]
      assert row["gflop"] * 1e9 == pytest.approx(2 * shape[0] * shape[1] * shape[2] ** 2 * shape[3])
    else:
      assert (sizes["b"] * sizes["t"], sizes["k"], sizes["n"]) == shape
      assert row["gflop"] * 1e9 == pytest.approx(2 * np.prod(shape))
  assert [row["product"] for row in r["rows"][:3]] == [
      "forward x.W", "input grad g.W^T", "weight grad x^T.g"]


@pytest.mark.parametrize("stage", ["mae"])
def test_memory_bench_counts_the_state_per_device(stage):
  """The compiled step's arguments are the state (float32 params and two AdamW moments) and
  the batch shard: whole on every device when replicated, an eighth of it under FSDP."""
  kw = dict(batch=64, image_size=32, dtype="float32")
  config = (mae_pretrain if stage == "mae" else expr_finetune).get_config("tiny")
  replicated = bench.bench_memory(config, stage, mesh_shape=(8, 1, 1), **kw)
  fsdp = bench.bench_memory(config, stage, mesh_shape=(1, 8, 1), **kw)
  state = 3 * 4 * replicated["params"] / 2**30
  images = 64 * 32 * 32 * 3 / 8 / 2**30
  assert replicated["arguments_gib"] == pytest.approx(state + images, rel=0.02)
  # 'embed' is split over 'fsdp': every matrix and most vectors; a few small ones stay whole.
  assert fsdp["arguments_gib"] < 0.2 * replicated["arguments_gib"]
  for r in (replicated, fsdp):
    assert r["temporaries_gib"] > 0 and r["total_gib"] >= r["arguments_gib"]
  assert replicated["mesh_shape"] == [8, 1, 1] and fsdp["devices"] == 8


HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None


@pytest.mark.skipif(HAS_LIBTPU, reason="libtpu is installed: the next test compiles for the TPU")
def test_a_tpu_topology_without_libtpu_says_what_to_install():
  with pytest.raises(ValueError, match=r"'v5e:2x2'.*pip install -e '\.\[tpu\]'"):
    bench.bench_memory(mae_pretrain.get_config("tiny"), "mae", 16, topology="v5e:2x2")


@pytest.mark.skipif(not HAS_LIBTPU, reason="compiling for a TPU slice needs libtpu (tpu extra)")
def test_memory_bench_compiles_for_a_tpu_slice_on_this_host():
  """XLA:TPU compiles the step for 4 v5e chips here (nothing runs): the same state per
  device as on the CPU (float32 params and two moments, replicated) plus the batch shard,
  a little more for the TPU's tiled layout (vectors padded to whole tiles), the kernels a
  TPU's, and a peak within the 15.75 GiB of a v5e chip that XLA:TPU may use."""
  r = bench.bench_memory(mae_pretrain.get_config("tiny"), "mae", 64, image_size=32,
                         dtype="bfloat16", mesh_shape=(4, 1, 1), topology="v5e:2x2")
  assert (r["device_kind"], r["devices"], r["kernels"]) == ("TPU v5 lite", 4, "xla")
  state, images = 3 * 4 * r["params"] / 2**30, 64 * 32 * 32 * 3 / 4 / 2**30
  assert state + images <= r["arguments_gib"] < 1.1 * (state + images)
  assert r["fits"] and r["total_gib"] <= r["peak_gib"] < r["device_memory_gib"] == 15.75
  # A step too large for the chip: XLA:TPU's refusal is the verdict, its account kept.
  r = bench.bench_memory(mae_pretrain.get_config("tiny"), "mae", 2**19, dtype="bfloat16",
                         mesh_shape=(4, 1, 1), topology="v5e:2x2")
  assert r["fits"] is False and r["peak_gib"] is None and "15.75G" in r["error"]


@pytest.mark.parametrize("augment", ["host", "device"])
def test_loader_bench_runs_the_pipeline_it_names(augment, tmp_path):
  paths = bench.write_fake_faces(str(tmp_path / "faces"), 8, 16)
  r = bench.bench_loader(4, 16, items=paths, num_batches=1, repeats=2, augment=augment)
  assert r["augment"] == augment and r["img_per_s"] > 0 and len(r["img_per_s_all"]) == 2
  with pytest.raises(ValueError, match="loader source"):
    bench.loader_inputs("bucket", 16)


def test_op_profile_counts_per_step_when_a_call_runs_several(tmp_path):
  # A call of two "steps", each one run of `f`: every operation of f runs once per step.
  import jax
  import jax.numpy as jnp

  f = jax.jit(lambda x: jnp.tanh(x @ x) * 2 + 1)
  x = jnp.ones((64, 64))
  run = lambda: [f(x).block_until_ready() for _ in range(2)]
  run()
  p = bench.op_profile(run, 3, str(tmp_path), f.lower(x).compile().as_text(), steps_per_call=2)
  assert p["steps"] == 6 and p["top"]
  assert all(t["calls"] == 1.0 for t in p["top"])
