"""The authors' temporal model (their `model.py`) and a frame-wise baseline, in Flax.

    features [B, T, D_m] per modality ─► TCN per modality ─► concat over channels (fusion)
      ─► 1x1 projection 128·M -> d_model ─► Transformer encoder (key-padding mask)
      ─► per-frame head Linear d -> d/2, BatchNorm, Linear d/2 -> out

Call: `model.apply(variables, inputs, mask, train=..., rngs={"dropout": key},
mutable=["batch_stats"] if train else False)` with `inputs` a dict modality -> [B, T, D_m] and
`mask` [B, T] (1 = real frame; segments are padded at the end). Returns [B, T, out] float32.
Padded frames never reach a valid frame's output: the TCN zeros them before every
convolution, attention gives them no weight as keys, and BatchNorm's training statistics
leave them out.

`TemporalModel`'s defaults are exactly the released model (visual only, causal TCN
[768, 256, 128] k5, 8 post-LN layers of width 512, 4 heads, ff 512, ReLU, no positional
encoding, dropout 0); `params_from_torch_state_dict` loads PyTorch weights onto it: the
authors' own checkpoints (upczww/abaw6's `Model`) and the reference of
`../shared/bench/torch_temporal.py`. A run's `config.model` describes its model entirely
(`from_config`): every width is a config field, so a saved config rebuilds the model.

Initialisation follows torch's defaults (Linear kernels uniform +-1/sqrt(fan_in), the fused
attention projection xavier-uniform) except that Linear biases start at zero.
"""

import functools
import re
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from affect_jax.models import layers, vit
from affect_jax.models.tcn import TemporalConvNet, keep_valid

Dtype = Any

# torch's default Linear/Conv kernel init: kaiming_uniform(a=sqrt(5)) = U(+-1/sqrt(fan_in)).
torch_linear_init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")


def layer_norm(name, param_dtype, kernels="auto"):
  return vit.layer_norm(name, param_dtype, epsilon=1e-5, kernels=kernels)  # torch's eps


def sincos_positions(length: int, width: int) -> np.ndarray:
  """Vaswani et al.'s fixed encoding [T, width]: sin on even channels, cos on odd ones."""
  freqs = 1.0 / 10000 ** (np.arange(0, width, 2, dtype=np.float64) / width)
  angles = np.arange(length, dtype=np.float64)[:, None] * freqs  # [T, width/2]
  pos = np.zeros([length, width])
  pos[:, 0::2], pos[:, 1::2] = np.sin(angles), np.cos(angles[:, :width // 2])
  return pos.astype(np.float32)


class FeedForward(nn.Module):
  """Linear(d, ff) -> activation -> dropout -> Linear(ff, d), torch's layer order."""
  ff_dim: int
  activation: str = "relu"
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  kernels: str = "auto"

  @nn.compact
  def __call__(self, x, *, train: bool = False):  # [B, T, D]
    dense = functools.partial(layers.Dense, kernel_init=torch_linear_init, dtype=self.dtype,
                              param_dtype=self.param_dtype,
                              kernels=self.kernels)
    if self.activation not in ("relu", "gelu"):
      raise ValueError(f"activation must be 'relu' or 'gelu', got {self.activation!r}")
    h = dense(self.ff_dim, ("embed", "mlp"), name="fc1")(x)  # [B, T, ff]
    # torch's "gelu" is the exact (erf) one.
    h = nn.relu(h) if self.activation == "relu" else layers.gelu(h, self.kernels)
    h = nn.Dropout(self.dropout, deterministic=not train)(h)
    return dense(x.shape[-1], ("mlp", "embed"), name="fc2")(h)


class TransformerEncoderLayer(nn.Module):
  """torch's `nn.TransformerEncoderLayer`: post-LN by default,
  x = LN1(x + drop(attn(x))); x = LN2(x + drop(ff(x))); with `norm_first` the pre-LN
  x = x + drop(attn(LN1(x))); x = x + drop(ff(LN2(x)))."""
  num_heads: int
  ff_dim: int
  dropout: float = 0.0
  activation: str = "relu"
  norm_first: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  kernels: str = "auto"

  @nn.compact
  def __call__(self, x, mask, *, train: bool = False):  # [B, T, D] float32, [B, T] bool
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype,
              kernels=self.kernels)
    attn = vit.MultiHeadSelfAttention(self.num_heads, self.dropout, out_name="out",
                                      out_init=torch_linear_init, name="attn", **kw)
    ff = FeedForward(self.ff_dim, self.activation, self.dropout, name="ff", **kw)
    norm1 = layer_norm("norm1", self.param_dtype, self.kernels)
    norm2 = layer_norm("norm2", self.param_dtype, self.kernels)
    drop = nn.Dropout(self.dropout, deterministic=not train)

    if self.norm_first:
      x = x + drop(attn(norm1(x), mask, train=train))
      return x + drop(ff(norm2(x), train=train))
    x = norm1(x + drop(attn(x, mask, train=train)))
    return norm2(x + drop(ff(x, train=train)))


class TransformerEncoder(nn.Module):
  """`num_layers` layers (`layers_{i}`); with `norm_first`, a final LayerNorm (`norm`), as
  pre-LN stacks need (torch leaves it to the caller's `norm=`)."""
  num_layers: int
  num_heads: int
  ff_dim: int
  dropout: float = 0.0
  activation: str = "relu"
  norm_first: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  kernels: str = "auto"

  @nn.compact
  def __call__(self, x, mask, *, train: bool = False):  # [B, T, D], [B, T] bool
    x = x.astype(jnp.float32)  # the residual stream stays float32; branches may be bf16
    for i in range(self.num_layers):
      x = TransformerEncoderLayer(
          self.num_heads, self.ff_dim, self.dropout, self.activation, self.norm_first,
          dtype=self.dtype, param_dtype=self.param_dtype,
          kernels=self.kernels, name=f"layers_{i}")(x, mask, train=train)
    if self.norm_first:
      x = layer_norm("norm", self.param_dtype, self.kernels)(x)
    return x  # [B, T, D] float32


class PredictionHead(nn.Module):
  """Per frame Linear(d, hidden) -> BatchNorm -> Linear(hidden, out).

  BatchNorm as torch's BatchNorm1d over all frames of the batch (momentum 0.1 = flax 0.9,
  eps 1e-5), its training statistics over real frames only. One difference stays: torch
  tracks the unbiased variance in its running average, flax the biased one (a factor
  n/(n-1) over thousands of frames). A training batch needs one real frame at least.
  """
  hidden: int
  out_dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  kernels: str = "auto"

  @nn.compact
  def __call__(self, x, mask, *, train: bool = False):  # [B, T, D], [B, T] bool
    dense = functools.partial(layers.Dense, kernel_init=torch_linear_init, dtype=self.dtype,
                              param_dtype=self.param_dtype,
                              kernels=self.kernels)
    h = dense(self.hidden, ("embed", "mlp"), name="fc1")(x)  # [B, T, hidden]
    h = nn.BatchNorm(
        use_running_average=not train, momentum=0.9, epsilon=1e-5,
        use_fast_variance=False, dtype=jnp.float32, param_dtype=self.param_dtype,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("mlp",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("mlp",)),
        name="bn")(h, mask=mask[..., None])
    return dense(self.out_dim, ("mlp", "classes"), name="fc2")(h)  # [B, T, out]


def _check_inputs(inputs: Mapping[str, jax.Array], modalities: Sequence[str]) -> None:
  missing = [m for m in modalities if m not in inputs]
  if missing:
    raise ValueError(f"the model's modalities {missing} are missing from its inputs "
                     f"(got {sorted(inputs)})")


def _frame_mask(inputs, modalities, mask):
  """[B, T] bool; no mask means every frame is real."""
  _check_inputs(inputs, modalities)
  if mask is None:
    return jnp.ones(inputs[modalities[0]].shape[:2], bool)
  return jnp.asarray(mask).astype(bool)


class TemporalModel(nn.Module):
  """Per-modality TCN -> fusion -> projection -> Transformer -> per-frame head.

  `use_tcn=False` feeds the features to the projection directly and `use_transformer=False`
  goes from the projection to the head (the ablations). `positional='sincos'` adds fixed
  positions after the projection; `va_tanh` squashes the outputs into [-1, 1] (for VA).
  """
  out_dim: int
  tcn_channels: Sequence[int] = (768, 256, 128)
  kernel_size: int = 5
  d_model: int = 512
  num_layers: int = 8
  num_heads: int = 4
  ff_dim: int = 512
  dropout: float = 0.0
  modalities: Sequence[str] = ("visual",)
  tcn_padding: str = "causal"
  norm_first: bool = False
  positional: str = "none"
  activation: str = "relu"
  va_tanh: bool = False
  use_tcn: bool = True
  use_transformer: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  kernels: str = "auto"

  @nn.compact
  def __call__(self, inputs: Mapping[str, jax.Array], mask=None, train: bool = False):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype,
              kernels=self.kernels)
    mask = _frame_mask(inputs, self.modalities, mask)  # [B, T] bool

    streams = []
    for name in self.modalities:
      x = keep_valid(inputs[name], mask)  # [B, T, D_m]; padding may hold anything, even NaN
      if self.use_tcn:
        x = TemporalConvNet(self.tcn_channels, self.kernel_size, self.tcn_padding,
                            self.dropout, name=f"tcn_{name}", **kw)(x, mask, train=train)
      streams.append(x)  # [B, T, C_m]
    x = jnp.concatenate(streams, axis=-1)  # [B, T, sum C_m]: the fusion
    x = layers.Dense(self.d_model, ("channels", "embed"), kernel_init=torch_linear_init,
                     name="proj", **kw)(x)  # [B, T, d_model]

    if self.positional == "sincos":
      x = x + sincos_positions(x.shape[1], self.d_model)
    elif self.positional != "none":
      raise ValueError(f"positional must be 'none' or 'sincos', got {self.positional!r}")
    if self.use_transformer:
      x = TransformerEncoder(self.num_layers, self.num_heads, self.ff_dim, self.dropout,
                             self.activation, self.norm_first, name="encoder", **kw)(
                                 x, mask, train=train)
    y = PredictionHead(self.d_model // 2, self.out_dim, name="head", **kw)(
        x, mask, train=train)
    y = y.astype(jnp.float32)
    return jnp.tanh(y) if self.va_tanh else y  # [B, T, out]


class FrameMLP(nn.Module):
  """The frame-wise baseline: each frame alone, Dense -> ReLU -> Dropout -> Dense.

  Same call as `TemporalModel`; `mask` is accepted and unused (no frame sees another).
  """
  out_dim: int
  hidden: int = 512
  dropout: float = 0.0
  modalities: Sequence[str] = ("visual",)
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  kernels: str = "auto"

  @nn.compact
  def __call__(self, inputs: Mapping[str, jax.Array], mask=None, train: bool = False):
    del mask
    _check_inputs(inputs, self.modalities)
    dense = functools.partial(layers.Dense, kernel_init=torch_linear_init, dtype=self.dtype,
                              param_dtype=self.param_dtype,
                              kernels=self.kernels)
    x = jnp.concatenate([inputs[name] for name in self.modalities], axis=-1)  # [B, T, D]
    h = nn.relu(dense(self.hidden, ("channels", "mlp"), name="fc1")(x))
    h = nn.Dropout(self.dropout, deterministic=not train)(h)
    return dense(self.out_dim, ("mlp", "classes"), name="fc2")(h).astype(jnp.float32)


KINDS = ("temporal", "frame_mlp")


def from_config(model: Mapping[str, Any], out_dim: int) -> nn.Module:
  """The model a config's `model` field describes: `kind` 'temporal' (`TemporalModel`, every
  other field one of its attributes, `mlp_hidden` aside) or 'frame_mlp' (`FrameMLP`: its
  `hidden` is `mlp_hidden`; the TCN and Transformer fields are not used). `dtype` is a name
  ('float32', 'bfloat16'); `modalities` may be one comma-separated string, as
  `--config.model.modalities=visual,audio` gives it. Feature widths come from the inputs at
  init. Unknown fields are an error: a misspelt option never falls back to a default."""
  options = dict(model)
  kind = options.pop("kind", "temporal")
  if kind not in KINDS:
    raise ValueError(f"config.model.kind: unknown {kind!r} ({' | '.join(KINDS)})")
  if "preset" in options:
    raise ValueError("config.model.preset: a config of an older affect-jax (widths in a preset "
                     "table); its fields are now config.model.tcn_channels, d_model, num_layers, "
                     "num_heads, ff_dim, kernel_size: write them out (configs/common.py)")
  unknown = set(options) - (set(TemporalModel.__dataclass_fields__) - {"out_dim"}) - {"mlp_hidden"}
  if unknown:
    raise ValueError(f"config.model: unknown fields {sorted(unknown)}")
  options["modalities"] = modalities(options.get("modalities", ("visual",)))
  if "dtype" in options:
    options["dtype"] = jnp.dtype(options["dtype"])
  hidden = options.pop("mlp_hidden", 512)
  if kind == "frame_mlp":
    return FrameMLP(out_dim, hidden=hidden, **{k: v for k, v in options.items()
                                               if k in FrameMLP.__dataclass_fields__})
  return make_temporal_model(out_dim, **options)


def modalities(value) -> tuple[str, ...]:
  """Modality names as a tuple: from a sequence, or one comma-separated string."""
  return tuple(x for item in ([value] if isinstance(value, str) else value)
               for x in item.split(",") if x)


def make_temporal_model(out_dim: int, **options) -> TemporalModel:
  """`TemporalModel(out_dim, **options)` with unknown options refused and sequences made
  tuples (a config's lists hash)."""
  unknown = set(options) - set(TemporalModel.__dataclass_fields__)
  if unknown:
    raise ValueError(f"Unknown TemporalModel options {sorted(unknown)}")
  for key in ("modalities", "tcn_channels"):
    if key in options:
      options[key] = tuple(options[key])
  return TemporalModel(out_dim=out_dim, **options)


def example_inputs(input_dims: Mapping[str, int], batch: int = 1, length: int = 8):
  """Zero features and an all-real mask of the given sizes, e.g. for `model.init`."""
  inputs = {name: jnp.zeros((batch, length, dim), jnp.float32)
            for name, dim in input_dims.items()}
  return inputs, jnp.ones((batch, length), jnp.float32)


# The authors' `Model` (upczww/abaw6 {VA,EXPR,AU}/model): locuslab's TemporalConvNet with
# torch.nn.utils.weight_norm (weight_g / weight_v), whose TemporalBlock also holds its layers
# in `net` (so each tensor is saved twice), and TransEncoder's 1x1 conv `conv1`.
_AUTHORS_NAMES = (
    (r"^temporal\.network\.(\d+)\.conv([12])\.weight_g$", r"tcn.\1.c\2.parametrizations.weight.original0"),
    (r"^temporal\.network\.(\d+)\.conv([12])\.weight_v$", r"tcn.\1.c\2.parametrizations.weight.original1"),
    (r"^temporal\.network\.(\d+)\.conv([12])\.bias$", r"tcn.\1.c\2.bias"),
    (r"^temporal\.network\.(\d+)\.relu([12])\.weight$", r"tcn.\1.a\2.weight"),
    (r"^temporal\.network\.(\d+)\.relu\.weight$", r"tcn.\1.a.weight"),
    (r"^temporal\.network\.(\d+)\.downsample\.(weight|bias)$", r"tcn.\1.down.\2"),
    (r"^encoder\.conv1\.(weight|bias)$", r"proj.\1"),
    (r"^encoder\.transformer_encoder\.layers\.(.*)$", r"enc.layers.\1"),
    (r"^(head\..*)$", r"\1"),
)
# TemporalBlock.net = Sequential(conv1, chomp1, relu1, dropout1, conv2, chomp2, relu2, dropout2).
_LAYOUTS_KNOWN = ("expected the authors' Model (upczww/abaw6: 'temporal.network.N.conv1.weight_g', "
                  "'encoder.transformer_encoder.layers.N...') or the reference's "
                  "(../shared/bench/torch_temporal.py: 'tcn.N.c1...', 'enc.layers.N...')")
_AUTHORS_NET = {"0": "conv1", "2": "relu1", "4": "conv2", "6": "relu2"}


def authors_state_dict(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray] | None:
  """The authors' `Model` state dict (DataParallel's `module.` prefix allowed) in the
  reference's names, or None when `state` is not of that layout. Each tensor their
  TemporalBlock saves twice (`conv1` and `net.0`, ...) must be equal in both places."""
  state = {str(k): v for k, v in state.items()}
  if state and all(k.startswith("module.") for k in state):
    state = {k[len("module."):]: v for k, v in state.items()}
  if not any(k.startswith("temporal.network.") for k in state):
    return None
  out, unplaced = {}, []
  for key, value in state.items():
    net = re.match(r"^temporal\.network\.(\d+)\.net\.(\d+)\.(.*)$", key)
    if net and net.group(2) in _AUTHORS_NET:
      twin = f"temporal.network.{net.group(1)}.{_AUTHORS_NET[net.group(2)]}.{net.group(3)}"
      if twin not in state:
        raise ValueError(f"{key} has no twin {twin}: not the authors' TemporalBlock")
      if np.shape(state[twin]) != np.shape(value) or not np.array_equal(state[twin], value):
        raise ValueError(f"{key} and {twin} are the same tensor in the authors' model, but "
                         "differ in this state dict: it was edited, and neither can be trusted")
      continue
    for pattern, repl in _AUTHORS_NAMES:
      if re.match(pattern, key):
        out[re.sub(pattern, repl, key)] = value
        break
    else:
      unplaced.append(key)
  if unplaced:
    raise ValueError(f"{len(unplaced)} tensors of the authors' layout have no place in the "
                     f"model: {sorted(unplaced)[:5]}{' ...' if len(unplaced) > 5 else ''}")
  return out


def params_from_torch_state_dict(state: Mapping[str, np.ndarray], *, num_heads: int = 4,
                                 modality: str = "visual") -> dict:
  """A PyTorch `state_dict` (numpy arrays) -> {'params', 'batch_stats'}.

  The authors' checkpoints (`authors_state_dict`) are renamed to the reference's layout
  first. Layout of `../shared/bench/torch_temporal.py`'s `AuthorsModel`: `tcn.{i}.c1/c2` with
  `parametrizations.weight.original0/1` (g [C_out, 1, 1], v [C_out, C_in, k]), `a1/a2/a`
  PReLUs, `down`; `proj` (Conv1d k=1); `enc.layers.{l}` (`self_attn.in_proj_*`,
  `out_proj`, `linear1/2`, `norm1/2`); `head.0/1/2` (Linear, BatchNorm1d, Linear). Its
  single TCN becomes `tcn_{modality}`. `num_heads` cannot be read off the shapes.
  Returns plain (unboxed) numpy arrays. Every tensor is used or the load fails (with the
  names left over, or missing): a state dict of another layout is never half read.
  """
  s = {k: np.asarray(v, np.float32) for k, v in (authors_state_dict(state) or state).items()}
  used: set[str] = set()

  def take(key):
    if key not in s:
      raise ValueError(f"the state dict has no {key!r}: {_LAYOUTS_KNOWN}")
    used.add(key)
    return s[key]

  def linear(prefix):  # torch [out, in(, 1)] -> kernel [in, out]
    w = take(f"{prefix}.weight")
    return {"kernel": w.reshape(w.shape[0], -1).T, "bias": take(f"{prefix}.bias")}

  def weight_norm_conv(prefix):
    g = take(f"{prefix}.parametrizations.weight.original0")
    v = take(f"{prefix}.parametrizations.weight.original1")
    return {"v": v.transpose(2, 1, 0), "g": g.reshape(-1), "bias": take(f"{prefix}.bias")}

  def prelu(prefix):
    return {"negative_slope": take(f"{prefix}.weight").reshape(())}

  tcn = {}
  for i in range(len({k.split(".")[1] for k in s if k.startswith("tcn.")})):
    p = f"tcn.{i}"
    level = {"conv1": weight_norm_conv(f"{p}.c1"), "conv2": weight_norm_conv(f"{p}.c2"),
             "prelu1": prelu(f"{p}.a1"), "prelu2": prelu(f"{p}.a2"),
             "prelu_out": prelu(f"{p}.a")}
    if f"{p}.down.weight" in s:
      level["downsample"] = linear(f"{p}.down")
    tcn[f"level_{i}"] = level

  encoder = {}
  for l in range(len({k.split(".")[2] for k in s if k.startswith("enc.layers.")})):
    p = f"enc.layers.{l}"
    in_w, in_b = take(f"{p}.self_attn.in_proj_weight"), take(f"{p}.self_attn.in_proj_bias")
    width = in_w.shape[1]
    head_dim = width // num_heads
    out = linear(f"{p}.self_attn.out_proj")
    encoder[f"layers_{l}"] = {
        "attn": {
            # Rows of in_proj are [q; k; v], each head-major.
            "qkv": {"kernel": in_w.T.reshape(width, 3, num_heads, head_dim),
                    "bias": in_b.reshape(3, num_heads, head_dim)},
            "out": {"kernel": out["kernel"].reshape(num_heads, head_dim, width),
                    "bias": out["bias"]}},
        "ff": {"fc1": linear(f"{p}.linear1"), "fc2": linear(f"{p}.linear2")},
        "norm1": {"scale": take(f"{p}.norm1.weight"), "bias": take(f"{p}.norm1.bias")},
        "norm2": {"scale": take(f"{p}.norm2.weight"), "bias": take(f"{p}.norm2.bias")},
    }

  params = {
      f"tcn_{modality}": tcn,
      "proj": linear("proj"),
      "encoder": encoder,
      "head": {"fc1": linear("head.0"),
               "bn": {"scale": take("head.1.weight"), "bias": take("head.1.bias")},
               "fc2": linear("head.2")},
  }
  batch_stats = {"head": {"bn": {"mean": take("head.1.running_mean"),
                                 "var": take("head.1.running_var")}}}
  if not tcn or not encoder:
    raise ValueError(f"the state dict has {len(tcn)} TCN levels ('tcn.N.') and {len(encoder)} "
                     f"Transformer layers ('enc.layers.N.'): {_LAYOUTS_KNOWN}")
  left = sorted(set(s) - used - {"head.1.num_batches_tracked"})
  if left:
    raise ValueError(f"{len(left)} tensors of the state dict have no place in the model: "
                     f"{left[:5]}{' ...' if len(left) > 5 else ''}")
  return {"params": params, "batch_stats": batch_stats}
