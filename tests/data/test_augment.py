"""Device augmentation (`data.augment='device'`): PIL's crop-resize + flip in the step."""

import itertools
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image, ImageFilter

from affect_jax import optim, sharding
from affect_jax.data import augment, loaders
from affect_jax.train import pretrain
from configs import mae_pretrain


def _photo(rng, height, width):
  """Noise blurred a little: an image with both edges and gradients."""
  x = rng.integers(0, 256, (height, width, 3)).astype(np.uint8)
  return np.asarray(Image.fromarray(x).filter(ImageFilter.GaussianBlur(1.2)))


def test_crop_resize_flip_is_pils_bicubic_within_one_level():
  rng = np.random.default_rng(0)
  # A photo-like image, and raw noise: bicubic overshoots at its sharp edges, and PIL clips
  # between its two passes.
  photo, noise = _photo(rng, 40, 50), rng.integers(0, 256, (40, 50, 3)).astype(np.uint8)
  # Up- and downscaling, boxes at the borders (clamped taps), fractional edges, a full box.
  boxes = [(3, 5, 33, 29), (0, 0, 50, 40), (10, 7, 20, 19), (41, 30, 50, 40), (0.5, 1.25, 47.5, 39),
           (0, 0, 50, 40)]
  sizes = [24, 24, 32, 16, 20, 64]
  diffs = []
  cases = itertools.product(zip(boxes, sizes), (photo, noise), (False, True))
  for (box, size), image, flip in cases:
    want = np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BICUBIC,
                                                    box=box), np.float64)
    if flip:
      want = want[:, ::-1]
    got = augment.crop_resize_flip(jnp.asarray(image[None]), jnp.asarray([box], jnp.float32),
                                   jnp.asarray([flip]), size)[0]
    assert got.shape == (size, size, 3) and got.dtype == jnp.float32
    got = np.asarray(got)
    np.testing.assert_array_equal(got, np.round(got))  # whole levels, as PIL's uint8
    diffs.append(np.abs(got - want))
  assert max(d.max() for d in diffs) <= 1.0
  assert np.mean([d.mean() for d in diffs]) < 0.3


def test_a_box_of_the_whole_image_at_its_size_is_the_image():
  image = np.random.default_rng(1).integers(0, 256, (2, 12, 12, 3)).astype(np.uint8)
  got = augment.crop_resize_flip(jnp.asarray(image), jnp.asarray([[0, 0, 12, 12]] * 2, jnp.float32),
                                 jnp.asarray([False, True]), 12)
  np.testing.assert_array_equal(np.asarray(got[0]), image[0])
  np.testing.assert_array_equal(np.asarray(got[1]), image[1, :, ::-1])


@pytest.fixture(scope="module")
def photo_paths(tmp_path_factory):
  root = tmp_path_factory.mktemp("photos")
  rng = np.random.default_rng(2)
  paths = []
  for i in range(12):
    paths.append(str(root / f"{i:03d}.png"))
    Image.fromarray(_photo(rng, 24, 24)).save(paths[-1])
  (root / "bad.png").write_bytes(b"not an image")
  return paths[:5] + [str(root / "bad.png")] + paths[5:]


def test_device_batches_are_the_host_batches_augmented_on_the_device(photo_paths, caplog):
  """The same boxes and flips from the same seed: the device's images equal the host's within
  one level everywhere, and the unreadable file is skipped (and logged) the same way."""
  kw = dict(image_size=16, batch_size=4, seed=3, num_epochs=1, worker_count=0,
            crop_scale=(0.3, 1.0))
  host = list(loaders.pretrain_dataset(photo_paths, **kw))
  device = list(loaders.pretrain_dataset(photo_paths, augment="device", source_size=24, **kw))
  assert len(host) == len(device) == 3 and "bad.png" in caplog.text
  for h, d in zip(host, device):
    assert d["image"].shape == (4, 24, 24, 3) and d["crop"].shape == (4, 4)
    got = np.asarray(augment.crop_resize_flip(jnp.asarray(d["image"]), jnp.asarray(d["crop"]),
                                              jnp.asarray(d["flip"]), 16))
    diff = np.abs(got - h["image"].astype(np.float64))
    assert diff.max() <= 1.0 and diff.mean() < 0.3
  flips = np.concatenate([d["flip"] for d in device])
  assert 0 < flips.sum() < len(flips)
  # An image not at source_size is resized to it on the host first, the box drawn on that.
  other = loaders.CropBoxFlip(20).random_map(photo_paths[0], np.random.default_rng(0))
  want = Image.open(photo_paths[0]).convert("RGB").resize((20, 20), Image.Resampling.BICUBIC)
  np.testing.assert_array_equal(other["image"], np.asarray(want))
  assert tuple(other["crop"]) == loaders.random_resized_crop_box(20, 20, np.random.default_rng(0))


def test_pixels_as_stored_go_without_decoding():
  """An RGB TFDS record's pixels at source_size are passed on as they are."""
  x = np.random.default_rng(4).integers(0, 256, (8, 8, 3)).astype(np.uint8)
  out = loaders.CropBoxFlip(8).random_map({"image": x, "path": "p"}, np.random.default_rng(0))
  assert out["image"] is x or np.shares_memory(out["image"], x)
  l, t, r, b = out["crop"]
  assert 0 <= l < r <= 8 and 0 <= t < b <= 8


IMAGE = 16


def _config(mode):
  c = mae_pretrain.get_config("tiny")
  c.data.image_size = IMAGE
  c.data.augment = mode
  c.batch_size = 8
  return c


def test_the_device_augmented_step_is_the_step_on_the_augmented_images():
  """Wiring: a pretraining step given stored images + boxes + flips equals the host-mode
  step given those images augmented beforehand; on a 4-device mesh it adds no collective
  beyond the gradient reduction the plain step has."""
  rng = np.random.default_rng(5)
  stored = np.stack([_photo(rng, 24, 24) for _ in range(8)])
  crops = np.array([loaders.random_resized_crop_box(24, 24, rng) for _ in range(8)], np.float32)
  flips = rng.random(8) < 0.5
  augmented = np.asarray(augment.crop_resize_flip(stored, crops, flips, IMAGE)).astype(np.uint8)
  mesh = sharding.make_mesh((4, 1, 1), jax.devices()[:4])
  out, texts = [], []
  for mode, batch in (("host", {"image": augmented}),
                      ("device", {"image": stored, "crop": crops, "flip": flips})):
    config = _config(mode)
    model = pretrain.create_model(config)
    schedule = optim.schedule_for(config, 10)
    state, shardings = pretrain.create_train_state(config, model, jax.random.key(0), mesh, schedule)
    step = pretrain.jit_train_step(model, config, schedule, shardings, mesh)
    batch = sharding.shard_batch(batch, mesh)
    texts.append(step.lower(state, batch).compile().as_text())
    out.append(step(state, batch)[1])
  np.testing.assert_allclose(float(out[1]["loss"]), float(out[0]["loss"]), rtol=1e-6)
  gathers = [t.count("all-gather") + t.count("all-to-all") for t in texts]
  assert gathers[1] == gathers[0]


def test_unknown_mode_is_a_clear_error(photo_paths):
  with pytest.raises(ValueError, match="augment"):
    augment.mode({"augment": "gpu"})
  with pytest.raises(ValueError, match="augment"):
    loaders.pretrain_dataset(photo_paths, image_size=8, batch_size=2, seed=0, augment="gpu")
