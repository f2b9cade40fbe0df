"""Checkpoints move between device layouts: written on one mesh, read into another."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from affect_jax import checkpoint, sharding
from affect_jax.train import loop


class _Net(nn.Module):
  @nn.compact
  def __call__(self, x, train=False):
    dense = lambda n, axes: nn.Dense(n, kernel_init=nn.with_logical_partitioning(
        nn.initializers.normal(), axes))
    x = dense(32, ("embed", "mlp"))(x)
    x = nn.BatchNorm(use_running_average=not train)(x)
    return dense(16, ("mlp", "embed"))(x)


def _state(mesh):
  model, tx = _Net(), optax.adamw(1e-3)

  def init(rng):
    variables = model.init(rng, jnp.ones((2, 16)))
    return loop.TrainState.create(apply_fn=model.apply, params=variables["params"],
                                  tx=tx, batch_stats=variables["batch_stats"])

  return loop.create_sharded_state(init, jax.random.key(0), mesh, sharding.DEFAULT_RULES)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
  """A run written on 8 devices with fsdp=4: latest checkpoint and the best export."""
  workdir = tmp_path_factory.mktemp("run")
  mesh = sharding.make_mesh((2, 4, 1))
  state, shardings = _state(mesh)
  # Distinct values everywhere, so a permuted or misplaced shard would show.
  state = state.replace(params=jax.jit(
      lambda p: jax.tree.map(lambda x: x + jnp.arange(x.size).reshape(x.shape) / 7, p),
      out_shardings=shardings.params)(state.params))
  kernel = state.params["Dense_0"]["kernel"]
  assert {s.data.shape for s in kernel.addressable_shards} == {(4, 32)}  # 16 rows over fsdp=4
  with checkpoint.make_manager(workdir / "checkpoints", save_every=1) as m:
    checkpoint.save(m, 3, state, force=True)
  checkpoint.save_best(workdir, 3, state, {"step": 3, "value": 1.0})
  host = jax.device_get({"params": state.params, "batch_stats": state.batch_stats})
  return workdir, host


def _assert_same(got, want):
  flat_got = jax.tree_util.tree_leaves_with_path(got)
  flat_want = jax.tree_util.tree_leaves_with_path(want)
  assert [k for k, _ in flat_got] == [k for k, _ in flat_want]
  for (_, a), (_, b) in zip(flat_got, flat_want):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("which", ["best", "latest"])
def test_load_params_as_host_arrays(written, which):
  workdir, want = written
  got = checkpoint.load_params(workdir, which)
  assert set(got) == {"params", "batch_stats"}  # never the optimizer state
  assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(got))
  _assert_same(got, want)


@pytest.mark.parametrize("shape,devices", [((1, 1, 1), 1), ((2, 2, 2), 8)])
def test_load_params_into_another_mesh(written, shape, devices):
  workdir, want = written
  mesh = sharding.make_mesh(shape, jax.devices()[:devices])
  state, _ = _state(mesh)
  target = {k: checkpoint.abstract_like(getattr(state, k)) for k in ("params", "batch_stats")}
  for which in ("best", "latest"):
    got = checkpoint.load_params(workdir, which, target=target)
    _assert_same(got, want)
    kernel = got["params"]["Dense_0"]["kernel"]
    assert kernel.sharding == target["params"]["Dense_0"]["kernel"].sharding
    if shape == (2, 2, 2):
      assert kernel.sharding.spec == P("fsdp", "model")
      assert {s.data.shape for s in kernel.addressable_shards} == {(8, 16)}


def test_best_export_holds_no_optimizer_state(written):
  workdir, _ = written
  item, step = checkpoint._item_dir(workdir, "best")
  assert step == 3 and set(checkpoint.saved_shapes(item)) == {"params", "batch_stats"}
  latest, _ = checkpoint._item_dir(workdir, "latest")
  assert "opt_state" in checkpoint.saved_shapes(latest)


def test_a_target_of_another_shape_is_refused_by_name(written):
  workdir, _ = written
  mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  target = {"params": checkpoint.abstract_like(_state(mesh)[0].params)}
  target["params"]["Dense_1"]["kernel"] = jax.ShapeDtypeStruct((32, 8), jnp.float32)
  with pytest.raises(ValueError, match=r"Dense_1/kernel is saved as float32\[32, 16\], the model "
                                       r"expects float32\[32, 8\]"):
    checkpoint.load_params(workdir, "best", target=target)
  del target["params"]["Dense_1"]
  with pytest.raises(ValueError, match="checkpoint has keys the model lacks.*Dense_1/bias"):
    checkpoint.load_params(workdir, "best", target=target)


def test_load_params_names_what_is_missing(tmp_path):
  with pytest.raises(FileNotFoundError, match="no best.json"):
    checkpoint.load_params(tmp_path, "best")
  with pytest.raises(FileNotFoundError, match="no checkpoints/ folder"):
    checkpoint.load_params(tmp_path, "latest")
  with pytest.raises(ValueError, match="use 'best' or 'latest'"):
    checkpoint.load_params(tmp_path, "final")


def test_bucket_paths_reach_orbax_unchanged(monkeypatch):
  import orbax.checkpoint as ocp
  seen = []

  class Recorder:
    def __init__(self, directory, *a, **kw):
      seen.append(directory)

  monkeypatch.setattr(ocp, "CheckpointManager", Recorder)
  checkpoint.make_manager("gs://bucket/run/checkpoints", save_every=1)
  assert [str(d) for d in seen] == ["gs://bucket/run/checkpoints"]


def test_metric_writer_rewrites_whole_file_where_it_cannot_append(tmp_path, monkeypatch):
  from affect_jax import fileio
  (tmp_path / "tb").mkdir()
  (tmp_path / "tb" / "metrics.jsonl").write_text('{"step": 1, "loss": 3.0}\n')
  monkeypatch.setattr(fileio, "is_remote", lambda p: True)  # as for gs://
  writer = loop.MetricWriter(tmp_path / "tb")
  writer.write(2, {"loss": 2.0})
  writer.write(3, {"loss": 1.0})
  writer.close()
  assert [r["step"] for r in loop.read_metrics(tmp_path / "tb")] == [1, 2, 3]
