"""The models' building blocks in stock JAX/Flax, with one switch for backend kernels.

Every model module takes `kernels` (its config's `model.kernels`) and hands it to these:
  "auto"   the XLA:CPU kernels when jax's default backend is the CPU, else stock XLA with
           `jax.nn.dot_product_attention` choosing its implementation (XLA's in jax 0.10;
           jax may come to pick cuDNN there; `launch/check_accelerator.py` times both);
  "xla"    stock jnp/lax and autodiff everywhere; attention through
           `jax.nn.dot_product_attention(implementation="xla")`;
  "cudnn"  "xla" with cuDNN attention required (a GPU, and no attention dropout in training);
  "cpu"    `cpu_kernels`: hand VJPs, float32 accumulation of bf16 products, Winograd
           convolutions, tuned for XLA:CPU (see that module).
Both sets compute the same functions (tests/models/test_cpu_kernels.py holds the CPU kernels
to float64 numpy and the two sets to each other, values and gradients). Numerics on every
path: matmuls in the compute dtype (`dtype`), LayerNorm and softmax in float32, exact (erf)
GELU evaluated in float32, parameters as stored (float32), and their gradients float32 from
the products' float32 accumulators, never rounded to the compute dtype (`einsum`,
`add_bias`), so that devices sum them in float32.
"""

import string
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from affect_jax.models import cpu_kernels, mixed_precision

KERNELS = ("auto", "xla", "cudnn", "cpu")

is_low_precision = cpu_kernels.is_low_precision


def resolve(kernels: str, backend: str | None = None) -> str:
  """The kernel set a choice means on `backend` (default: jax's): 'cpu', 'xla' or 'cudnn';
  'auto' is 'cpu' on a CPU and 'auto' (stock XLA, JAX's pick of attention) elsewhere."""
  if kernels not in KERNELS:
    raise ValueError(f"kernels must be one of {KERNELS}, got {kernels!r}")
  if kernels == "auto" and (backend or jax.default_backend()) == "cpu":
    return "cpu"
  return kernels


def _product(spec, a, b, dtype):
  """The stock set's product for `mixed_precision.cast_einsum`: the accumulator (float32 on
  GPU and TPU matrix units) returned in `dtype`."""
  return jnp.einsum(spec, a, b, preferred_element_type=dtype)


def einsum(spec: str, a, b, *, kernels: str = "auto", compute_dtype=None, out_dtype=None):
  """`jnp.einsum(spec, a, b)` with both operands in `compute_dtype` (default: their promoted
  dtype), the result in `out_dtype` (default: the compute dtype).

  In a low-precision compute dtype the operands are cast inside the product's VJP
  (`mixed_precision.cast_einsum`), so each operand's gradient leaves the backward product's
  float32 accumulator in that operand's own dtype: a float32 kernel multiplied in bf16 gets
  a float32 gradient, which data-parallel (and FSDP) devices then sum in float32. All three
  products take compute-dtype operands. On the CPU kernels the same rule runs on XLA:CPU's
  fast bf16 products (`cpu_kernels.einsum_f32acc`)."""
  if compute_dtype is None:
    compute_dtype = jnp.promote_types(a.dtype, b.dtype)
  if resolve(kernels) == "cpu" and is_low_precision(compute_dtype):
    return cpu_kernels.einsum_f32acc(spec, a, b, out_dtype, compute_dtype)
  if is_low_precision(compute_dtype) and not a.dtype == b.dtype == compute_dtype:
    return mixed_precision.cast_einsum(spec, a, b, _product, compute_dtype, out_dtype)
  out = jnp.einsum(spec, a.astype(compute_dtype), b.astype(compute_dtype))
  return out if out_dtype is None else out.astype(out_dtype)


@jax.custom_vjp
def add_bias(y, bias):
  """`y + bias` over y's trailing axes, the bias cast to y's dtype, with the bias gradient
  summed in float32 and returned in the bias's dtype: a float32 bias of a bf16 layer gets
  an unrounded float32 gradient (see `einsum`). The sum runs over the leading axes, as
  autodiff's would, with no reshape: a bias sharded over a mesh axis stays sharded."""
  return y + bias.astype(y.dtype)


def _add_bias_fwd(y, bias):
  return add_bias(y, bias), bias


def _add_bias_bwd(bias, g):
  leading = tuple(range(g.ndim - bias.ndim))
  return g, jnp.sum(g.astype(jnp.float32), axis=leading).astype(bias.dtype)


add_bias.defvjp(_add_bias_fwd, _add_bias_bwd)


def gelu(x, kernels: str = "auto"):
  """Exact GELU as torch's `nn.GELU()`: x/2 (1 + erf(x/sqrt 2)), evaluated in float32 and
  returned in x's dtype."""
  if resolve(kernels) == "cpu":
    return cpu_kernels.gelu(x)
  return jax.nn.gelu(x.astype(jnp.float32), approximate=False).astype(x.dtype)


def layer_norm(x, scale, bias, epsilon: float, kernels: str = "auto"):
  """LayerNorm over the last axis in float32 with torch's two-pass variance,
  (x - mean) / sqrt(mean((x - mean)^2) + eps) * scale + bias; the result is float32."""
  if resolve(kernels) == "cpu":
    return cpu_kernels.layer_norm(x, scale, bias, epsilon)
  x32 = x.astype(jnp.float32)
  mean = jnp.mean(x32, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
  return (x32 - mean) * jax.lax.rsqrt(var + epsilon) * scale + bias


def attention(qkv, *, mask=None, dropout_keep=None, dropout_rate: float = 0.0,
              kernels: str = "auto"):
  """softmax(q k^T / sqrt(d)) v per head, from a fused projection's packed token-major
  qkv [B, N, 3, H, d], returning token-major [B, N, H, d].

  Logits and softmax in float32, the probabilities rounded to the compute dtype (qkv's) for
  the product with v. `mask`: bool broadcastable to [B, H, N, N], False removes a key (a
  row with no key left gets uniform weights, never NaNs). `dropout_keep`: bool [B, H, N, N]
  or None, the attention weights that attention dropout keeps (scaled by 1 / (1 - rate)).
  """
  kind = resolve(kernels)
  if kind == "cpu":
    return cpu_kernels.qkv_attention(qkv, mask=mask, dropout_keep=dropout_keep,
                                     dropout_rate=dropout_rate)
  q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
  if dropout_keep is None:
    implementation = {"auto": None, "xla": "xla", "cudnn": "cudnn"}[kind]
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=implementation)
  if kind == "cudnn":
    raise ValueError("kernels='cudnn': cuDNN attention has no attention dropout; use 'auto'")
  # jax.nn.dot_product_attention has no dropout: the same function written out.
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
  logits = logits * np.float32(q.shape[-1] ** -0.5)
  if mask is not None:
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  probs = jnp.where(dropout_keep, probs / (1.0 - dropout_rate), 0).astype(v.dtype)
  return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


def conv1d(x, kernel, dilation: int, padding: tuple[int, int], kernels: str = "auto"):
  """[B, T, C_in] * [k, C_in, C_out] -> [B, T, C_out] in x's dtype, dilated, zero padded
  along T by `padding` (left, right)."""
  if resolve(kernels) == "cpu":
    return cpu_kernels.conv1d(x, kernel, dilation, padding)
  return jax.lax.conv_general_dilated(
      x, kernel.astype(x.dtype), window_strides=(1,), padding=[padding],
      rhs_dilation=(dilation,), dimension_numbers=("NWC", "WIO", "NWC"))


class LayerNorm(nn.Module):
  """`layer_norm` with params `scale` (ones) and `bias` (zeros), both named ('embed',):
  flax.linen.LayerNorm's names and shapes, so checkpoints and converted weights load alike."""
  epsilon: float = 1e-6
  param_dtype: Any = jnp.float32
  kernels: str = "auto"

  @nn.compact
  def __call__(self, x):
    shape = (x.shape[-1],)
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
                       shape, self.param_dtype)
    bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
                      shape, self.param_dtype)
    return layer_norm(x, scale, bias, self.epsilon, self.kernels)


class Dense(nn.Module):
  """A linear layer over the trailing `in_axes` input axes, with logically named params.

  kernel: [*in_dims, *features], named `kernel_axes`; bias: [*features], named by the
  trailing names. The initialiser (MAE's xavier_uniform by default) sees the flat
  [fan_in, fan_out] shape, so it matches a torch Linear of the same sizes. The product runs
  in `dtype` (default: the input's and kernel's promoted dtype).
  """
  features: int | tuple[int, ...]
  kernel_axes: tuple[str | None, ...]
  in_axes: int = 1
  kernel_init: Callable[..., Any] = nn.initializers.xavier_uniform()
  bias_init: Callable[..., Any] = nn.initializers.zeros
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  kernels: str = "auto"

  @nn.compact
  def __call__(self, x):
    features = (self.features,) if isinstance(self.features, int) else tuple(self.features)
    in_dims = x.shape[x.ndim - self.in_axes:]
    fan_in, fan_out = int(np.prod(in_dims)), int(np.prod(features))

    def kernel_init(rng, shape, dtype):
      return self.kernel_init(rng, (fan_in, fan_out), dtype).reshape(shape)

    kernel = self.param(
        "kernel", nn.with_logical_partitioning(kernel_init, self.kernel_axes),
        in_dims + features, self.param_dtype)
    bias = self.param(
        "bias", nn.with_logical_partitioning(self.bias_init, self.kernel_axes[self.in_axes:]),
        features, self.param_dtype)
    dtype = jnp.dtype(self.dtype or jnp.promote_types(x.dtype, kernel.dtype))

    letters = string.ascii_letters
    batch = letters[:x.ndim - self.in_axes]
    contracted = letters[len(batch):x.ndim]
    out = letters[x.ndim:x.ndim + len(features)]
    y = einsum(f"{batch}{contracted},{contracted}{out}->{batch}{out}", x, kernel,
               kernels=self.kernels, compute_dtype=dtype)
    if resolve(self.kernels) == "cpu":
      return cpu_kernels.add_bias(y, bias)
    return add_bias(y, bias) if bias.dtype != dtype else y + bias
