"""ViT pieces against numpy ports of the MAE reference, logical sharding, the fast bf16 dot."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from affect_jax import sharding
from affect_jax.models import mae, vit

# A ViT small enough to compile in a second: 16 px images of 4 px patches = 16 tokens.
TINY = dict(patch_size=4, width=32, depth=2, num_heads=4, mlp_dim=64)
IMG = 16


# ---- MAE reference, ported line by line (facebookresearch/mae util/pos_embed.py) ----


def _mae_get_2d_sincos_pos_embed(embed_dim, grid_size, cls_token=False):
  grid_h = np.arange(grid_size, dtype=np.float32)
  grid_w = np.arange(grid_size, dtype=np.float32)
  grid = np.meshgrid(grid_w, grid_h)  # here w goes first
  grid = np.stack(grid, axis=0)
  grid = grid.reshape([2, 1, grid_size, grid_size])
  emb_h = _mae_get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[0])
  emb_w = _mae_get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[1])
  pos_embed = np.concatenate([emb_h, emb_w], axis=1)
  if cls_token:
    pos_embed = np.concatenate([np.zeros([1, embed_dim]), pos_embed], axis=0)
  return pos_embed


def _mae_get_1d_sincos_pos_embed_from_grid(embed_dim, pos):
  omega = np.arange(embed_dim // 2, dtype=np.float64)
  omega /= embed_dim / 2.
  omega = 1. / 10000**omega
  pos = pos.reshape(-1)
  out = np.einsum("m,d->md", pos, omega)
  return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def _mae_patchify(imgs_nchw, p):
  n, c, h_px, _ = imgs_nchw.shape
  h = w = h_px // p
  x = imgs_nchw.reshape(n, c, h, p, w, p)
  x = np.einsum("nchpwq->nhwpqc", x)
  return x.reshape(n, h * w, p**2 * c)


@pytest.mark.parametrize("width,grid", [(16, 4), (768, 14), (512, 16)])
def test_sincos_pos_embed_matches_mae(width, grid):
  ours = vit.sincos_pos_embed_2d(width, (grid, grid))
  ref = _mae_get_2d_sincos_pos_embed(width, grid, cls_token=True)
  assert ours.shape == (grid * grid + 1, width)
  np.testing.assert_allclose(ours, ref, atol=1e-6)
  np.testing.assert_array_equal(ours[0], 0)


def test_patchify_matches_mae_element_order_and_round_trips():
  imgs = np.random.default_rng(0).normal(size=(2, 12, 12, 3)).astype(np.float32)
  patches = vit.patchify(jnp.asarray(imgs), 4)
  np.testing.assert_array_equal(patches, _mae_patchify(imgs.transpose(0, 3, 1, 2), 4))
  np.testing.assert_array_equal(vit.unpatchify(patches, 4), imgs)
  wide = np.random.default_rng(1).normal(size=(1, 8, 16, 3)).astype(np.float32)
  np.testing.assert_array_equal(vit.unpatchify(vit.patchify(wide, 4), 4, (2, 4)), wide)


def test_drop_path_identity_when_deterministic_and_unbiased_in_training():
  x = jnp.ones((20000, 3, 2))
  layer = vit.DropPath(0.3)
  np.testing.assert_array_equal(layer.apply({}, x, deterministic=True), x)
  y = np.asarray(layer.apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(0)}))
  dropped = (y == 0).all(axis=(1, 2))
  assert abs(dropped.mean() - 0.3) < 0.02  # whole samples are dropped...
  np.testing.assert_allclose(y[~dropped], 1 / 0.7, rtol=1e-6)  # ...the rest rescaled
  assert abs(y.mean() - 1.0) < 0.03  # so the expectation is preserved
  # A traced rate (a scanned block's own) draws the same samples as the static one.
  traced = jax.jit(lambda r: vit.DropPath().apply({}, x, False, r,
                                                  rngs={"dropout": jax.random.key(0)}))(0.3)
  np.testing.assert_allclose(traced, y, rtol=1e-6)
  np.testing.assert_allclose(vit.drop_path_rates(4, 0.3), [0, 0.1, 0.2, 0.3], rtol=1e-6)


def test_variant_config():
  base = vit.variant_config("base")
  assert (base["patch_size"], base["width"], base["depth"], base["num_heads"],
          base["mlp_dim"]) == (16, 768, 12, 12, 3072)
  assert (base["decoder_width"], base["decoder_depth"], base["decoder_num_heads"]) == (512, 8, 16)
  assert vit.variant_config("huge")["patch_size"] == 14
  encoder_only = vit.variant_config("large", decoder=False, depth=3)
  assert encoder_only["depth"] == 3 and "decoder_width" not in encoder_only
  with pytest.raises(ValueError, match="Unknown"):
    vit.variant_config("gigantic")


@pytest.fixture(scope="module")
def classifier_shapes():
  model = vit.VisionTransformer(**TINY, num_classes=5, pool="mean")
  return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, IMG, IMG, 3)))


def test_params_carry_logical_axes_and_map_onto_the_mesh(classifier_shapes):
  specs = nn.get_partition_spec(classifier_shapes)["params"]
  block = specs["encoder"]["blocks_0"]
  P = jax.sharding.PartitionSpec
  assert block["attn"]["qkv"]["kernel"] == P("embed", "qkv", "heads", "kv")
  assert block["attn"]["proj"]["kernel"] == P("heads", "kv", "embed")
  assert block["mlp"]["fc1"]["kernel"] == P("embed", "mlp")
  assert block["mlp"]["fc2"]["kernel"] == P("mlp", "embed")
  assert block["norm1"]["scale"] == P("embed")
  assert specs["patch_embed"]["proj"]["kernel"] == P("patch", "embed")
  assert specs["head"]["kernel"] == P("embed", "classes")
  mesh_specs = nn.logical_to_mesh(specs, sharding.DEFAULT_RULES)
  block = mesh_specs["encoder"]["blocks_0"]
  assert block["attn"]["qkv"]["kernel"] == P("fsdp", None, "model", None)
  assert block["mlp"]["fc2"]["kernel"] == P("model", "fsdp")
  assert mesh_specs["cls_token"] == P(None, None, "fsdp")
  assert nn.logical_to_mesh_axes(("batch", "embed"), sharding.DEFAULT_RULES) == P(
      ("data", "fsdp"), None)  # a mesh axis shards one dim only


@pytest.mark.parametrize("remat", ["none", "full"])
def test_scanned_blocks_equal_unrolled_ones(classifier_shapes, remat):
  """scan_layers=True: one block under nn.scan over params stacked on a 'layers' axis (not
  sharded); the same function and gradients as the unrolled blocks, params moved between
  the layouts by stack_blocks / unstack_blocks."""
  imgs = jax.random.normal(jax.random.key(1), (2, IMG, IMG, 3))
  unrolled = vit.VisionTransformer(**TINY, pool="mean", drop_path_rate=0.2)
  scanned = vit.VisionTransformer(**TINY, pool="mean", drop_path_rate=0.2, scan_layers=True,
                                  remat=remat)
  boxed = jax.eval_shape(scanned.init, jax.random.key(0), imgs)["params"]
  specs = nn.get_partition_spec(boxed)["encoder"]["blocks"]
  P = jax.sharding.PartitionSpec
  assert specs["mlp"]["fc1"]["kernel"] == P("layers", "embed", "mlp")
  assert nn.logical_to_mesh(specs, sharding.DEFAULT_RULES)["mlp"]["fc1"]["kernel"] == P(
      None, "fsdp", "model")
  params = nn.unbox(unrolled.init(jax.random.key(0), imgs)["params"])
  stacked = vit.stack_blocks(params)
  assert jax.tree.map(np.shape, stacked) == jax.tree.map(np.shape, nn.unbox(boxed))
  assert stacked["encoder"]["blocks"]["norm1"]["scale"].shape == (TINY["depth"], TINY["width"])
  jax.tree.map(np.testing.assert_array_equal, vit.unstack_blocks(stacked), params)

  loss = lambda model: jax.jit(jax.value_and_grad(
      lambda p: jnp.sum(jnp.sin(model.apply({"params": p}, imgs)))))
  value, grads = loss(unrolled)(params)
  value_s, grads_s = loss(scanned)(stacked)
  np.testing.assert_allclose(value_s, value, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               grads_s, vit.stack_blocks(grads))
  assert float(jnp.abs(grads["encoder"]["blocks_1"]["mlp"]["fc1"]["kernel"]).max()) > 0
  # Training mode runs (drop-path with each layer's rate, rngs split over the layers).
  out = scanned.apply({"params": stacked}, imgs, train=True, rngs={"dropout": jax.random.key(4)})
  assert out.shape == (2, TINY["width"]) and np.isfinite(out).all()


def test_block_layouts_refuse_what_they_cannot_map():
  leaf = np.zeros(3)
  with pytest.raises(ValueError, match="not 0..1"):
    vit.stack_blocks({"blocks_0": leaf, "blocks_2": leaf})
  with pytest.raises(ValueError, match="mixed layouts"):
    vit.stack_blocks({"blocks_0": leaf, "blocks": leaf[None]})
  with pytest.raises(ValueError, match="different leading sizes"):
    vit.unstack_blocks({"blocks": {"a": np.zeros((2, 3)), "b": np.zeros((3, 3))}})
  assert vit.is_scanned({"encoder": {"blocks": {}}}) and not vit.is_scanned({"blocks_0": leaf})


def test_classifier_outputs_and_mae_encoder_loads_into_it():
  imgs = jax.random.normal(jax.random.key(1), (2, IMG, IMG, 3))
  model = mae.MaskedAutoencoder(**TINY, decoder_width=16, decoder_depth=1,
                                decoder_num_heads=2, decoder_mlp_dim=32)

  @jax.jit
  def mae_cls_token(imgs):
    rngs = {"params": jax.random.key(0), "masking": jax.random.key(1)}
    params = nn.unbox(model.init(rngs, imgs, train=False)["params"])
    # With nothing masked the encoder sees every patch (shuffled, which attention ignores).
    _, state = model.apply({"params": params}, imgs, mask_ratio=0.0, train=False,
                           rngs={"masking": jax.random.key(2)},
                           capture_intermediates=lambda m, _: m.name == "encoder")
    return params, state["intermediates"]["encoder"]["__call__"][0][:, 0]  # [B, D]

  mae_params, mae_cls = mae_cls_token(imgs)
  clf = vit.VisionTransformer(**TINY, pool="cls")
  params = vit.load_mae_encoder(jax.eval_shape(clf.init, jax.random.key(3), imgs)["params"],
                                mae_params)
  out = jax.jit(clf.apply)({"params": params}, imgs)
  assert out.shape == (2, 32) and out.dtype == jnp.float32
  np.testing.assert_allclose(out, mae_cls, atol=1e-5)
  # Into a scanned classifier: the MAE's blocks are stacked (and back, the other way round).
  clf_s = vit.VisionTransformer(**TINY, pool="cls", scan_layers=True)
  params_s = vit.load_mae_encoder(jax.eval_shape(clf_s.init, jax.random.key(3), imgs)["params"],
                                  mae_params)
  np.testing.assert_allclose(jax.jit(clf_s.apply)({"params": params_s}, imgs), mae_cls, atol=1e-5)
  back = vit.load_mae_encoder(nn.unbox(jax.eval_shape(clf.init, jax.random.key(3), imgs))["params"],
                              {**mae_params, "encoder": params_s["encoder"]})
  jax.tree.map(np.testing.assert_array_equal, back["encoder"], params["encoder"])
  # Mean pooling has fc_norm instead of the encoder's final norm.
  clf = vit.VisionTransformer(**TINY, pool="mean", num_classes=3)
  template = nn.unbox(jax.eval_shape(clf.init, jax.random.key(3), imgs)["params"])
  params = vit.load_mae_encoder(template, mae_params)
  assert "norm" not in params["encoder"] and params["fc_norm"] is template["fc_norm"]
  assert jax.eval_shape(clf.apply, {"params": params}, imgs).shape == (2, 3)
