"""The authors' dilated temporal convolutional network (Bai et al. 2018's TCN), in Flax.

Level i maps channels[i-1] -> channels[i] (level 0: input width -> channels[0]) with two
weight-normalised dilated convolutions (dilation 2^i), each followed by PReLU and dropout, a
residual (through a 1x1 convolution when the widths differ) and a PReLU after the sum.

Layout is [B, T, C], channels last. Parameters per level (`level_{i}`): `conv1`, `conv2`
({v [k, C_in, C_out], g [C_out], bias [C_out]}), `prelu1`, `prelu2`, `prelu_out` (one shared
slope each) and, when the widths differ, `downsample` ({kernel [C_in, C_out], bias}).

Initialisation follows torch: v ~ N(0, 0.01) (the authors' `init_weights`), g = ||v|| so the
initial kernel is v, PReLU slope 0.25, biases uniform +-1/sqrt(fan_in) (torch's Conv1d default).

The convolutions are `layers.conv1d` (on the CPU kernels, float32 ones run as Winograd
F(4, 5): `cpu_kernels.winograd_conv`).
"""

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from affect_jax.models import layers

Dtype = Any
PADDINGS = ("causal", "same")


def torch_bias_init(fan_in: int):
  """torch's default Linear/Conv bias: uniform in +-1/sqrt(fan_in)."""
  bound = fan_in ** -0.5

  def init(rng, shape, dtype=jnp.float32):
    return jax.random.uniform(rng, shape, dtype, -bound, bound)
  return init


def conv_padding(kernel_size: int, dilation: int, padding: str) -> tuple[int, int]:
  """(left, right) zeros along time so that the output has the input's length.

  'causal' puts all (k-1)*d on the left (output t sees inputs <= t), as the authors'
  pad-then-chomp does; 'same' splits them evenly (k odd), so output t is centred on t.
  """
  total = (kernel_size - 1) * dilation
  if padding == "causal":
    return total, 0
  if padding == "same":
    return total // 2, total - total // 2
  raise ValueError(f"padding must be one of {PADDINGS}, got {padding!r}")


class WeightNormConv(nn.Module):
  """Conv1d under torch's `weight_norm` (dim 0): kernel = g * v / ||v||, per output channel.

  The norm runs over the taps and input channels (all but the output channel), in float32.
  """
  features: int
  kernel_size: int
  dilation: int = 1
  padding: str = "causal"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  kernels: str = "auto"

  @nn.compact
  def __call__(self, x):  # [B, T, C_in]
    fan_in = x.shape[-1] * self.kernel_size
    v = self.param(
        "v", nn.with_logical_partitioning(nn.initializers.normal(0.01),
                                          (None, "channels_in", "channels")),
        (self.kernel_size, x.shape[-1], self.features), self.param_dtype)

    def norm_of_v(rng, shape, dtype):
      del rng
      return jnp.sqrt(jnp.sum(jnp.square(v.astype(jnp.float32)), axis=(0, 1))).astype(dtype)

    g = self.param("g", nn.with_logical_partitioning(norm_of_v, ("channels",)),
                   (self.features,), self.param_dtype)
    bias = self.param("bias", nn.with_logical_partitioning(torch_bias_init(fan_in),
                                                           ("channels",)),
                      (self.features,), self.param_dtype)
    v32 = v.astype(jnp.float32)
    kernel = g.astype(jnp.float32) * v32 / jnp.sqrt(jnp.sum(jnp.square(v32), axis=(0, 1)))
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    pad = conv_padding(self.kernel_size, self.dilation, self.padding)
    return layers.conv1d(x, kernel, self.dilation, pad, self.kernels) + bias


def keep_valid(x, mask):
  """Zeros padded frames so a convolution sees there what it sees past a sequence's end.

  A select, not a product: NaN or inf features in padding must not survive as NaN.
  """
  return x if mask is None else jnp.where(mask[..., None] > 0, x, 0).astype(x.dtype)


class TemporalBlock(nn.Module):
  """One TCN level: two dilated weight-normed convs + residual, as the authors' block."""
  features: int
  kernel_size: int
  dilation: int
  padding: str = "causal"
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  kernels: str = "auto"

  @nn.compact
  def __call__(self, x, mask=None, *, train: bool = False):  # [B, T, C_in], [B, T]
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype,
              kernels=self.kernels)
    conv = functools.partial(WeightNormConv, self.features, self.kernel_size, self.dilation,
                             self.padding, **kw)
    prelu = functools.partial(nn.PReLU, param_dtype=self.param_dtype,
                              negative_slope_init=0.25)
    drop = nn.Dropout(self.dropout, deterministic=not train)

    x = keep_valid(x, mask)
    y = drop(prelu(name="prelu1")(conv(name="conv1")(x)))  # [B, T, C_out]
    # With 'same' padding conv2 looks ahead: padded frames must be zeros again.
    y = drop(prelu(name="prelu2")(conv(name="conv2")(keep_valid(y, mask))))
    # The 1x1 Conv1d `downsample`: kernel [C_in, C_out] ~ N(0, 0.01), torch's bias init.
    residual = x if x.shape[-1] == self.features else layers.Dense(
        self.features, ("channels_in", "channels"), kernel_init=nn.initializers.normal(0.01),
        bias_init=torch_bias_init(x.shape[-1]), name="downsample", **kw)(x)
    return prelu(name="prelu_out")(y + residual)  # [B, T, C_out]


class TemporalConvNet(nn.Module):
  """Levels `level_{i}` with widths `channels` and dilation 2^i.

  Args of `__call__`: x [B, T, C_in]; mask [B, T] (1 = real frame) or None; train enables
  dropout (rng stream 'dropout'). Returns [B, T, channels[-1]], zero on padded frames.
  """
  channels: Sequence[int]
  kernel_size: int = 5
  padding: str = "causal"
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  kernels: str = "auto"

  @nn.compact
  def __call__(self, x, mask=None, *, train: bool = False):  # [B, T, C_in]
    if self.padding not in PADDINGS:
      raise ValueError(f"padding must be one of {PADDINGS}, got {self.padding!r}")
    x = x.astype(self.dtype)
    for i, width in enumerate(self.channels):
      x = TemporalBlock(width, self.kernel_size, 2 ** i, self.padding, self.dropout,
                        dtype=self.dtype, param_dtype=self.param_dtype,
                        kernels=self.kernels,
                        name=f"level_{i}")(x, mask, train=train)
    return keep_valid(x, mask)  # [B, T, channels[-1]]
