"""timm/MAE state dicts -> our params, checked against a numpy ViT written from the state dict."""

import logging
import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

from affect_jax.models import convert, mae, vit

P, D, DEPTH, HEADS, MLP = 4, 32, 2, 4, 64  # encoder
DD, DDEPTH, DHEADS, DMLP = 16, 1, 2, 32  # decoder
IMG = 16
GRID = IMG // P
ENCODER = dict(patch_size=P, width=D, depth=DEPTH, num_heads=HEADS, mlp_dim=MLP)
DECODER = dict(decoder_width=DD, decoder_depth=DDEPTH, decoder_num_heads=DHEADS,
               decoder_mlp_dim=DMLP)


def _blocks(rng, prefix, depth, d, mlp):
  state = {}
  for i in range(depth):
    b = f"{prefix}.{i}."
    state.update({
        b + "norm1.weight": 1 + 0.1 * rng.normal(size=d),
        b + "norm1.bias": 0.1 * rng.normal(size=d),
        b + "attn.qkv.weight": rng.normal(size=(3 * d, d)) / d**0.5,
        b + "attn.qkv.bias": 0.1 * rng.normal(size=3 * d),
        b + "attn.proj.weight": rng.normal(size=(d, d)) / d**0.5,
        b + "attn.proj.bias": 0.1 * rng.normal(size=d),
        b + "norm2.weight": 1 + 0.1 * rng.normal(size=d),
        b + "norm2.bias": 0.1 * rng.normal(size=d),
        b + "mlp.fc1.weight": rng.normal(size=(mlp, d)) / d**0.5,
        b + "mlp.fc1.bias": 0.1 * rng.normal(size=mlp),
        b + "mlp.fc2.weight": rng.normal(size=(d, mlp)) / mlp**0.5,
        b + "mlp.fc2.bias": 0.1 * rng.normal(size=d),
    })
  return state


def _timm_state(kind, seed=0):
  """A random state dict with exactly the timm / MAE names and shapes."""
  rng = np.random.default_rng(seed)
  state = {
      "cls_token": 0.02 * rng.normal(size=(1, 1, D)),
      "pos_embed": vit.sincos_pos_embed_2d(D, (GRID, GRID))[None],
      "patch_embed.proj.weight": rng.normal(size=(D, 3, P, P)) / (3 * P * P)**0.5,
      "patch_embed.proj.bias": 0.1 * rng.normal(size=D),
      **_blocks(rng, "blocks", DEPTH, D, MLP),
  }
  norm = "fc_norm" if kind == "vit_mean" else "norm"
  state[f"{norm}.weight"] = 1 + 0.1 * rng.normal(size=D)
  state[f"{norm}.bias"] = 0.1 * rng.normal(size=D)
  if kind == "vit_mean":
    state["head.weight"] = rng.normal(size=(5, D)) / D**0.5
    state["head.bias"] = 0.1 * rng.normal(size=5)
  if kind == "mae":
    state.update({
        "mask_token": 0.02 * rng.normal(size=(1, 1, DD)),
        "decoder_pos_embed": vit.sincos_pos_embed_2d(DD, (GRID, GRID))[None],
        "decoder_embed.weight": rng.normal(size=(DD, D)) / D**0.5,
        "decoder_embed.bias": 0.1 * rng.normal(size=DD),
        **_blocks(rng, "decoder_blocks", DDEPTH, DD, DMLP),
        "decoder_norm.weight": 1 + 0.1 * rng.normal(size=DD),
        "decoder_norm.bias": 0.1 * rng.normal(size=DD),
        "decoder_pred.weight": rng.normal(size=(P * P * 3, DD)) / DD**0.5,
        "decoder_pred.bias": 0.1 * rng.normal(size=P * P * 3),
    })
  return {k: np.asarray(v, np.float32) for k, v in state.items()}


# ---- An independent numpy ViT, read straight off the torch state dict ----

_erf = np.vectorize(math.erf)


def _layer_norm(x, s, prefix):
  mean = x.mean(-1, keepdims=True)
  var = x.var(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + 1e-6) * s[prefix + ".weight"] + s[prefix + ".bias"]


def _linear(x, s, prefix):
  return x @ s[prefix + ".weight"].T + s[prefix + ".bias"]


def _block(x, s, prefix, heads):
  b, n, d = x.shape
  h = _layer_norm(x, s, prefix + ".norm1")
  qkv = _linear(h, s, prefix + ".attn.qkv").reshape(b, n, 3, heads, d // heads)
  q, k, v = qkv.transpose(2, 0, 3, 1, 4)  # [B, H, N, hd] each
  logits = q @ k.transpose(0, 1, 3, 2) / math.sqrt(d // heads)
  attn = np.exp(logits - logits.max(-1, keepdims=True))
  attn /= attn.sum(-1, keepdims=True)
  x = x + _linear((attn @ v).transpose(0, 2, 1, 3).reshape(b, n, d), s, prefix + ".attn.proj")
  h = _linear(_layer_norm(x, s, prefix + ".norm2"), s, prefix + ".mlp.fc1")
  h = 0.5 * h * (1 + _erf(h / math.sqrt(2)))  # torch nn.GELU(): exact
  return x + _linear(h, s, prefix + ".mlp.fc2")


def _np_tokens(imgs_nhwc, s):
  """Patch embedding as torch's conv on NCHW, + positions, CLS first: [B, 1 + N, D]."""
  x = imgs_nhwc.transpose(0, 3, 1, 2)
  b = x.shape[0]
  x = x.reshape(b, 3, GRID, P, GRID, P).transpose(0, 2, 4, 1, 3, 5).reshape(b, GRID**2, -1)
  x = x @ s["patch_embed.proj.weight"].reshape(D, -1).T + s["patch_embed.proj.bias"]
  x = x + s["pos_embed"][:, 1:]
  cls = np.broadcast_to(s["cls_token"] + s["pos_embed"][:, :1], (b, 1, D))
  return np.concatenate([cls, x], 1)


def _np_encoder(x, s):
  for i in range(DEPTH):
    x = _block(x, s, f"blocks.{i}", HEADS)
  return x


def _np_vit(imgs, s, pool):
  x = _np_encoder(_np_tokens(imgs, s), s)
  if pool == "cls":
    return _layer_norm(x, s, "norm")[:, 0]
  return _linear(_layer_norm(x[:, 1:].mean(1), s, "fc_norm"), s, "head")


def _np_mae_pred(imgs, s, mask):
  """MAE prediction for a given mask: the encoder sees the kept patches in grid order."""
  tokens = _np_tokens(imgs, s)
  preds = []
  for b in range(imgs.shape[0]):
    kept = np.concatenate([[0], 1 + np.flatnonzero(mask[b] == 0)])
    x = _layer_norm(_np_encoder(tokens[b:b + 1, kept], s), s, "norm")
    x = _linear(x, s, "decoder_embed")
    y = np.broadcast_to(s["mask_token"], (1, 1 + GRID**2, DD)).copy()
    y[:, kept] = x
    y = y + s["decoder_pos_embed"]
    for i in range(DDEPTH):
      y = _block(y, s, f"decoder_blocks.{i}", DHEADS)
    preds.append(_linear(_layer_norm(y, s, "decoder_norm"), s, "decoder_pred")[:, 1:])
  return np.concatenate(preds)



@pytest.fixture(scope="module")
def imgs():
  return np.random.default_rng(1).normal(size=(2, IMG, IMG, 3)).astype(np.float32)


@pytest.mark.parametrize("pool,kind,num_classes,scan", [("cls", "vit_cls", 0, False),
                                                        ("mean", "vit_mean", 5, True)])
def test_vit_checkpoint_matches_numpy_forward(tmp_path, imgs, pool, kind, num_classes, scan):
  state = _timm_state(kind)
  path = str(tmp_path / "vit.safetensors")
  safetensors.numpy.save_file(state, path)
  # scan_layers: the same torch keys land stacked in the model's `blocks`.
  model = vit.VisionTransformer(**ENCODER, pool=pool, num_classes=num_classes, scan_layers=scan)
  params = convert.convert_timm_state_dict(convert.load_state_dict(path),
                                           convert.params_shapes(model))
  out = jax.jit(model.apply)({"params": params}, jnp.asarray(imgs))
  np.testing.assert_allclose(out, _np_vit(imgs.astype(np.float64), state, pool),
                             rtol=1e-4, atol=1e-4)


def test_mae_checkpoint_matches_numpy_forward(tmp_path, imgs):
  state = _timm_state("mae")
  path = str(tmp_path / "mae.npz")
  np.savez(path, **state)
  model = mae.MaskedAutoencoder(**ENCODER, **DECODER, scan_layers=True)
  params = convert.convert_timm_state_dict(convert.load_state_dict(path),
                                           convert.params_shapes(model))
  assert "blocks" in params["encoder"] and "blocks" in params["decoder"]
  loss, pred, mask = jax.jit(lambda p, x: model.apply(
      {"params": p}, x, train=False, rngs={"masking": jax.random.key(0)}))(params, imgs)
  ref = _np_mae_pred(imgs.astype(np.float64), state, np.asarray(mask))
  np.testing.assert_allclose(pred, ref, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(loss, mae.mae_loss(ref, vit.patchify(imgs, P), mask), rtol=1e-4)


def test_mismatches_are_listed_in_one_error():
  state = _timm_state("vit_cls")
  del state["blocks.1.mlp.fc2.bias"]
  state["blocks.0.attn.q_norm.weight"] = np.ones(D, np.float32)
  state["blocks.0.mlp.fc1.weight"] = np.ones((MLP + 1, D), np.float32)
  model = vit.VisionTransformer(**ENCODER)
  with pytest.raises(ValueError) as error:
    convert.convert_timm_state_dict(state, convert.params_shapes(model))
  message = str(error.value)
  assert "missing (1):\n  blocks.1.mlp.fc2.bias" in message
  assert "unexpected (1):\n  blocks.0.attn.q_norm.weight" in message
  assert f"blocks.0.mlp.fc1.weight: checkpoint ({MLP + 1}, {D}), expected ({MLP}, {D})" in message


def test_a_learned_position_table_is_never_dropped():
  # A timm ViT's learned table into a model with MAE's fixed one: an error naming the fix.
  state = _timm_state("vit_cls")
  state["pos_embed"] = state["pos_embed"] + 0.5
  with pytest.raises(ValueError) as error:
    convert.convert_timm_state_dict(state, convert.params_shapes(vit.VisionTransformer(**ENCODER)))
  assert (f"position table (1):\n  pos_embed (1, {1 + GRID**2}, {D}) is a learned table, not "
          "MAE's fixed 2-D sin-cos one: convert with --pos_embed=learned") in str(error.value)


def _learned_state(grid=GRID, seed=3):
  state = _timm_state("vit_cls")
  state["pos_embed"] = (0.5 * np.random.default_rng(seed).normal(
      size=(1, 1 + grid**2, D))).astype(np.float32)
  return state


def test_learned_position_table_checkpoint_matches_numpy_forward(tmp_path, imgs):
  state = _learned_state()
  path = str(tmp_path / "timm_vit.safetensors")
  safetensors.numpy.save_file(state, path)
  # Detected from the table ('auto'), for the checkpoint's own grid.
  params = convert.convert_checkpoint(path, "vit", "tiny", **ENCODER)
  np.testing.assert_array_equal(params["pos_embed"], state["pos_embed"])
  model = vit.VisionTransformer(**ENCODER, pos_embed="learned")
  out = jax.jit(model.apply)({"params": params}, jnp.asarray(imgs))
  np.testing.assert_allclose(out, _np_vit(imgs.astype(np.float64), state, "cls"),
                             rtol=1e-4, atol=1e-4)
  with pytest.raises(ValueError, match="a learned position table of 16 patches for 6x6"):
    model.apply({"params": params}, jnp.zeros((1, 6 * P, 6 * P, 3)))
  # Exported back, it is the checkpoint again.
  back = convert.export_timm_state_dict(params)
  np.testing.assert_array_equal(back["pos_embed"], state["pos_embed"])


def test_learned_position_table_is_resampled_to_the_image_size(tmp_path):
  state = _learned_state(grid=3)
  path = str(tmp_path / "timm_vit.npz")
  np.savez(path, **state)
  params = convert.convert_checkpoint(path, "vit", "tiny", image_size=IMG, **ENCODER)
  want = vit.resample_pos_embed(state["pos_embed"][0], (GRID, GRID))
  np.testing.assert_allclose(params["pos_embed"][0], want, rtol=1e-6)
  np.testing.assert_array_equal(params["pos_embed"][0, 0], state["pos_embed"][0, 0])  # CLS kept


def test_bicubic_resampling_is_torchs():
  # torch: F.interpolate(tensor([[[[0., 1.]]]]), size=(1, 4), mode='bicubic',
  # align_corners=False) -> [-0.10546875, 0.2265625, 0.7734375, 1.10546875], worked by hand
  # from Keys' kernel with a = -0.75 and clamped taps.
  w = vit._cubic_weights(2, 4)
  np.testing.assert_allclose(w @ np.array([0.0, 1.0]), [-0.10546875, 0.2265625, 0.7734375, 1.10546875])
  np.testing.assert_allclose(w.sum(1), 1.0)
  table = np.random.default_rng(0).normal(size=(1 + 9, 8)).astype(np.float32)
  np.testing.assert_array_equal(vit.resample_pos_embed(table, (3, 3)), table)  # same grid
  # A table constant over the grid stays constant; rows and columns resample separably.
  const = np.concatenate([table[:1], np.tile(table[1:2], (9, 1))])
  np.testing.assert_allclose(vit.resample_pos_embed(const, (5, 5))[1:], np.tile(table[1:2], (25, 1)),
                             rtol=1e-6)
  out = vit.resample_pos_embed(table, (5, 4))[1:].reshape(5, 4, 8)
  want = np.einsum("ih,jw,hwd->ijd", vit._cubic_weights(3, 5), vit._cubic_weights(3, 4),
                   table[1:].reshape(3, 3, 8))
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)


def test_learned_table_and_encoder_loading_must_agree():
  learned = vit.VisionTransformer(**ENCODER, pos_embed="learned", num_classes=3)
  fixed = vit.VisionTransformer(**ENCODER, num_classes=3)
  imgs = jnp.zeros((1, IMG, IMG, 3))
  p_learned = nn.unbox(learned.init(jax.random.key(0), imgs)["params"])
  p_fixed = nn.unbox(fixed.init(jax.random.key(1), imgs)["params"])
  loaded = vit.load_mae_encoder(p_learned, {**p_fixed, "pos_embed": p_learned["pos_embed"] + 1})
  np.testing.assert_array_equal(loaded["pos_embed"], p_learned["pos_embed"] + 1)
  with pytest.raises(ValueError, match="set config.model.pos_embed='learned'"):
    vit.load_mae_encoder(p_fixed, p_learned)
  with pytest.raises(ValueError, match="the weights do not"):
    vit.load_mae_encoder(p_learned, p_fixed)


def test_convert_checkpoint_and_save_round_trip(tmp_path):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  state = _timm_state("vit_cls")
  path = str(tmp_path / "vit.safetensors")
  safetensors.numpy.save_file(state, path)
  params = convert.convert_checkpoint(path, "vit", "tiny", **ENCODER)
  convert.save_params(params, str(tmp_path / "params"))
  restored = ocp.StandardCheckpointer().restore(str(tmp_path / "params"))
  jax.tree.map(np.testing.assert_array_equal, restored, params)
  np.testing.assert_array_equal(
      restored["encoder"]["blocks_0"]["attn"]["qkv"]["kernel"],
      state["blocks.0.attn.qkv.weight"].T.reshape(D, 3, HEADS, D // HEADS))


@pytest.mark.parametrize("kind", ["mae", "vit_mean"])
def test_export_is_the_converters_inverse(kind):
  """Our params -> timm names and layouts -> our params again, bit for bit; and the export
  of a converted state dict is that state dict (position tables added back as MAE has them)."""
  state = _timm_state(kind)
  if kind == "mae":
    model = mae.MaskedAutoencoder(**ENCODER, **DECODER)
  else:
    model = vit.VisionTransformer(**ENCODER, pool="mean", num_classes=5)
  params = convert.convert_timm_state_dict(state, convert.params_shapes(model))
  exported = convert.add_position_tables(convert.export_timm_state_dict(params), IMG, P)
  assert set(exported) == set(state)
  for name, value in state.items():
    np.testing.assert_allclose(exported[name], value, atol=1e-6, err_msg=name)
  again = convert.convert_timm_state_dict(exported, convert.params_shapes(model))
  jax.tree.map(np.testing.assert_array_equal, again, params)
  # From the scanned layout too.
  np.testing.assert_array_equal(
      convert.export_timm_state_dict(vit.stack_blocks(params))["blocks.1.mlp.fc1.weight"],
      state["blocks.1.mlp.fc1.weight"])


class _WritesMarker:
  """A pickle that, if ever unpickled, creates the file `marker`."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return open, (self.marker, "w")


def _broken_weight_files(tmp_path):
  """{file name: (bytes, expected message fragment)} of files that are not what they claim."""
  import pickle
  good = str(tmp_path / "good.safetensors")
  safetensors.numpy.save_file({"cls_token": np.ones((1, 1, D), np.float32)}, good)
  st = open(good, "rb").read()
  np.savez(tmp_path / "good.npz", cls_token=np.ones((1, 1, D), np.float32))
  npz = (tmp_path / "good.npz").read_bytes()
  payload = pickle.dumps(_WritesMarker(str(tmp_path / "pwned")))
  bad_st, bad_npz = "not a readable safetensors file", "not a readable npz file"
  return {
      "x.safetensors": (np.random.default_rng(0).bytes(4096),
                        f"{bad_st} (Error while deserializing header: header too large)"),
      "empty.safetensors": (b"", f"{bad_st} (Error while deserializing header: header too small)"),
      "cut.safetensors": (st[:len(st) // 2], bad_st),
      "x.npz": (np.random.default_rng(0).bytes(4096), f"{bad_npz} (not a zip archive)"),
      "empty.npz": (b"", f"{bad_npz} (not a zip archive)"),
      "cut.npz": (npz[:len(npz) // 2], f"{bad_npz} (not a zip archive)"),
      "pickle.npz": (payload, f"{bad_npz} (not a zip archive)"),
      "model.pth": (payload, "not a torch.save zip archive"),  # a bare pickle: never unpickled
  }


def test_unreadable_weight_files_are_named_and_never_unpickled(tmp_path):
  for name, (data, fragment) in _broken_weight_files(tmp_path).items():
    path = str(tmp_path / name)
    with open(path, "wb") as f:
      f.write(data)
    with pytest.raises(ValueError) as error:
      convert.load_state_dict(path)
    assert str(error.value).startswith(f"{path}: {fragment}"), str(error.value)
    assert "expected" in str(error.value)
  obj = str(tmp_path / "objects.npz")
  np.savez(obj, cls_token=np.array([_WritesMarker(str(tmp_path / "pwned"))], dtype=object))
  with pytest.raises(ValueError, match="not a readable npz file .*Object arrays"):
    convert.load_state_dict(obj)
  assert not (tmp_path / "pwned").exists()
  with pytest.raises(FileNotFoundError, match="missing.safetensors: no such weight file"):
    convert.load_state_dict(str(tmp_path / "missing.safetensors"))


# ---- Hugging Face layouts: written here from the timm names (the inverse direction) ----

_TO_HF_LAYER = {"attn.proj": "attention.output.dense", "mlp.fc1": "intermediate.dense",
                "mlp.fc2": "output.dense", "norm1": "layernorm_before", "norm2": "layernorm_after"}


def _hugging_face(state, prefix="vit."):
  out = {}
  for k, v in state.items():
    m = re.match(r"^(blocks|decoder_blocks)\.(\d+)\.(.+)\.(weight|bias)$", k)
    if m:
      layer = (f"{prefix}encoder.layer.{m[2]}" if m[1] == "blocks"
               else f"decoder.decoder_layers.{m[2]}")
      if m[3] == "attn.qkv":
        for name, part in zip(("query", "key", "value"), np.split(v, 3)):
          out[f"{layer}.attention.attention.{name}.{m[4]}"] = part
      else:
        out[f"{layer}.{_TO_HF_LAYER[m[3]]}.{m[4]}"] = v
      continue
    top = {"cls_token": f"{prefix}embeddings.cls_token",
           "pos_embed": f"{prefix}embeddings.position_embeddings",
           "patch_embed.proj.weight": f"{prefix}embeddings.patch_embeddings.projection.weight",
           "patch_embed.proj.bias": f"{prefix}embeddings.patch_embeddings.projection.bias",
           "norm.weight": f"{prefix}layernorm.weight", "norm.bias": f"{prefix}layernorm.bias",
           "mask_token": "decoder.mask_token", "decoder_pos_embed": "decoder.decoder_pos_embed"}
    out[top.get(k, k.replace("decoder_", "decoder.decoder_", 1) if k.startswith("decoder_") else k)] = v
  return out


@pytest.mark.parametrize("kind,model,layout", [
    ("vit_cls", "vit", "Hugging Face ViT"), ("mae", "mae", "Hugging Face ViTMAE")])
def test_hugging_face_layouts_convert_like_timm(tmp_path, kind, model, layout, caplog):
  state = _learned_state() if kind == "vit_cls" else _timm_state("mae")
  hf = _hugging_face(state)
  assert any(".attention.attention.query.weight" in k for k in hf) and "blocks.0.norm1.weight" not in hf
  assert convert.detect_layout(hf) == layout
  safetensors.numpy.save_file(state, str(tmp_path / "timm.safetensors"))
  safetensors.numpy.save_file(hf, str(tmp_path / "model.safetensors"))
  kw = dict(ENCODER, **(DECODER if model == "mae" else {}))
  want = convert.convert_checkpoint(str(tmp_path / "timm.safetensors"), model, "tiny", **kw)
  with caplog.at_level(logging.INFO, logger="absl"):
    got = convert.convert_checkpoint(str(tmp_path / "model.safetensors"), model, "tiny", **kw)
  assert f"in the {layout} layout" in caplog.text
  jax.tree.map(np.testing.assert_array_equal, got, want)


def test_a_full_mae_checkpoint_as_a_vit_takes_its_encoder(tmp_path, imgs, caplog):
  state = _timm_state("mae")
  safetensors.numpy.save_file(state, str(tmp_path / "mae.safetensors"))
  with caplog.at_level(logging.INFO, logger="absl"):
    params = convert.convert_checkpoint(str(tmp_path / "mae.safetensors"), "vit", "tiny", **ENCODER)
  assert "a full MAE checkpoint: converting its encoder" in caplog.text
  out = vit.VisionTransformer(**ENCODER).apply({"params": params}, jnp.asarray(imgs))
  np.testing.assert_allclose(out, _np_vit(imgs.astype(np.float64), state, "cls"), rtol=1e-4, atol=1e-4)


def test_errors_are_short_and_name_the_layout(tmp_path):
  state = {f"layer{i}.weight": np.ones(2, np.float32) for i in range(40)}
  safetensors.numpy.save_file(state, str(tmp_path / "other.safetensors"))
  with pytest.raises(ValueError) as error:
    convert.convert_checkpoint(str(tmp_path / "other.safetensors"), "vit", "tiny", **ENCODER)
  message = str(error.value)
  assert message.startswith(f"{tmp_path / 'other.safetensors'} (timm / facebookresearch/mae layout): "
                            "The checkpoint does not match the model.")
  assert "unexpected (40):" in message and "  ... and 35 more" in message
  assert "another layout: timm / facebookresearch/mae, Hugging Face ViT, Hugging Face ViTMAE" in message
  assert len(message.splitlines()) < 20
