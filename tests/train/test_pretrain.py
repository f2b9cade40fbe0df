"""MAE pretraining step: sharded == single-device, params laid out by the rules, resume."""

import os

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from PIL import Image

from affect_jax import optim, sharding
from affect_jax.data import loaders
from affect_jax.models import vit
from affect_jax.train import loop, pretrain
from configs import mae_pretrain

IMAGE = 32
BATCH = 16


def _config(**kw):
  c = mae_pretrain.get_config("tiny")
  c.data.image_size = IMAGE
  c.batch_size = BATCH
  c.recon_every = 0
  c.optim.base_lr = 1e-3 * 256 / BATCH
  for k, v in kw.items():
    c[k] = v
  return c


def _batch(seed=0):
  rng = np.random.default_rng(seed)
  # Smooth images (a gradient per sample) so normalised patches are well conditioned.
  base = np.linspace(0, 255, IMAGE)[None, :, None, None] * rng.uniform(0.2, 1, (BATCH, 1, 1, 3))
  noise = rng.integers(0, 40, (BATCH, IMAGE, IMAGE, 3))
  return {"image": np.clip(base + noise, 0, 255).astype(np.uint8)}


def _two_steps(mesh_shape, devices, **config_kw):
  config = _config()
  config.model.update(config_kw)
  mesh = sharding.make_mesh(mesh_shape, devices)
  model = pretrain.create_model(config)
  schedule = optim.schedule_for(config, 10)
  state, shardings = pretrain.create_train_state(config, model, jax.random.key(0), mesh, schedule)
  step = pretrain.jit_train_step(model, config, schedule, shardings, mesh)
  losses = []
  for s in range(2):
    state, metrics = step(state, sharding.shard_batch(_batch(s), mesh))
    losses.append(float(metrics["loss"]))
  return state, losses


@pytest.fixture(scope="module")
def single_device():
  return _two_steps((1, 1, 1), jax.devices()[:1])


@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (2, 4, 1)])
def test_sharded_step_matches_single_device(single_device, mesh_shape):
  ref_state, ref_losses = single_device
  state, losses = _two_steps(mesh_shape, jax.devices())
  np.testing.assert_allclose(losses, ref_losses, rtol=2e-5)
  assert losses[1] != losses[0]
  # Adam's first steps divide by |g|: a gradient entry near 0 turns float-level reduction
  # order differences into visible ones, so bound the worst entry loosely, the typical tightly.
  diffs = np.concatenate([np.abs(np.asarray(a) - np.asarray(b)).ravel()
                          for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(ref_state.params))])
  assert diffs.max() < 1e-4 and np.median(diffs) < 1e-7
  moved = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))),
                       state.params, _init_params())
  assert min(jax.tree.leaves(moved)) > 0  # every parameter was updated


def test_bf16_step_with_heads_over_the_model_axis_matches_single_device():
  # The bf16 path (custom-VJP matmuls with a unit contracted axis, the attention VJP) under
  # GSPMD with heads and MLP split over 'model': the same step up to bf16 rounding order.
  ref_state, ref_losses = _two_steps((1, 1, 1), jax.devices()[:1], dtype="bfloat16")
  state, losses = _two_steps((2, 2, 2), jax.devices(), dtype="bfloat16")
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-4)
  diffs = np.concatenate([np.abs(np.asarray(a) - np.asarray(b)).ravel()
                          for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(ref_state.params))])
  # Adam's first steps normalise each entry by |g|: where bf16 rounding order flips a tiny
  # gradient's sign the entry moves by up to ~2 lr (lr <= 1e-3 here); the bulk agrees closely.
  assert diffs.max() < 4e-3 and np.quantile(diffs, 0.99) < 2e-5 and np.median(diffs) < 1e-6


def _init_params():
  config = _config()
  mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  model = pretrain.create_model(config)
  state, _ = pretrain.create_train_state(config, model, jax.random.key(0), mesh,
                                         optim.schedule_for(config, 10))
  return state.params


def test_params_and_moments_sharded_by_rules():
  config = _config()
  mesh = sharding.make_mesh((2, 4, 1))
  model = pretrain.create_model(config)
  state, _ = pretrain.create_train_state(config, model, jax.random.key(0), mesh,
                                         optim.schedule_for(config, 10))
  flat = {"/".join(str(getattr(k, "key", k)) for k in path): leaf
          for path, leaf in jax.tree_util.tree_leaves_with_path(state.params)}
  mlp_in = next(v for k, v in flat.items() if "encoder" in k and k.endswith("kernel") and v.shape == (128, 512))
  # ('embed', 'mlp') -> ('fsdp', 'model'): 128 rows over fsdp=4, model axis of size 1.
  assert mlp_in.sharding.spec == P("fsdp", "model")
  assert {s.data.shape for s in mlp_in.addressable_shards} == {(32, 512)}
  # Adam's moments follow their parameters.
  mu = state.opt_state[0].mu
  mu_flat = {"/".join(str(getattr(k, "key", k)) for k in path): leaf
             for path, leaf in jax.tree_util.tree_leaves_with_path(mu)}
  assert any(v.shape == (128, 512) and v.sharding.spec == P("fsdp", "model") for v in mu_flat.values())
  # Vectors (LayerNorm) are replicated or sharded only along 'embed'.
  ln = next(v for k, v in flat.items() if k.endswith("scale"))
  assert ln.sharding.spec in (P("fsdp"), P())


@pytest.fixture(scope="module")
def face_root(tmp_path_factory):
  root = tmp_path_factory.mktemp("faces")
  for v in range(2):
    os.makedirs(root / f"v{v}")
    for i in range(24):
      img = _batch(v * 100 + i)["image"][i % BATCH]
      Image.fromarray(img).save(root / f"v{v}" / f"{i + 1:05d}.jpg")
  return root


def test_resume_gives_identical_losses_and_params(face_root, tmp_path):
  config = _config(num_steps=6, log_every=1, checkpoint_every=3)
  config.data.roots = str(face_root)
  config.data.index_cache = str(tmp_path / "index")
  straight = pretrain.train_and_evaluate(config, str(tmp_path / "straight"))

  class Crash(Exception):
    pass

  def crash_at_3(step, state, metrics):
    if step == 3:
      raise Crash()

  with pytest.raises(Crash):
    pretrain.train_and_evaluate(config, str(tmp_path / "resumed"), hooks=(crash_at_3,))
  resumed = pretrain.train_and_evaluate(config, str(tmp_path / "resumed"))
  assert [h["step"] for h in resumed["history"]] == [4, 5, 6]
  want = [h["loss"] for h in straight["history"][3:]]
  np.testing.assert_allclose([h["loss"] for h in resumed["history"]], want, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(straight["state"].params), jax.tree.leaves(resumed["state"].params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
  # The metrics file holds the whole curve across the restart.
  steps = [m["step"] for m in loop.read_metrics(tmp_path / "resumed" / "tb")]
  assert steps == [1, 2, 3, 4, 5, 6]


def test_refuses_to_overwrite_without_resume(face_root, tmp_path):
  config = _config(num_steps=1, log_every=1, checkpoint_every=1)
  config.data.roots = str(face_root)
  config.data.index_cache = str(tmp_path / "index")
  pretrain.train_and_evaluate(config, str(tmp_path / "w"))
  config.resume = False
  with pytest.raises(FileExistsError, match="resume"):
    pretrain.train_and_evaluate(config, str(tmp_path / "w"))



def test_a_corpus_without_readable_images_is_named(tmp_path):
  root = tmp_path / "faces"
  os.makedirs(root / "v0")
  (root / "v0" / "00001.jpg").write_bytes(np.random.default_rng(0).bytes(500))
  (root / "v0" / "00002.jpg").write_bytes(b"")
  config = _config(num_steps=1, recon_every=1)  # the recon sample is read first
  config.data.roots = str(root)
  config.data.index_cache = str(tmp_path / "index")
  with pytest.raises(ValueError) as error:
    pretrain.train_and_evaluate(config, str(tmp_path / "w"))
  assert str(error.value).startswith(
      f"{root}: no readable image in the face corpus (2 of 2 unreadable, e.g. "
      f"{root / 'v0' / '00001.jpg'}: UnidentifiedImageError: ")
  for f in (root / "v0").iterdir():
    f.unlink()
  with pytest.raises(FileNotFoundError, match=f"{root}: no .jpg/.jpeg/.png images found"):
    pretrain.train_and_evaluate(config, str(tmp_path / "w"))

def test_tiny_loss_falls_on_synthetic_faces(synthetic_root, tmp_path):
  config = _config(num_steps=40, log_every=1, checkpoint_every=40, recon_every=40)
  config.data.root = str(synthetic_root)  # roots empty: <root>/cropped_aligned
  config.data.index_cache = str(tmp_path / "index")
  out = pretrain.train_and_evaluate(config, str(tmp_path / "run"))
  losses = [h["loss"] for h in out["history"]]
  assert len(losses) == 40 and np.isfinite(losses).all()
  first, last = np.mean(losses[:5]), np.mean(losses[-5:])
  assert last < 0.8 * first, (first, last)
  grid = np.asarray(Image.open(tmp_path / "run" / "recon" / "latest.png"))
  assert grid.shape == (3 * IMAGE, 8 * IMAGE, 3)  # original / masked / reconstruction rows


def test_two_steps_in_one_call_are_the_two_steps_on_the_mesh(single_device):
  """config.steps_per_call's function (`TrainStep.calls`): both steps scanned in one
  sharded call, the randomness of each drawn from its own step number."""
  ref_state, ref_losses = single_device
  config = _config()
  mesh = sharding.make_mesh((2, 4, 1), jax.devices())
  model = pretrain.create_model(config)
  schedule = optim.schedule_for(config, 10)
  state, shardings = pretrain.create_train_state(config, model, jax.random.key(0), mesh, schedule)
  step = pretrain.jit_train_step(model, config, schedule, shardings, mesh)
  state, metrics = step.calls(2)(state, tuple(sharding.shard_batch(_batch(s), mesh) for s in range(2)))
  assert int(state.step) == 2
  np.testing.assert_allclose(float(metrics["loss"]), ref_losses[1], rtol=2e-5)
  for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(ref_state.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4)


@pytest.mark.parametrize("remat", ["dots_saveable"])
def test_remat_is_the_same_step(single_device, remat):
  ref_state, ref_losses = single_device
  state, losses = _two_steps((1, 1, 1), jax.devices()[:1], remat=remat)
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(ref_state.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_scanned_blocks_are_the_same_step_under_fsdp(single_device):
  """scan_layers=True with remat on a (2, 4, 1) mesh, started from the unrolled init stacked:
  the same losses and params as the unrolled single-device step; stacked kernels keep their
  'layers' axis whole and shard 'embed' over fsdp."""
  ref_state, ref_losses = single_device
  config = _config()
  config.model.update(scan_layers=True, remat="full")
  mesh = sharding.make_mesh((2, 4, 1))
  model = pretrain.create_model(config)
  schedule = optim.schedule_for(config, 10)
  state, shardings = pretrain.create_train_state(config, model, jax.random.key(0), mesh, schedule)
  init = vit.stack_blocks(jax.device_get(_init_params()))
  state = state.replace(params=jax.device_put(init, shardings.params))
  fc1 = state.params["encoder"]["blocks"]["mlp"]["fc1"]["kernel"]
  assert fc1.shape == (4, 128, 512) and fc1.sharding.spec == P(None, "fsdp", "model")
  step = pretrain.jit_train_step(model, config, schedule, shardings, mesh)
  losses = []
  for s in range(2):
    state, metrics = step(state, sharding.shard_batch(_batch(s), mesh))
    losses.append(float(metrics["loss"]))
  np.testing.assert_allclose(losses, ref_losses, rtol=2e-5)
  diffs = np.concatenate([
      np.abs(np.asarray(a) - np.asarray(b)).ravel() for a, b in zip(
          jax.tree.leaves(vit.unstack_blocks(jax.device_get(state.params))),
          jax.tree.leaves(ref_state.params))])
  assert diffs.max() < 1e-4 and np.median(diffs) < 1e-7


def test_accumulated_step_averages_its_micro_batches_on_the_mesh():
  """grad_accum_steps=2 on 8 devices: the update is the mean of the two strided micro-batches'
  gradients, each with its own masks (fold_in(rng, i)), and its loss their mean."""
  config = _config(grad_accum_steps=2)
  mesh = sharding.make_mesh((8, 1, 1))
  model = pretrain.create_model(config)
  schedule = optim.schedule_for(config, 10)
  state, shardings = pretrain.create_train_state(config, model, jax.random.key(0), mesh, schedule)
  batch = _batch(3)
  params = jax.device_get(state.params)  # the step donates the state
  _, metrics = pretrain.jit_train_step(model, config, schedule, shardings, mesh)(
      state, sharding.shard_batch(batch, mesh))
  rng = jax.random.fold_in(jax.random.key(config.seed), 0)
  losses, grads = [], []

  @jax.jit
  def by_hand(params, images, micro_rng):
    mask_rng, drop_rng = jax.random.split(micro_rng)
    return jax.value_and_grad(lambda p: model.apply(
        {"params": p}, loaders.normalize_images(images), train=True,
        rngs={"masking": mask_rng, "dropout": drop_rng})[0])(params)
  for i in range(2):
    loss, grad = by_hand(params, batch["image"][i::2], jax.random.fold_in(rng, i))
    losses.append(float(loss))
    grads.append(grad)
  np.testing.assert_allclose(float(metrics["loss"]), np.mean(losses), rtol=1e-5)
  mean_grad = jax.tree.map(lambda a, b: (a + b) / 2, *grads)
  np.testing.assert_allclose(float(metrics["grad_norm"]), float(optim.global_norm(mean_grad)),
                             rtol=1e-4)
  with pytest.raises(ValueError, match="grad_accum_steps=3 must divide config.batch_size=16"):
    sharding.check_batch_size(16, mesh, 3)
  with pytest.raises(ValueError, match="config.batch_size=4 must divide over the 8"):
    sharding.check_batch_size(16, mesh, 4)  # micro-batches of 4


def test_the_residual_stream_is_constrained_to_the_batch_split_in_the_sharded_step():
  config = _config()
  mesh = sharding.make_mesh((1, 8, 1))  # FSDP: weights split over the devices
  model = pretrain.create_model(config)
  schedule = optim.schedule_for(config, 10)
  state, shardings = pretrain.create_train_state(config, model, jax.random.key(0), mesh, schedule)
  text = pretrain.jit_train_step(model, config, schedule, shardings, mesh).lower(
      state, sharding.shard_batch(_batch(0), mesh)).as_text()
  constraints = [l for l in text.splitlines() if "sharding_constraint" in l]
  # Three per block (input and both residual adds), encoder and decoder (tiny: 4 + 2 blocks),
  # forward and backward; each splits the batch only.
  assert len(constraints) >= 3 * (4 + 2)
  assert all('[{"data", "fsdp"}, {}, {}]' in l for l in constraints), constraints[0]
  # Outside a step (no mesh or rules in scope) the model carries no constraint.
  plain = jax.jit(lambda p, x: model.apply({"params": p}, x, train=False,
                                           rngs={"masking": jax.random.key(0)})[0])
  assert "sharding_constraint" not in plain.lower(state.params, np.zeros((2, IMAGE, IMAGE, 3),
                                                                np.float32)).as_text()
