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


# ---- Several processes (the single-process paths; tests/multiprocess runs the rest) ----


def test_batch_rows_rounds_up_to_the_data_parallel_devices():
  mesh = sharding.make_mesh((2, 2, 2))  # 4 data-parallel devices
  assert sharding.batch_rows(5, mesh) == 8
  assert sharding.batch_rows(8, mesh) == 8
  assert sharding.batch_rows(1, sharding.make_mesh((1, 1, 1), jax.devices()[:1])) == 1


def test_map_batches_returns_each_row_its_own_output():
  mesh = sharding.make_mesh((2, 4, 1))
  fn = jax.jit(lambda b: {"double": b["x"] * 2, "sum": b["x"].sum(-1)},
               out_shardings=sharding.batch_sharding(mesh, 1))
  rows = sharding.batch_rows(8, mesh)
  data = np.arange(21 * 3, dtype=np.float32).reshape(21, 3)
  batches = [{"x": data[i:i + rows], "id": np.arange(i, min(i + rows, 21))} for i in range(0, 21, rows)]
  spec = {"x": jax.ShapeDtypeStruct((3,), np.float32)}
  got = list(sharding.map_batches(fn, batches, mesh, rows=rows, row_spec=spec))
  assert [len(b["id"]) for b, _ in got] == [8, 8, 5]  # the short last batch: padding dropped
  ids = np.concatenate([b["id"] for b, _ in got])
  np.testing.assert_array_equal(ids, np.arange(21))
  np.testing.assert_array_equal(np.concatenate([o["double"] for _, o in got]), data * 2)
  np.testing.assert_array_equal(np.concatenate([o["sum"] for _, o in got]), data.sum(-1))


def test_map_batches_refuses_oversized_batches():
  mesh = sharding.make_mesh((-1, 1, 1))
  spec = {"x": jax.ShapeDtypeStruct((), np.float32)}
  with pytest.raises(ValueError, match="more than this process's 8"):
    list(sharding.map_batches(lambda b: b["x"], [{"x": np.zeros(9, np.float32)}], mesh, rows=8,
                              row_spec=spec))


def test_allgather_rows_is_identity_on_one_process():
  x = np.arange(6).reshape(3, 2)
  np.testing.assert_array_equal(sharding.allgather_rows(x), x)


def test_process_owners_balance_sizes():
  sizes = [100, 10, 60, 50, 40, 5]
  owners = sharding.process_owners(len(sizes), sizes)
  assert owners == [0] * 6  # one process owns everything
  # As if there were three processes: largest first, each to the least loaded.
  import unittest.mock as mock
  with mock.patch.object(jax, "process_count", return_value=3):
    owners = sharding.process_owners(len(sizes), sizes)
    assert owners == [0, 1, 1, 2, 2, 1]
    load = [sum(s for s, o in zip(sizes, owners) if o == p) for p in range(3)]
    assert load == [100, 75, 90]
    assert sharding.process_owners(5) == [0, 1, 2, 0, 1]
    with mock.patch.object(jax, "process_index", return_value=1):
      assert sharding.process_share(list("abcdef"), sizes) == ["b", "c", "f"]


@pytest.mark.parametrize("env,flags,want", [
    ({}, {}, ("single", None)),
    ({}, {"coordinator_address": "h:1", "num_processes": 2, "process_id": 1},
     ("flags", {"coordinator_address": "h:1", "num_processes": 2, "process_id": 1})),
    ({}, {"num_processes": 1}, ("single", None)),
    ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}, {},
     ("env", {"coordinator_address": "h:1", "num_processes": 4, "process_id": 3})),
    ({"JAX_COORDINATOR_ADDRESS": "h:1", "SLURM_NTASKS": "2", "SLURM_PROCID": "0"}, {},
     ("env", {"coordinator_address": "h:1"})),
    ({"SLURM_NTASKS": "8", "SLURM_PROCID": "3", "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_JOB_ID": "7"},
     {}, ("slurm", {})),
    ({"SLURM_NTASKS": "1", "SLURM_PROCID": "0", "SLURM_STEP_NODELIST": "n1"}, {}, ("single", None)),
    ({"OMPI_COMM_WORLD_SIZE": "2"}, {}, ("openmpi", {})),
    ({"TPU_WORKER_HOSTNAMES": "a,b,c,d"}, {}, ("cloud_tpu", {})),
    ({"TPU_WORKER_HOSTNAMES": "localhost"}, {}, ("single", None)),
])
def test_join_plan(env, flags, want):
  assert sharding.join_plan(env, **flags) == want


def test_join_plan_on_a_cloud_tpu_vm_lets_jax_find_the_workers():
  assert sharding.join_plan({}, cloud_tpu=True) == ("cloud_tpu", {})


@pytest.mark.parametrize("env,flags,match", [
    ({}, {"coordinator_address": "h:1"}, "--num_processes, --process_id"),
    ({}, {"coordinator_address": "h:1", "num_processes": 2}, "--process_id"),
    ({"JAX_COORDINATOR_ADDRESS": "h:1"}, {}, "JAX_NUM_PROCESSES and JAX_PROCESS_ID"),
    ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2"}, {}, "JAX_PROCESS_ID is not"),
])
def test_join_plan_names_what_is_missing(env, flags, match):
  with pytest.raises(ValueError, match=match):
    sharding.join_plan(env, **flags)
