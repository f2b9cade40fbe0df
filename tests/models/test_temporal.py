"""TemporalModel against a numpy port of the PyTorch reference (torch layout, torch's
TransformerEncoderLayer), the paper's parameter count, padding masks, presets, FrameMLP."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from affect_jax import sharding
from affect_jax.models import temporal
from configs import common

D_IN, T = 6, 12

# A small model in the torch reference's layout: TCN (8, 4) k5, width 8, 2 heads, 2 layers.
SMALL = dict(tcn_channels=(8, 4), kernel_size=5, d_model=8, num_layers=2, num_heads=2,
             ff_dim=16)
# The widths of configs/common.py's tiny preset.
TINY = dict(tcn_channels=(32, 16), d_model=32, num_layers=2, num_heads=2, ff_dim=64)


def tiny(out_dim, **overrides):
  return temporal.make_temporal_model(out_dim, **{**TINY, **overrides})


# ---- numpy port of the PyTorch reference, written against torch's parameter layout ----


def _np_conv1d(x, w, b, dilation, left):  # x [B, C_in, T], w [C_out, C_in, k] (torch)
  k = w.shape[2]
  t_len = x.shape[2]
  xp = np.concatenate([np.zeros(x.shape[:2] + (left,)), x], axis=2)
  out = np.zeros((x.shape[0], w.shape[0], t_len))
  for t in range(t_len):
    for j in range(k):
      out[:, :, t] += xp[:, :, t + j * dilation] @ w[:, :, j].T
  return out + b[:, None]


def _np_prelu(x, a):
  return np.where(x >= 0, x, a * x)


def _np_layer_norm(x, w, b, eps=1e-5):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * w + b


def _np_softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _np_mha(x, s, p, heads, key_mask):  # torch MultiheadAttention, batch first here
  b, t, d = x.shape
  hd = d // heads
  qkv = x @ s[f"{p}.in_proj_weight"].T + s[f"{p}.in_proj_bias"]
  q, k, v = (qkv[..., i * d:(i + 1) * d].reshape(b, t, heads, hd).transpose(0, 2, 1, 3)
             for i in range(3))
  logits = q @ k.transpose(0, 1, 3, 2) / np.sqrt(hd)  # [B, H, T, T]
  logits = np.where(key_mask[:, None, None, :], logits, -np.inf)
  out = (_np_softmax(logits) @ v).transpose(0, 2, 1, 3).reshape(b, t, d)
  return out @ s[f"{p}.out_proj.weight"].T + s[f"{p}.out_proj.bias"]


def _np_encoder_layer(x, s, p, heads, key_mask, norm_first=False):
  def ff(y):
    h = np.maximum(y @ s[f"{p}.linear1.weight"].T + s[f"{p}.linear1.bias"], 0)
    return h @ s[f"{p}.linear2.weight"].T + s[f"{p}.linear2.bias"]

  def norm(y, i):
    return _np_layer_norm(y, s[f"{p}.norm{i}.weight"], s[f"{p}.norm{i}.bias"])

  if norm_first:
    x = x + _np_mha(norm(x, 1), s, f"{p}.self_attn", heads, key_mask)
    return x + ff(norm(x, 2))
  x = norm(x + _np_mha(x, s, f"{p}.self_attn", heads, key_mask), 1)
  return norm(x + ff(x), 2)


def _np_reference_model(s, x, heads, key_mask):
  """The torch reference (eval) on [B, T, D], with a key-padding mask in the encoder."""
  y = x.transpose(0, 2, 1).astype(np.float64)  # [B, C, T]
  i = 0
  while f"tcn.{i}.c1.bias" in s:
    dil, p = 2 ** i, f"tcn.{i}"

    def conv(z, c):
      g = s[f"{p}.{c}.parametrizations.weight.original0"]
      v = s[f"{p}.{c}.parametrizations.weight.original1"]
      w = g * v / np.sqrt((v ** 2).sum(axis=(1, 2), keepdims=True))
      return _np_conv1d(z, w, s[f"{p}.{c}.bias"], dil, (w.shape[2] - 1) * dil)

    h = _np_prelu(conv(y, "c1"), s[f"{p}.a1.weight"])
    h = _np_prelu(conv(h, "c2"), s[f"{p}.a2.weight"])
    res = y if f"{p}.down.weight" not in s else _np_conv1d(
        y, s[f"{p}.down.weight"], s[f"{p}.down.bias"], 1, 0)
    y = _np_prelu(h + res, s[f"{p}.a.weight"])
    i += 1
  y = _np_conv1d(y, s["proj.weight"], s["proj.bias"], 1, 0).transpose(0, 2, 1)  # [B, T, d]
  l = 0
  while f"enc.layers.{l}.norm1.weight" in s:
    y = _np_encoder_layer(y, s, f"enc.layers.{l}", heads, key_mask)
    l += 1
  h = y @ s["head.0.weight"].T + s["head.0.bias"]
  h = (h - s["head.1.running_mean"]) / np.sqrt(s["head.1.running_var"] + 1e-5)
  h = h * s["head.1.weight"] + s["head.1.bias"]
  return h @ s["head.2.weight"].T + s["head.2.bias"]


def _torch_like_state_dict(rng, d_in, channels, k, d, layers, ff, out):
  """Random weights with the names and shapes of torch_temporal.AuthorsModel's state_dict."""
  def normal(*shape, scale=0.3):
    return (scale * rng.normal(size=shape)).astype(np.float32)

  s = {}
  widths = (d_in,) + tuple(channels)
  for i in range(len(channels)):
    cin, cout = widths[i], widths[i + 1]
    for c, ci in (("c1", cin), ("c2", cout)):
      s[f"tcn.{i}.{c}.bias"] = normal(cout, scale=0.1)
      s[f"tcn.{i}.{c}.parametrizations.weight.original0"] = np.abs(normal(cout, 1, 1)) + 0.5
      s[f"tcn.{i}.{c}.parametrizations.weight.original1"] = normal(cout, ci, k)
    for a in ("a1", "a2", "a"):
      s[f"tcn.{i}.{a}.weight"] = rng.uniform(0.05, 0.5, size=(1,)).astype(np.float32)
    if cin != cout:
      s[f"tcn.{i}.down.weight"] = normal(cout, cin, 1)
      s[f"tcn.{i}.down.bias"] = normal(cout, scale=0.1)
  s["proj.weight"], s["proj.bias"] = normal(d, channels[-1], 1), normal(d, scale=0.1)
  for l in range(layers):
    p = f"enc.layers.{l}"
    s[f"{p}.self_attn.in_proj_weight"] = normal(3 * d, d)
    s[f"{p}.self_attn.in_proj_bias"] = normal(3 * d, scale=0.1)
    s[f"{p}.self_attn.out_proj.weight"] = normal(d, d)
    s[f"{p}.self_attn.out_proj.bias"] = normal(d, scale=0.1)
    s[f"{p}.linear1.weight"], s[f"{p}.linear1.bias"] = normal(ff, d), normal(ff, scale=0.1)
    s[f"{p}.linear2.weight"], s[f"{p}.linear2.bias"] = normal(d, ff), normal(d, scale=0.1)
    for n in ("norm1", "norm2"):
      s[f"{p}.{n}.weight"] = 1 + normal(d, scale=0.1)
      s[f"{p}.{n}.bias"] = normal(d, scale=0.1)
  s["head.0.weight"], s["head.0.bias"] = normal(d // 2, d), normal(d // 2, scale=0.1)
  s["head.1.weight"], s["head.1.bias"] = 1 + normal(d // 2, scale=0.1), normal(d // 2)
  s["head.1.running_mean"] = normal(d // 2)
  s["head.1.running_var"] = rng.uniform(0.5, 2.0, size=d // 2).astype(np.float32)
  s["head.2.weight"], s["head.2.bias"] = normal(out, d // 2), normal(out, scale=0.1)
  return s


def _shapes(tree):
  return jax.tree.map(np.shape, nn.unbox(tree))


def _init(model, *args, seed=0):
  """Random variables of `model`'s shapes, away from every init value (so each one counts),
  drawn in numpy: compiling the initialisers costs more than these tests."""
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name, shape = path[-1].key, leaf.shape
    if name in ("scale", "g", "var"):
      return 1 + 0.2 * rng.uniform(-1, 1, shape)
    if name == "negative_slope":
      return rng.uniform(0.05, 0.5, shape)
    return 0.3 * rng.normal(size=shape)

  shapes = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), *args))
  return jax.tree_util.tree_map_with_path(
      lambda path, leaf: jnp.asarray(draw(path, leaf), leaf.dtype), shapes)


# ---- tests ----


@pytest.mark.parametrize("norm_first", [False, True])
def test_transformer_layer_matches_torch_formula(norm_first):
  rng = np.random.default_rng(0)
  d, heads, ff = 8, 2, 16
  s = _torch_like_state_dict(rng, D_IN, (4,), 5, d, 1, ff, 2)
  # Our layout from torch's, by hand (independently of params_from_torch_state_dict).
  p = "enc.layers.0"
  params = {
      "attn": {"qkv": {"kernel": s[f"{p}.self_attn.in_proj_weight"].T.reshape(d, 3, heads, -1),
                       "bias": s[f"{p}.self_attn.in_proj_bias"].reshape(3, heads, -1)},
               "out": {"kernel": s[f"{p}.self_attn.out_proj.weight"].T.reshape(heads, -1, d),
                       "bias": s[f"{p}.self_attn.out_proj.bias"]}},
      "ff": {"fc1": {"kernel": s[f"{p}.linear1.weight"].T, "bias": s[f"{p}.linear1.bias"]},
             "fc2": {"kernel": s[f"{p}.linear2.weight"].T, "bias": s[f"{p}.linear2.bias"]}},
      "norm1": {"scale": s[f"{p}.norm1.weight"], "bias": s[f"{p}.norm1.bias"]},
      "norm2": {"scale": s[f"{p}.norm2.weight"], "bias": s[f"{p}.norm2.bias"]},
  }
  x = rng.normal(size=(2, T, d)).astype(np.float32)
  key_mask = np.ones((2, T), bool)
  key_mask[1, 7:] = False
  layer = temporal.TransformerEncoderLayer(heads, ff, norm_first=norm_first)
  assert _shapes(jax.eval_shape(layer.init, jax.random.key(0), x, key_mask)["params"]) == \
      _shapes(params)
  y = layer.apply({"params": params}, x, key_mask)
  ref = _np_encoder_layer(x.astype(np.float64), s, p, heads, key_mask, norm_first)
  np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-5)


def test_params_from_torch_state_dict_gives_the_reference_function():
  rng = np.random.default_rng(1)
  s = _torch_like_state_dict(rng, D_IN, SMALL["tcn_channels"], 5, SMALL["d_model"],
                             SMALL["num_layers"], SMALL["ff_dim"], 3)
  variables = temporal.params_from_torch_state_dict(s, num_heads=SMALL["num_heads"])
  model = temporal.make_temporal_model(3, **SMALL)
  init = jax.eval_shape(model.init, jax.random.key(0), *temporal.example_inputs({"visual": D_IN}))
  assert _shapes(variables) == _shapes(init)

  x = rng.normal(size=(2, T, D_IN)).astype(np.float32)
  mask = np.ones((2, T), np.float32)
  apply = jax.jit(lambda x, mask: model.apply(variables, {"visual": x}, mask, train=False))
  y = apply(x, mask)
  ref = _np_reference_model(s, x, SMALL["num_heads"], mask.astype(bool))
  np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4)

  # Segments padded at the end: valid frames as the reference with a key-padding mask.
  mask[1, 8:] = 0
  y = apply(x, mask)
  ref = _np_reference_model(s, x, SMALL["num_heads"], mask.astype(bool))
  np.testing.assert_allclose(y[1, :8], ref[1, :8], rtol=1e-4, atol=1e-4)


def test_the_paper_config_is_the_released_model_with_its_parameter_count():
  model = temporal.from_config(common.get_temporal_config("VA", "paper").model, 2)
  assert model == temporal.TemporalModel(2)  # the module's defaults are the released model
  variables = jax.eval_shape(
      lambda: model.init(jax.random.key(0), *temporal.example_inputs({"visual": 768})))
  count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.unbox(variables["params"])))
  assert count == 20_511_371  # torch_temporal.AuthorsModel(out=2), g and v counted
  assert _shapes(variables["batch_stats"]) == {"head": {"bn": {"mean": (256,), "var": (256,)}}}
  assert model.modalities == ("visual",) and model.dropout == 0.0


# Padding must not leak through any path: causal and 'same' TCNs, the Transformer alone.
LEAK_CASES = [dict(), dict(tcn_padding="same", positional="sincos", norm_first=True),
              dict(use_tcn=False, modalities=("visual", "audio"), activation="gelu")]


@pytest.mark.parametrize("overrides", LEAK_CASES)
def test_padded_frames_do_not_leak_in_eval_or_training(overrides):
  dims = {"visual": D_IN, "audio": 3}
  model = tiny(2, dropout=0.1, **overrides)
  rng = np.random.default_rng(2)
  inputs = {m: rng.normal(size=(3, T, d)).astype(np.float32) for m, d in dims.items()}
  mask = np.ones((3, T), np.float32)
  mask[1, 9:] = 0
  mask[2, 4:] = 0
  changed = {m: np.where(mask[..., None] > 0, x, 1e3 * rng.normal(size=x.shape)).astype(
      np.float32) for m, x in inputs.items()}
  changed["visual"][2, -1] = np.nan  # whatever padding holds
  variables = _init(model, inputs, mask)
  valid = mask.astype(bool)

  @jax.jit
  def evaluate(inputs):
    return model.apply(variables, inputs, mask, train=False), None

  @jax.jit
  def train_step(inputs):
    y, updates = model.apply(variables, inputs, mask, train=True, mutable=["batch_stats"],
                             rngs={"dropout": jax.random.key(3)})
    return y, updates["batch_stats"]

  for train, run in ((False, evaluate), (True, train_step)):
    (y, stats), (y_changed, stats_changed) = run(inputs), run(changed)
    assert y.shape == (3, T, 2) and y.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(y)[valid], np.asarray(y_changed)[valid], atol=1e-5)
    if train:
      jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), stats,
                   stats_changed)


def test_batchnorm_statistics_are_over_real_frames_only():
  head = temporal.PredictionHead(hidden=4, out_dim=2)
  rng = np.random.default_rng(4)
  x = rng.normal(size=(2, 5, 8)).astype(np.float32)
  mask = np.array([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]], bool)
  variables = _init(head, x, mask)
  _, updates = head.apply(variables, x, mask, train=True, mutable=["batch_stats"])
  fc1 = variables["params"]["fc1"]
  h = (x @ np.asarray(fc1["kernel"]) + np.asarray(fc1["bias"]))[mask]  # [7, 4] real frames
  before, after = variables["batch_stats"]["bn"], updates["batch_stats"]["bn"]
  # torch's momentum 0.1; flax tracks the biased variance.
  np.testing.assert_allclose(after["mean"], 0.9 * before["mean"] + 0.1 * h.mean(0),
                             rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(after["var"], 0.9 * before["var"] + 0.1 * h.var(0),
                             rtol=1e-4, atol=1e-6)


def test_no_positional_encoding_means_order_free_without_the_tcn():
  # Without TCN and positions the model is permutation-equivariant over frames; sin-cos
  # positions break that. A check that 'none' really adds nothing.
  rng = np.random.default_rng(5)
  x = rng.normal(size=(1, T, D_IN)).astype(np.float32)
  perm = rng.permutation(T)
  for positional, equivariant in (("none", True), ("sincos", False)):
    model = tiny(2, use_tcn=False, positional=positional)
    variables = _init(model, {"visual": x})
    apply = jax.jit(lambda x: model.apply(variables, {"visual": x}))
    y, y_perm = np.asarray(apply(x)), np.asarray(apply(x[:, perm]))
    assert np.allclose(y[:, perm], y_perm, atol=1e-5) == equivariant


def test_ablation_switches_fusion_and_va_tanh():
  dims = {"visual": D_IN, "audio": 3}
  inputs, mask = temporal.example_inputs(dims, batch=2, length=T)
  inputs = {m: jnp.asarray(np.random.default_rng(6).normal(size=x.shape), jnp.float32) * 50
            for m, x in inputs.items()}

  def params(**overrides):
    model = tiny(2, **overrides)
    return model, nn.unbox(jax.eval_shape(model.init, jax.random.key(0), inputs, mask))[
        "params"]

  _, p = params(modalities=("visual", "audio"))
  assert {"tcn_visual", "tcn_audio", "encoder"} <= set(p)
  assert p["proj"]["kernel"].shape == (2 * 16, 32)  # fusion: concat of two 16-wide TCNs
  _, p = params(use_tcn=False)
  assert not any(k.startswith("tcn_") for k in p) and p["proj"]["kernel"].shape == (D_IN, 32)
  _, p = params(use_transformer=False)
  assert "encoder" not in p and "tcn_visual" in p
  plain, squashed = (tiny(2, va_tanh=t)
                     for t in (False, True))
  variables = _init(plain, inputs, mask)
  y_plain = jax.jit(plain.apply)(variables, inputs, mask)
  y = jax.jit(squashed.apply)(variables, inputs, mask)
  assert float(jnp.abs(y_plain).max()) > 1.0
  np.testing.assert_allclose(y, np.tanh(y_plain), rtol=1e-5, atol=1e-6)


def test_from_config_decodes_every_field_and_refuses_unknown_ones():
  model = common.get_temporal_config("AU", "tiny").model.to_dict()
  got = temporal.from_config(model, 12)
  assert (got.tcn_channels, got.d_model, got.num_layers, got.num_heads, got.ff_dim) == (
      (32, 16), 32, 2, 2, 64)
  model.update(modalities="visual,audio", dtype="bfloat16", dropout=0.25)
  got = temporal.from_config(model, 12)
  assert got.modalities == ("visual", "audio") and got.dtype == jnp.bfloat16 and got.dropout == 0.25
  model["kind"] = "frame_mlp"
  assert temporal.from_config(model, 8) == temporal.FrameMLP(
      8, hidden=64, dropout=0.25, modalities=("visual", "audio"), dtype=jnp.bfloat16)
  for bad, match in ((dict(kind="lstm"), "kind: unknown 'lstm'"),
                     (dict(d_modle=8), r"unknown fields \['d_modle'\]"),
                     (dict(out_dim=3), r"unknown fields \['out_dim'\]"),
                     (dict(preset="tiny"), "older affect-jax")):
    with pytest.raises(ValueError, match=match):
      temporal.from_config({**common.get_temporal_config("AU", "tiny").model, **bad}, 12)


def test_make_temporal_model_validates_its_arguments():
  with pytest.raises(ValueError, match="options"):
    tiny(2, layers=3)
  two = tiny(2, modalities=("visual", "audio"))
  frame = temporal.FrameMLP(2, modalities=("visual", "audio"))
  for model in (two, frame):
    with pytest.raises(ValueError, match=r"\['audio'\] are missing from its inputs"):
      jax.eval_shape(model.init, jax.random.key(0), *temporal.example_inputs({"visual": 4}))
  for option, value in (("activation", "swish"), ("positional", "learned"),
                        ("tcn_padding", "valid")):
    model = tiny(2, **{option: value})
    with pytest.raises(ValueError, match=option.split("_")[-1]):
      jax.eval_shape(model.init, jax.random.key(0), *temporal.example_inputs({"visual": 4}))
  paper = temporal.TemporalModel(2)
  assert (paper.tcn_channels, paper.d_model, paper.num_layers, paper.num_heads, paper.ff_dim,
          paper.tcn_padding) == ((768, 256, 128), 512, 8, 4, 512, "causal")


def test_logical_axis_names_map_onto_the_mesh():
  dims = {"visual": D_IN}
  model = tiny(12)
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0),
                                               *temporal.example_inputs(dims, batch=8)))
  specs = jax.tree.map(lambda s: tuple(s.spec), sharding.logical_shardings(
      abstract, sharding.make_mesh((2, 2, 2))), is_leaf=lambda s: hasattr(s, "spec"))
  layer = specs["params"]["encoder"]["layers_0"]
  assert layer["attn"]["qkv"]["kernel"] == ("fsdp", None, "model", None)
  assert layer["attn"]["out"]["kernel"] == ("model", None, "fsdp")
  assert layer["ff"]["fc1"]["kernel"] == ("fsdp", "model")
  assert specs["params"]["head"]["fc1"]["kernel"] == ("fsdp", "model")
  # The TCN's channel names have no rule: replicated.
  assert specs["params"]["tcn_visual"]["level_0"]["conv1"]["v"] == (None, None, None)


def test_training_gradients_are_finite_and_reach_the_tcn():
  model = tiny(12, num_layers=1)
  inputs = {"visual": jnp.asarray(np.random.default_rng(9).normal(size=(3, T, D_IN)),
                                  jnp.float32)}
  mask = jnp.ones((3, T)).at[2, 5:].set(0)
  variables = nn.unbox(_init(model, inputs, mask))

  @jax.jit
  def grad(params):
    def loss(params):
      y, updates = model.apply({**variables, "params": params}, inputs, mask, train=True,
                               mutable=["batch_stats"], rngs={"dropout": jax.random.key(1)})
      return jnp.sum(y ** 2 * mask[..., None]), updates
    return jax.grad(loss, has_aux=True)(params)[0]

  norms = jax.tree.map(lambda g: np.linalg.norm(np.asarray(g)), grad(variables["params"]))
  assert all(np.isfinite(n) for n in jax.tree.leaves(norms))
  assert norms["tcn_visual"]["level_0"]["conv1"]["v"] > 0


def test_frame_mlp_sees_one_frame_at_a_time():
  dims = {"visual": D_IN, "audio": 3}
  model = temporal.FrameMLP(8, hidden=16, modalities=("visual", "audio"))
  rng = np.random.default_rng(7)
  inputs = {m: rng.normal(size=(2, T, d)).astype(np.float32) for m, d in dims.items()}
  mask = np.ones((2, T), np.float32)
  variables = _init(model, inputs, mask)
  apply = jax.jit(lambda inputs: model.apply(variables, inputs, mask, train=False))
  y = apply(inputs)
  assert y.shape == (2, T, 8) and y.dtype == jnp.float32
  changed = {m: x.copy() for m, x in inputs.items()}
  changed["visual"][:, 5:] += 1.0
  y_changed = apply(changed)
  np.testing.assert_array_equal(y[:, :5], y_changed[:, :5])


def test_bf16_compute_stays_close_and_returns_float32():
  dims = {"visual": D_IN}
  inputs, mask = temporal.example_inputs(dims, batch=2, length=T)
  inputs = {"visual": jnp.asarray(np.random.default_rng(8).normal(size=(2, T, D_IN)),
                                  jnp.float32)}
  f32 = tiny(2)
  variables = _init(f32, inputs, mask)
  bf16 = tiny(2, dtype=jnp.bfloat16)
  y32 = jax.jit(f32.apply)(variables, inputs, mask)
  y16 = jax.jit(bf16.apply)(variables, inputs, mask)
  assert y16.dtype == jnp.float32
  np.testing.assert_allclose(y16, y32, rtol=0.1, atol=0.1)


def _authors_layout(s):
  """The reference's weights under the names upczww/abaw6's `Model` saves them (weight_norm's
  weight_g/_v, each TemporalBlock layer again under `net.N`, TransEncoder's `conv1`),
  through DataParallel (`module.`)."""
  out = {}
  for key, value in s.items():
    parts = key.split(".")
    if parts[0] == "tcn":
      level, layer, rest = parts[1], parts[2], parts[3:]
      name = {"c1": "conv1", "c2": "conv2", "a1": "relu1", "a2": "relu2", "a": "relu",
              "down": "downsample"}[layer]
      rest = {"parametrizations.weight.original0": "weight_g",
              "parametrizations.weight.original1": "weight_v"}.get(".".join(rest), ".".join(rest))
      out[f"temporal.network.{level}.{name}.{rest}"] = value
      net = {"conv1": 0, "relu1": 2, "conv2": 4, "relu2": 6}.get(name)
      if net is not None:
        out[f"temporal.network.{level}.net.{net}.{rest}"] = value.copy()
    elif parts[0] == "proj":
      out[f"encoder.conv1.{parts[1]}"] = value
    elif parts[0] == "enc":
      out["encoder.transformer_encoder." + ".".join(parts[1:])] = value
    else:
      out[key] = value
  out["head.1.num_batches_tracked"] = np.array(1234, np.int64)
  return {f"module.{k}": v for k, v in out.items()}


def test_the_authors_checkpoint_layout_loads_as_the_reference():
  rng = np.random.default_rng(3)
  s = _torch_like_state_dict(rng, D_IN, SMALL["tcn_channels"], 5, SMALL["d_model"],
                             SMALL["num_layers"], SMALL["ff_dim"], 8)
  authors = _authors_layout(s)
  assert len(authors) > len(s) and any(".net.4.weight_v" in k for k in authors)
  got = temporal.params_from_torch_state_dict(authors, num_heads=SMALL["num_heads"])
  want = temporal.params_from_torch_state_dict(s, num_heads=SMALL["num_heads"])
  assert jax.tree.structure(got) == jax.tree.structure(want)
  jax.tree.map(np.testing.assert_array_equal, got, want)
  # Their twin tensors must agree: an edited copy is refused, never one of them picked.
  edited = dict(authors)
  edited["module.temporal.network.1.net.0.weight_v"] = edited[
      "module.temporal.network.1.net.0.weight_v"] + 1
  with pytest.raises(ValueError, match=r"temporal.network.1.net.0.weight_v and "
                     r"temporal.network.1.conv1.weight_v are the same tensor"):
    temporal.params_from_torch_state_dict(edited, num_heads=SMALL["num_heads"])
  with pytest.raises(ValueError, match=r"1 tensors of the authors' layout have no place in the "
                     r"model: \['temporal.network.0.attention.weight'\]"):
    temporal.params_from_torch_state_dict(
        {**authors, "module.temporal.network.0.attention.weight": np.ones(3)},
        num_heads=SMALL["num_heads"])


def test_a_state_dict_of_another_layout_is_never_half_read():
  rng = np.random.default_rng(2)
  s = _torch_like_state_dict(rng, D_IN, SMALL["tcn_channels"], 5, SMALL["d_model"],
                             SMALL["num_layers"], SMALL["ff_dim"], 3)
  # The TCN's names half changed to the authors' (their levels, the reference's convs).
  renamed = {k.replace("tcn.", "temporal.network.", 1): v for k, v in s.items()}
  with pytest.raises(ValueError, match=r"tensors of the authors' layout have no place in the "
                     r"model: \['enc.layers.0.linear1.bias'"):
    temporal.params_from_torch_state_dict(renamed, num_heads=SMALL["num_heads"])
  no_tcn = {k: v for k, v in s.items() if not k.startswith("tcn.")}
  with pytest.raises(ValueError, match=r"0 TCN levels \('tcn.N.'\) and 2 Transformer layers"):
    temporal.params_from_torch_state_dict(no_tcn, num_heads=SMALL["num_heads"])
  with pytest.raises(ValueError, match=r"1 tensors of the state dict have no place in the model: "
                     r"\['head.3.weight'\]"):
    temporal.params_from_torch_state_dict({**s, "head.3.weight": np.ones(2)},
                                          num_heads=SMALL["num_heads"])
  del s["proj.bias"]
  with pytest.raises(ValueError, match="the state dict has no 'proj.bias'"):
    temporal.params_from_torch_state_dict(s, num_heads=SMALL["num_heads"])
