"""TemporalConvNet against an explicit numpy TCN, causality, padding masks and init."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from affect_jax.models import tcn

# Level 0 keeps the width (no downsample), levels 1-2 change it; dilations 1, 2, 4.
CHANNELS = (4, 6, 5)
D_IN, T, K = 4, 24, 5


def _init(padding="causal", seed=0, channels=CHANNELS, kernel_size=K):
  """The model and random params away from every init value (g != ||v||, slopes != 0.25),
  drawn in numpy: compiling the initialisers costs more than these tests."""
  model = tcn.TemporalConvNet(channels, kernel_size, padding)
  shapes = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((2, T, D_IN))))
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    if path[-1].key in ("g", "negative_slope"):
      return rng.uniform(0.1, 1.5, leaf.shape).astype(np.float32)
    return (0.3 * rng.normal(size=leaf.shape)).astype(np.float32)
  return model, jax.tree_util.tree_map_with_path(draw, shapes["params"])


# ---- numpy reference: explicit loops over time and taps ----


def _np_conv(x, conv, dilation, padding):  # x [B, T, C_in]; v [k, C_in, C_out]
  v, g, b = conv["v"].astype(np.float64), conv["g"], conv["bias"]
  w = g * v / np.sqrt((v ** 2).sum(axis=(0, 1)))  # torch weight_norm, dim=0
  k = v.shape[0]
  left = (k - 1) * dilation if padding == "causal" else (k - 1) * dilation // 2
  out = np.zeros(x.shape[:2] + (v.shape[2],))
  for t in range(x.shape[1]):
    for j in range(k):
      s = t - left + j * dilation  # input frame under tap j
      if 0 <= s < x.shape[1]:
        out[:, t] += x[:, s] @ w[j]
  return out + b


def _np_prelu(x, p):
  return np.where(x >= 0, x, p["negative_slope"] * x)


def _np_tcn(params, x, padding, mask=None):
  keep = (lambda h: h) if mask is None else (lambda h: h * mask[..., None])
  x = x.astype(np.float64)
  for i in range(len(CHANNELS)):
    p = params[f"level_{i}"]
    x = keep(x)
    y = _np_prelu(_np_conv(x, p["conv1"], 2 ** i, padding), p["prelu1"])
    y = _np_prelu(_np_conv(keep(y), p["conv2"], 2 ** i, padding), p["prelu2"])
    res = x if "downsample" not in p else x @ p["downsample"]["kernel"] + p["downsample"]["bias"]
    x = _np_prelu(y + res, p["prelu_out"])
  return keep(x)


@pytest.mark.parametrize("padding", ["causal", "same"])
def test_tcn_matches_numpy_loops(padding):
  model, params = _init(padding)
  x = np.random.default_rng(1).normal(size=(2, T, D_IN)).astype(np.float32)
  y = model.apply({"params": params}, x)
  assert y.shape == (2, T, CHANNELS[-1]) and y.dtype == jnp.float32
  np.testing.assert_allclose(y, _np_tcn(params, x, padding), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("padding", ["causal", "same"])
def test_masked_tcn_matches_numpy_and_truncated_sequence(padding):
  model, params = _init(padding)
  x = np.random.default_rng(2).normal(size=(2, T, D_IN)).astype(np.float32)
  lengths = (T, 15)
  mask = (np.arange(T)[None] < np.array(lengths)[:, None]).astype(np.float32)
  y = np.asarray(model.apply({"params": params}, x, mask))
  np.testing.assert_allclose(y, _np_tcn(params, x, padding, mask), rtol=1e-4, atol=1e-5)
  # A padded segment ends exactly as the shorter sequence would.
  short = model.apply({"params": params}, x[1:, :lengths[1]])
  np.testing.assert_allclose(y[1, :lengths[1]], short[0], rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(y[1, lengths[1]:], 0)


@pytest.mark.parametrize("padding", ["causal", "same"])
def test_padded_frames_do_not_leak(padding):
  model, params = _init(padding)
  rng = np.random.default_rng(3)
  x = rng.normal(size=(2, T, D_IN)).astype(np.float32)
  mask = np.ones((2, T), np.float32)
  mask[0, 17:] = 0
  mask[1, 9:] = 0
  x_changed = np.where(mask[..., None] > 0, x, 1e3 * rng.normal(size=x.shape)).astype(np.float32)
  x_changed[1, -1] = np.nan  # whatever padding holds
  apply = jax.jit(lambda x: model.apply({"params": params}, x, mask))
  valid = mask.astype(bool)
  np.testing.assert_allclose(np.asarray(apply(x))[valid], np.asarray(apply(x_changed))[valid],
                             atol=1e-5)


def test_causal_output_ignores_the_future_and_same_does_not():
  rng = np.random.default_rng(4)
  x = rng.normal(size=(1, T, D_IN)).astype(np.float32)
  t0 = 10
  future = x.copy()
  future[:, t0 + 1:] += rng.normal(size=future[:, t0 + 1:].shape).astype(np.float32)
  for padding in ("causal", "same"):
    model, params = _init(padding)
    apply = jax.jit(lambda x: model.apply({"params": params}, x))
    y, y_future = np.asarray(apply(x)), np.asarray(apply(future))
    if padding == "causal":
      # Winograd tiles mix a few future frames in and cancel them exactly only in exact
      # arithmetic: what is left is float32 rounding.
      np.testing.assert_allclose(y[:, :t0 + 1], y_future[:, :t0 + 1],
                                 atol=1e-6 * np.abs(y).max())
    else:  # each 'same' conv looks (k-1)/2 * d frames ahead
      assert np.abs(y[:, t0] - y_future[:, t0]).min() > 1e-3 * np.abs(y).max()


def test_receptive_field_of_the_causal_tcn():
  # Output t depends on inputs back to t - 2 * (k-1) * sum_i 2^i, and no further.
  model, params = _init("causal")
  reach = 2 * (K - 1) * sum(2 ** i for i in range(len(CHANNELS)))  # 56 > T: use a long input
  x = np.random.default_rng(5).normal(size=(1, reach + 8, D_IN)).astype(np.float32)
  grad = np.abs(np.asarray(jax.jit(jax.grad(
      lambda x: model.apply({"params": params}, x)[0, -1].sum()))(x)[0])).max(-1)
  touched = np.nonzero(grad > 1e-6 * grad.max())[0]  # above float32 rounding
  assert touched.min() == x.shape[1] - 1 - reach
  assert touched.max() == x.shape[1] - 1


def test_init_matches_torch_weight_norm_and_prelu():
  model = tcn.TemporalConvNet((64,), K)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 8, 32)))
  p = nn.unbox(variables["params"])["level_0"]
  v = np.asarray(p["conv1"]["v"])
  assert v.shape == (K, 32, 64)
  assert abs(v.std() - 0.01) < 1e-3
  # g starts at ||v||, so the initial kernel is v itself.
  np.testing.assert_allclose(p["conv1"]["g"], np.sqrt((v ** 2).sum(axis=(0, 1))), rtol=1e-6)
  assert np.abs(np.asarray(p["conv1"]["bias"])).max() <= (32 * K) ** -0.5
  for name in ("prelu1", "prelu2", "prelu_out"):
    assert np.shape(p[name]["negative_slope"]) == ()
    assert float(p[name]["negative_slope"]) == pytest.approx(0.25)
  assert abs(np.asarray(p["downsample"]["kernel"]).std() - 0.01) < 1e-3
  specs = nn.get_partition_spec(variables["params"])["level_0"]
  assert tuple(specs["conv1"]["v"]) == (None, "channels_in", "channels")


def test_dropout_only_in_training_and_bf16_path():
  model = tcn.TemporalConvNet((8, 8), 3, dropout=0.5)
  x = jnp.asarray(np.random.default_rng(5).normal(size=(2, 12, 8)), jnp.float32)
  variables = model.init(jax.random.key(0), x)
  eval_y = model.apply(variables, x)
  np.testing.assert_array_equal(eval_y, model.apply(variables, x))
  train_y = model.apply(variables, x, train=True, rngs={"dropout": jax.random.key(1)})
  assert not np.allclose(eval_y, train_y)
  bf16 = tcn.TemporalConvNet((8, 8), 3, dtype=jnp.bfloat16)
  y = bf16.apply(variables, x)
  assert y.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(y, np.float32), eval_y, rtol=0.05, atol=0.05)


def test_unknown_padding_is_rejected():
  with pytest.raises(ValueError, match="padding"):
    tcn.TemporalConvNet((4,), padding="valid").init(jax.random.key(0), jnp.zeros((1, 4, 2)))
