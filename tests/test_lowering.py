"""The train steps as a GPU or TPU host builds them, checked on this CPU.

jax lowers a jitted function for a platform it has no device of
(`.trace(...).lower(lowering_platforms=...)`), so the StableHLO a GPU or TPU would compile
can be read here. What the models put in it is decided while tracing, where
`kernels='auto'` asks `jax.default_backend()`: each lowering below is traced with that
answer set to the target's, which is what the code does on such a host. Checked for the
pretraining, fine-tuning and temporal steps:
- they lower for CUDA, ROCm and TPU;
- none of `models/cpu_kernels.py` is in them (the same steps traced for a CPU are full of
  it, which shows the check can fail);
- in bfloat16, the ViTs' matmuls take bf16 operands (a float32 matmul costs a GPU or TPU
  half its rate or more); the only float32 operands are jax's own: the logits' cotangent in
  the backward of `jax.nn.dot_product_attention`, two products per attention layer;
- the TCN's convolutions are convolutions (Winograd is the CPU set's);
- with libtpu installed (the tpu extra), the MAE step compiled by XLA:TPU for 4 v5e chips:
  data-parallel devices sum every gradient in float32.
"""

import functools
import importlib.util
import re

import jax
import numpy as np
import pytest

from affect_jax import bench, optim, sharding
from affect_jax.models import vit
from affect_jax.train import loop, temporal
from configs import common, expr_finetune, mae_pretrain

TARGETS = (("cuda", "gpu"), ("rocm", "gpu"), ("tpu", "tpu"))
_DOT = re.compile(r"stablehlo\.dot_general .*: \(tensor<([0-9x]+)x(\w+)>, "
                  r"tensor<([0-9x]+)x(\w+)>\) -> tensor<")


def _lower(build, platform: str, backend: str, monkeypatch) -> str:
  """StableHLO text, locations included, of the step `build()` returns as (jitted step,
  args), traced as on a host whose default backend is `backend`."""
  with monkeypatch.context() as m:
    m.setattr(jax, "default_backend", lambda: backend)
    step, args = build()
    lowered = step.trace(*args).lower(lowering_platforms=(platform,))
  return lowered.as_text(debug_info=True)


def _matmul_operand_dtypes(text: str) -> list[tuple[str, str]]:
  """(lhs, rhs) element types of every dot_general whose operands are both matrices or
  more (vector dots, e.g. of the optimizer's norms, left out)."""
  return [(m.group(2), m.group(4)) for m in _DOT.finditer(text)
          if m.group(1).count("x") >= 1 and m.group(3).count("x") >= 1]


def _vit_step(module, stage: str):
  config = module.get_config("tiny")
  config.model.dtype = "bfloat16"

  def build():
    step, state, batch = bench.abstract_train_step(config, stage, 8,
                                                   sharding.make_mesh((-1, 1, 1)))
    return step, (state, batch)
  shape = vit.VARIANTS[config.model.variant]
  layers = shape["depth"] + (shape["decoder_depth"] if stage == "mae" else 0)
  return build, layers


@pytest.mark.parametrize("stage", ["mae", "finetune"])
def test_the_vit_steps_lower_for_accelerators_in_bf16_without_the_cpu_kernels(stage,
                                                                               monkeypatch):
  build, attention_layers = _vit_step(mae_pretrain if stage == "mae" else expr_finetune, stage)
  for platform, backend in TARGETS:
    text = _lower(build, platform, backend, monkeypatch)
    assert "cpu_kernels.py" not in text, platform
    dtypes = _matmul_operand_dtypes(text)
    float32 = [d for d in dtypes if "f32" in d]
    assert len(dtypes) > 10 * attention_layers, (platform, len(dtypes))
    # jax's attention backward multiplies the float32 logits' cotangent by k and by q.
    assert float32 == [("f32", "bf16")] * 2 * attention_layers, (platform, float32)
    assert all(d in (("bf16", "bf16"), ("f32", "bf16")) for d in dtypes), (platform, dtypes)
  cpu = _lower(build, "cpu", "cpu", monkeypatch)
  assert "cpu_kernels.py" in cpu


def _temporal_step():
  config = common.get_temporal_config("VA", "tiny")
  config.data.segment_len = 32
  config.model.modalities = ("visual", "audio")
  dims = {"visual": 16, "audio": 8}

  def build():
    mesh = sharding.make_mesh((-1, 1, 1))
    schedule = optim.schedule_for(config, 100)
    model = temporal.create_model(config)
    state, shardings = temporal.create_train_state(config, model, jax.random.key(0), mesh,
                                                   schedule, dims)
    batch = {**{m: np.zeros((8, 32, d), np.float32) for m, d in dims.items()},
             "label": np.zeros((8, 32, 2), np.float32),
             "frame_mask": np.ones((8, 32), np.float32),
             "label_mask": np.ones((8, 32), np.float32)}
    step = functools.partial(temporal.train_step, model=model, task="VA",
                             modalities=tuple(dims), seed=0, schedule=schedule,
                             class_weights=None, pos_weight=None)
    step = loop.jit_step(step, config, mesh, shardings,
                         {k: sharding.batch_sharding(mesh, v.ndim) for k, v in batch.items()})
    return step, (state, batch)
  return build, config


def test_the_temporal_step_lowers_for_accelerators_with_plain_convolutions(monkeypatch):
  build, config = _temporal_step()
  assert config.model.use_tcn and config.model.dtype == "float32"
  for platform, backend in TARGETS:
    text = _lower(build, platform, backend, monkeypatch)
    assert "cpu_kernels.py" not in text, platform
    # Each TCN convolution: its forward and the two of its gradient.
    assert text.count("stablehlo.convolution") >= 3 * len(config.model.modalities), platform
  cpu = _lower(build, "cpu", "cpu", monkeypatch)
  assert "cpu_kernels.py" in cpu and "stablehlo.convolution" not in cpu


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                    reason="compiling for a TPU slice needs libtpu (the tpu extra)")
def test_data_parallel_tpus_sum_the_gradients_in_float32():
  """A bf16 product's autodiff gives its float32 weight a bf16 gradient, which XLA:TPU sums
  across devices in bf16; the models' layers hand float32 weights float32 gradients, so
  every gradient all-reduce is float32 (XLA:CPU upcasts all-reduces itself: only XLA:TPU,
  compiling here for 4 v5e chips, shows the difference)."""
  config = mae_pretrain.get_config("tiny")
  config.model.dtype, config.model.kernels = "bfloat16", "xla"
  mesh = sharding.make_mesh((4, 1, 1), bench.tpu_topology_devices("v5e:2x2"))
  step, state, batch = bench.abstract_train_step(config, "mae", 16, mesh)
  text = step.lower(state, batch).compile().as_text()
  reduced = [t for line in text.splitlines()
             if (m := re.search(r"= (.*?) all-reduce(-start)?\(", line))
             for t in re.findall(r"\b(bf16|f32)\[", m.group(1))]
  params = len(jax.tree.leaves(state.params))
  assert len(reduced) >= params and set(reduced) == {"f32"}, sorted(set(reduced))
