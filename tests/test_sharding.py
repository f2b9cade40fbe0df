import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from affect_jax import sharding


def test_eight_emulated_devices():
  assert jax.device_count() == 8


@pytest.mark.parametrize("shape,want", [((-1, 1, 1), (8, 1, 1)), ((2, -1, 1), (2, 4, 1)),
                                        ((1, 2, 4), (1, 2, 4)), ((2, 2, -1), (2, 2, 2))])
def test_make_mesh_shapes(shape, want):
  mesh = sharding.make_mesh(shape)
  assert mesh.axis_names == ("data", "fsdp", "model")
  assert tuple(mesh.devices.shape) == want
  assert sorted(d.id for d in mesh.devices.flat) == list(range(8))


@pytest.mark.parametrize("shape", [(3, -1, 1), (2, 2, 1), (-1, -1, 1), (8, 1)])
def test_make_mesh_rejects(shape):
  with pytest.raises(ValueError, match="mesh shape"):
    sharding.make_mesh(shape)


class _Toy(nn.Module):
  @nn.compact
  def __call__(self, x):
    w = self.param("w", nn.with_logical_partitioning(nn.initializers.normal(), ("embed", "mlp")), (16, 32))
    b = self.param("b", nn.with_logical_partitioning(nn.initializers.zeros, ("mlp",)), (32,))
    return x @ w + b


def test_logical_rules_place_params():
  mesh = sharding.make_mesh((2, 2, 2))
  abstract = jax.eval_shape(_Toy().init, jax.random.key(0), jnp.ones((4, 16)))
  shard = sharding.logical_shardings(abstract, mesh)
  assert shard["params"]["w"].spec == P("fsdp", "model")
  assert shard["params"]["b"].spec == P("model")
  params = jax.jit(lambda k: nn.meta.unbox(_Toy().init(k, jnp.ones((4, 16)))), out_shardings=shard)(
      jax.random.key(0))
  w = params["params"]["w"]
  # 16 rows over fsdp=2, 32 columns over model=2: each device holds an [8, 16] block.
  assert {s.data.shape for s in w.addressable_shards} == {(8, 16)}


def test_shard_batch_splits_leading_axis():
  mesh = sharding.make_mesh((2, 4, 1))
  x = np.arange(16 * 3, dtype=np.float32).reshape(16, 3)
  batch = sharding.shard_batch({"x": x}, mesh)
  assert batch["x"].sharding.spec == P(("data", "fsdp"), None)
  assert {s.data.shape for s in batch["x"].addressable_shards} == {(2, 3)}
  np.testing.assert_array_equal(np.asarray(batch["x"]), x)
  assert sharding.batch_divisor(mesh) == 8


def test_rules_from_config_makes_tuples():
  rules = sharding.rules_from_config([["batch", ["data", "fsdp"]], ["embed", "fsdp"], ["mlp", None]])
  assert rules == (("batch", ("data", "fsdp")), ("embed", "fsdp"), ("mlp", None))
  hash(rules)


def test_check_batch_size():
  mesh = sharding.make_mesh((2, 2, 2))
  sharding.check_batch_size(8, mesh)
  with pytest.raises(ValueError, match="batch_size=6 must divide over the 4 data-parallel"):
    sharding.check_batch_size(6, mesh)


def test_pad_rows_appends_zero_rows():
  x = np.arange(6, dtype=np.uint8).reshape(3, 2) + 1
  got = sharding.pad_rows(x, 5)
  assert got.dtype == np.uint8 and got.shape == (5, 2)
  np.testing.assert_array_equal(got[:3], x)
  assert not got[3:].any()
