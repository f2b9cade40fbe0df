"""Public PyTorch MAE / timm ViT checkpoints -> our params.

The state dict (torch names, numpy arrays; read from .safetensors, .npz or a torch.save
archive without torch, `torch_pickle`) maps one to one
onto `MaskedAutoencoder` or `VisionTransformer` params:

  cls_token, mask_token                       -> same                       [1, 1, D]
  patch_embed.proj.weight [D, C, p, p]        -> patch_embed/proj/kernel    [p*p*C, D]
  blocks.{i}.attn.qkv.weight [3D, D]          -> encoder/blocks_{i}/attn/qkv/kernel [D, 3, H, hd]
  blocks.{i}.attn.proj.weight [D, D]          -> .../attn/proj/kernel       [H, hd, D]
  blocks.{i}.{norm1,norm2}.{weight,bias}      -> .../{norm1,norm2}/{scale,bias}
  blocks.{i}.mlp.{fc1,fc2}.{weight,bias}      -> .../mlp/{fc1,fc2}/{kernel,bias}
  norm.*, fc_norm.*, head.*                   -> encoder/norm, fc_norm, head
  decoder_embed.*, decoder_pred.*             -> same
  decoder_blocks.{i}.*, decoder_norm.*        -> decoder/blocks_{i}/..., decoder/norm

torch Linear weights are [out, in]; our kernels are [in..., out...]. MAE's `pos_embed` and
`decoder_pos_embed` are fixed sin-cos tables, not params: they are checked equal to ours. A
learned `pos_embed` (timm's supervised ViTs) loads into a VisionTransformer with
`pos_embed='learned'`, resampled (bicubic, as timm) to the model's grid; into a sin-cos model
it is an error, never dropped: no checkpoint tensor is ignored.
"""

import os
import re
from typing import Any
import zipfile

from absl import logging
import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy

from affect_jax import fileio
from affect_jax.models import mae as mae_lib
from affect_jax.models import torch_pickle
from affect_jax.models import vit

# Fixed (not learned) in our models; checked, not loaded.
POSITION_KEYS = {"pos_embed": "width", "decoder_pos_embed": "decoder_width"}
SHOWN = 5  # keys of each kind an error lists
LAYOUTS = ("timm / facebookresearch/mae", "Hugging Face ViT", "Hugging Face ViTMAE")
DECODER_PREFIXES = ("decoder_", "mask_token")

# Hugging Face transformers' ViT / ViTMAE names -> timm's (one layer's part, then the rest).
_HF_LAYER = {
    "attention.output.dense": "attn.proj", "intermediate.dense": "mlp.fc1",
    "output.dense": "mlp.fc2", "layernorm_before": "norm1", "layernorm_after": "norm2",
}
_HF_TOP = {
    "embeddings.cls_token": "cls_token", "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight", "layernorm.bias": "norm.bias",
    "classifier.weight": "head.weight", "classifier.bias": "head.bias",
    "decoder.mask_token": "mask_token", "decoder.decoder_pos_embed": "decoder_pos_embed",
    **{f"decoder.decoder_{part}.{kind}": f"decoder_{part}.{kind}"
       for part in ("embed", "norm", "pred") for kind in ("weight", "bias")},
}


_EXPECTED = {
    "safetensors": "a state dict saved by safetensors (safetensors.torch.save_file): "
                   "download or export it again",
    "npz": "a numpy.savez archive of {torch name: array} without object arrays: "
           "export it again",
}


TORCH_EXTS = (".pth", ".pt", ".bin", ".ckpt")
# Where training scripts nest the weights in what they torch.save (facebookresearch/mae:
# {'model': ...}; Lightning: {'state_dict': ...}).
NESTED_KEYS = ("model", "state_dict", "module")


def _state_dict_of(obj, path: str) -> dict[str, np.ndarray]:
  """The flat {name: array} inside a loaded torch object (unwrapping NESTED_KEYS, said in
  the log; DataParallel's 'module.' prefix stripped)."""
  while isinstance(obj, dict) and not any(isinstance(v, np.ndarray) for v in obj.values()):
    key = next((k for k in NESTED_KEYS if isinstance(obj.get(k), dict)), None)
    if key is None:
      raise ValueError(f"{path}: no state dict inside (top-level keys: {sorted(map(str, obj))[:8]})")
    logging.info("%s: reading the state dict under %r", path, key)
    obj = obj[key]
  if not isinstance(obj, dict):
    raise ValueError(f"{path}: holds a {type(obj).__name__}, not a state dict")
  other = sorted(str(k) for k, v in obj.items() if not isinstance(v, np.ndarray))
  if other:
    raise ValueError(f"{path}: {len(other)} entries that are not tensors: {other[:5]}")
  if obj and all(str(k).startswith("module.") for k in obj):
    obj = {str(k)[len("module."):]: v for k, v in obj.items()}
  return {str(k): v for k, v in obj.items()}


def load_state_dict(path: str) -> dict[str, np.ndarray]:
  """Reads a flat {torch name: array} dict from .safetensors, .npz, or a torch.save archive
  (.pth/.pt/.bin/.ckpt, through `torch_pickle`: tensors and dicts only, no code runs)."""
  if not path.endswith((".safetensors", ".npz", *TORCH_EXTS)):
    raise ValueError(f"{path}: expected a .safetensors, .npz or PyTorch "
                     f"({'/'.join(TORCH_EXTS)}) state dict")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no such weight file")
  if path.endswith(TORCH_EXTS):
    return _state_dict_of(torch_pickle.load(path), path)
  kind = "safetensors" if path.endswith(".safetensors") else "npz"
  try:
    if kind == "safetensors":
      return dict(safetensors.numpy.load_file(path))
    if not zipfile.is_zipfile(path):
      raise ValueError("not a zip archive")  # np.load would take it for a pickle
    with np.load(path, allow_pickle=False) as data:
      return {k: data[k] for k in data.files}
  except Exception as e:  # noqa: BLE001 - whatever the reader says, the file is at fault
    raise ValueError(f"{path}: not a readable {kind} file ({e}); expected {_EXPECTED[kind]}") from e


def detect_layout(state: dict[str, np.ndarray]) -> str:
  """Which of LAYOUTS a state dict's names follow."""
  if any(re.search(r"(^|\.)encoder\.layer\.\d+\.", k) for k in state):
    return LAYOUTS[2] if any(k.startswith("decoder.") or "mask_token" in k for k in state) else LAYOUTS[1]
  return LAYOUTS[0]


def from_hugging_face(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """A Hugging Face ViTModel / ViTForImageClassification / ViTMAEForPreTraining state dict
  under timm's names: query/key/value concatenated into qkv, the rest renamed one to one.
  Names it does not know are kept as they are (and reported as unexpected)."""
  out, qkv = {}, {}
  for key, value in state.items():
    name = key[len("vit."):] if key.startswith("vit.") else key
    m = re.match(r"^(encoder\.layer|decoder\.decoder_layers)\.(\d+)\.(.+)\.(weight|bias)$", name)
    if m:
      block = f"{'blocks' if m[1] == 'encoder.layer' else 'decoder_blocks'}.{m[2]}"
      part, kind = m[3], m[4]
      if part.startswith("attention.attention."):
        qkv.setdefault((block, kind), {})[part.rsplit(".", 1)[1]] = value
      elif part in _HF_LAYER:
        out[f"{block}.{_HF_LAYER[part]}.{kind}"] = value
      else:
        out[key] = value
      continue
    out[_HF_TOP.get(name, key)] = value
  for (block, kind), parts in qkv.items():
    if sorted(parts) != ["key", "query", "value"]:
      raise ValueError(f"{block}: attention {kind} has {sorted(parts)}, expected query, key, value")
    out[f"{block}.attn.qkv.{kind}"] = np.concatenate([parts["query"], parts["key"], parts["value"]])
  return out


def _torch_name(path: tuple[str, ...]) -> str:
  """Our param path -> the timm/MAE state-dict key."""
  name = ".".join(path)
  name = re.sub(r"^encoder\.", "", name)
  name = re.sub(r"^decoder\.(blocks|norm)", r"decoder_\1", name)
  name = re.sub(r"blocks_(\d+)", r"blocks.\1", name)
  return re.sub(r"\.(kernel|scale)$", ".weight", name)


def _kernel_in_axes(path) -> int:
  return 2 if path[-2:] == ("proj", "kernel") and "attn" in path else 1


def _torch_shape(path, shape) -> tuple[int, ...]:
  """The shape the torch tensor of our param `path` with our `shape` must have."""
  if path[-2:] == ("proj", "kernel") and path[0] == "patch_embed":
    # Our [p*p*C, D] is the conv's [D, C, p, p]; RGB input.
    p = int(round((shape[0] / 3) ** 0.5))
    return (shape[1], 3, p, p)
  if path[-1] == "kernel":
    k = _kernel_in_axes(path)
    return (int(np.prod(shape[k:])), int(np.prod(shape[:k])))  # [out, in]
  if path[-1] in ("cls_token", "mask_token", "pos_embed"):
    return tuple(shape)
  return (int(np.prod(shape)),)  # biases and LayerNorm params are flat in torch


def _to_ours(path, value, shape):
  if path[-2:] == ("proj", "kernel") and path[0] == "patch_embed":
    return value.transpose(2, 3, 1, 0).reshape(shape)  # [D,C,p,q] -> [(p q c), D]
  if path[-1] == "kernel":
    return value.T.reshape(shape)
  return value.reshape(shape)


def is_sincos(table) -> bool:
  """Whether a checkpoint's position table [1, 1 + h*w, D] is MAE's fixed sin-cos one."""
  table = np.asarray(table, np.float32).reshape(-1, np.shape(table)[-1])
  side = vit.table_grid(table.shape[0])
  if side is None or table.shape[1] % 4:
    return False
  return bool(np.allclose(vit.sincos_pos_embed_2d(table.shape[1], (side, side)), table, atol=1e-4))


def _check_positions(state, template_widths, learned: bool) -> list[str]:
  """Problems with the checkpoint's position tables for a model whose own are sin-cos
  (`learned`: the encoder's is a param, loaded instead of checked)."""
  problems = []
  for key, width_name in POSITION_KEYS.items():
    if key not in state or width_name not in template_widths or (key == "pos_embed" and learned):
      continue
    if not is_sincos(state[key]):
      fix = ("convert with --pos_embed=learned (a VisionTransformer with a learned table)"
             if key == "pos_embed" else "a learned decoder table is not supported")
      problems.append(f"{key} {tuple(np.shape(state[key]))} is a learned table, not MAE's fixed "
                      f"2-D sin-cos one: {fix}")
  return problems


def convert_timm_state_dict(state: dict[str, Any], params_template: Any) -> dict[str, Any]:
  """Maps a timm/MAE state dict onto `params_template`'s tree (float arrays or shapes),
  in its layout (unrolled `blocks_{i}` or scanned `blocks`).

  Args:
    state: flat {torch name: array}.
    params_template: the model's 'params' collection (e.g. from `jax.eval_shape` of
      `init`); boxed (logically partitioned) leaves are fine.

  Returns:
    A params dict of numpy arrays with the template's structure and dtypes.

  Raises:
    ValueError: with the counts of missing, unexpected and wrongly shaped keys (and position
      tables that are not what the model has), the first few of each.
  """
  template = nn.unbox(params_template)
  scanned = vit.is_scanned(template)  # a scan_layers model: map onto the unrolled layout
  flat = traverse_util.flatten_dict(vit.unstack_blocks(template) if scanned else template)
  expected = {_torch_name(path): path for path in flat}
  widths = {}
  if ("patch_embed", "proj", "kernel") in flat:
    widths["width"] = flat["patch_embed", "proj", "kernel"].shape[-1]
  if ("decoder_embed", "kernel") in flat:
    widths["decoder_width"] = flat["decoder_embed", "kernel"].shape[-1]

  learned = ("pos_embed",) in flat
  missing = sorted(set(expected) - set(state))
  unexpected = sorted(set(state) - set(expected) - set(POSITION_KEYS))
  wrong_shape = []
  for name in sorted(set(expected) & set(state)):
    path = expected[name]
    got = tuple(np.shape(state[name]))
    if path == ("pos_embed",):  # any square grid: resampled to ours below
      ok = (len(got) == 3 and got[0] == 1 and got[2] == flat[path].shape[2]
            and vit.table_grid(got[1]) is not None)
      want = f"(1, 1 + h*w, {flat[path].shape[2]})"
    else:
      want = _torch_shape(path, flat[path].shape)
      ok = got == want
    if not ok:
      wrong_shape.append(f"{name}: checkpoint {got}, expected {want}")
  positions = _check_positions(state, widths, learned)
  if missing or unexpected or wrong_shape or positions:
    lines = ["The checkpoint does not match the model."]
    for title, items in (("missing", missing), ("unexpected", unexpected),
                         ("wrong shape", wrong_shape), ("position table", positions)):
      if items:
        lines.append(f"{title} ({len(items)}):")
        lines += [f"  {item}" for item in items[:SHOWN]]
        if len(items) > SHOWN:
          lines.append(f"  ... and {len(items) - SHOWN} more")
    if len(missing) + len(unexpected) > 2 * SHOWN:
      lines.append("(most keys differ: another model size (--preset), or another layout: "
                   f"{', '.join(LAYOUTS)} are read)")
    raise ValueError("\n".join(lines))

  params = {}
  for name, path in expected.items():
    leaf = flat[path]
    if path == ("pos_embed",):
      side = vit.table_grid(leaf.shape[1])
      value = vit.resample_pos_embed(np.asarray(state[name])[0], (side, side))[None]
    else:
      value = _to_ours(path, np.asarray(state[name]), leaf.shape)
    params[path] = value.astype(leaf.dtype)
  params = traverse_util.unflatten_dict(params)
  return vit.stack_blocks(params) if scanned else params


def _to_torch(path, value) -> np.ndarray:
  """Inverse of `_to_ours`: our param at `path` -> the torch tensor's layout."""
  shape = _torch_shape(path, value.shape)
  if path[-2:] == ("proj", "kernel") and path[0] == "patch_embed":
    p = shape[2]
    return value.reshape(p, p, shape[1], shape[0]).transpose(3, 2, 0, 1)  # [(p q c), D] -> [D,C,p,q]
  if path[-1] == "kernel":
    k = _kernel_in_axes(path)
    return value.reshape(int(np.prod(value.shape[:k])), -1).T
  return value.reshape(shape)


def export_timm_state_dict(params: Any) -> dict[str, np.ndarray]:
  """Our MAE / ViT params (either block layout) -> a flat {timm/MAE torch name: array}: the
  converter's inverse, for publishing weights in the layout PyTorch users load
  (`safetensors.numpy.save_file`; `add_position_tables` adds the fixed position tables)."""
  flat = traverse_util.flatten_dict(vit.unstack_blocks(jax.device_get(nn.unbox(params))))
  return {_torch_name(path): np.ascontiguousarray(_to_torch(path, np.asarray(value)))
          for path, value in flat.items()}


def add_position_tables(state: dict[str, np.ndarray], image_size: int, patch_size: int) -> dict:
  """`state` with MAE's fixed `pos_embed` / `decoder_pos_embed` [1, 1 + N, D] for
  `image_size` images, as the public MAE checkpoints carry them."""
  grid = (image_size // patch_size,) * 2
  out = dict(state)
  for key, width_of in (("pos_embed", "cls_token"), ("decoder_pos_embed", "mask_token")):
    if width_of in state:
      width = state[width_of].shape[-1]
      out[key] = vit.sincos_pos_embed_2d(width, grid)[None]
  return out


def build_model(model: str, preset: str, **overrides) -> nn.Module:
  """`MaskedAutoencoder` ('mae') or `VisionTransformer` ('vit') of a size preset."""
  if model == "mae":
    return mae_lib.MaskedAutoencoder(**vit.variant_config(preset, **overrides))
  if model == "vit":
    return vit.VisionTransformer(**vit.variant_config(preset, decoder=False, **overrides))
  raise ValueError(f"model must be 'mae' or 'vit', got {model!r}")


def params_shapes(module: nn.Module, image_size: int | None = None) -> Any:
  """The module's params as ShapeDtypeStructs for `image_size` images, without allocating
  them. Only a learned position table depends on the image size (default: 2x2 patches)."""
  size = image_size or 2 * module.patch_size
  imgs = jnp.zeros((1, size, size, 3))
  rngs = {"params": jax.random.key(0), "masking": jax.random.key(0)}
  return jax.eval_shape(lambda: module.init(rngs, imgs, train=False))["params"]


def convert_checkpoint(input_path: str, model: str = "mae", preset: str = "base", *,
                       pos_embed: str = "auto", image_size: int | None = None,
                       **overrides) -> dict[str, Any]:
  """Reads a timm/MAE checkpoint file and returns params for `build_model(...)`; errors name
  the file.

  `pos_embed` ('vit' only): 'auto' takes a learned table when the checkpoint's `pos_embed` is
  not MAE's sin-cos one (logged), 'sincos' or 'learned' insist. A learned table is resampled
  to `image_size` (default: the checkpoint's own grid).
  """
  state = load_state_dict(input_path)
  layout = detect_layout(state)
  logging.info("%s: %d tensors in the %s layout", input_path, len(state), layout)
  if layout != LAYOUTS[0]:
    state = from_hugging_face(state)
  if model == "vit":
    decoder = sorted(k for k in state if k.startswith(DECODER_PREFIXES))
    if decoder:
      logging.info("%s: a full MAE checkpoint: converting its encoder; its %d decoder tensors "
                   "(%s, ...) have no place in a VisionTransformer", input_path, len(decoder),
                   decoder[0])
      state = {k: v for k, v in state.items() if k not in decoder}
  if pos_embed == "auto":
    pos_embed = "learned" if model == "vit" and "pos_embed" in state and not is_sincos(
        state["pos_embed"]) else "sincos"
    if pos_embed == "learned":
      logging.info("%s: pos_embed is a learned table: converting to a VisionTransformer with "
                   "pos_embed='learned' (fine-tune with --config.model.pos_embed=learned)",
                   input_path)
  if pos_embed == "learned":
    if model != "vit":
      raise ValueError(f"{input_path}: a learned pos_embed loads only with --model=vit")
    overrides["pos_embed"] = "learned"
    if image_size is None and "pos_embed" in state:
      patch = vit.variant_config(preset, decoder=False, **overrides)["patch_size"]
      image_size = (vit.table_grid(np.shape(state["pos_embed"])[1]) or 0) * patch or None
  module = build_model(model, preset, **overrides)
  try:
    return convert_timm_state_dict(state, params_shapes(module, image_size))
  except ValueError as e:
    raise ValueError(f"{input_path} ({layout} layout): {e}") from None


def save_params(params: Any, output_dir: str) -> None:
  """Writes `params` atomically with orbax (read back with `checkpoint.restore_tree`, on any
  device layout); `output_dir` may be a bucket URL."""
  # Imported here: orbax takes seconds to import and only this function needs it.
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(fileio.path(output_dir), params)
  checkpointer.wait_until_finished()
