"""XLA:CPU kernels: the model's matmuls, attention, GELU, LayerNorm, bias and TCN
convolution as they run fastest on a CPU, chosen by `kernels="cpu"` (or "auto" on a CPU
host) in `affect_jax.models.layers`; the models never call this module themselves.

Each is the same function as its stock counterpart in `layers` (tests/models/test_cpu_kernels.py
checks values and gradients against float64 numpy and against the stock path), written for
XLA:CPU on AVX-512 with avx512_bf16 (DESIGN.md, Performance):

- A bf16 x bf16 matmul that returns bf16 runs slower than float32 on XLA:CPU, while the
  same operands with `preferred_element_type=float32` take its fast bf16 kernel. Autodiff of
  such a dot gives float32 cotangents, so both backward dots would run in float32;
  `einsum_f32acc` (`mixed_precision.cast_einsum` on this product) casts the cotangent back
  to the compute dtype and asks for a float32 result again, so all three matmuls of a layer
  take the fast path. The operands are cast inside the rule, so a float32 kernel's gradient
  leaves the accumulator in float32 (unrounded, as on the stock set). Batched and TN products
  get a unit contracted axis (`_unit_contraction`) so that XLA:CPU keeps them on the bf16
  kernel too.
- `dot_product_attention` / `qkv_attention`: attention on these products with a hand VJP.
- `gelu` and `layer_norm` have hand VJPs for the passes autodiff of them costs on XLA:CPU;
  `add_bias` a flat bias-gradient sum (autodiff's reduce over leading axes is a tree of
  reduce-windows there).
- `conv1d`: float32 TCN convolutions by Winograd F(4, 5) (`winograd_conv`), 2.5x fewer
  multiplications. Its tiles mix a few neighbouring frames that cancel exactly only in exact
  arithmetic, so 'causal' holds to float32 rounding (~1e-7 relative), not bit for bit; padded
  frames are zeros and never leak.

On GPU and TPU these would cost (a reshaped bias gradient all-gathers a sharded activation
gradient, Winograd loses accuracy under bf16 matmul precision, no flash attention), which is
why "auto" picks them on CPU only.
"""

import functools
import string

import jax
import jax.numpy as jnp
import numpy as np

from affect_jax.models import mixed_precision


def is_low_precision(dtype) -> bool:
  return dtype is not None and jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16),
                                                    jnp.dtype(jnp.float16))


def _unit_contraction(spec):
  """`spec` with a unit index contracted beside its one contracted index, and the axis to
  insert in each operand, for the products XLA:CPU would take off its bf16 path; else None.

  Those are the products with a single contracted index that are batched (attention's
  q k^T, p v and their gradients) or contract a major axis of both operands (the 'TN'
  form: p^T dO, or a weight gradient x^T g of 2-D activations). As written, XLA:CPU runs
  them with both operands converted to float32, on its slower float32 kernels; a product
  contracting two axes is instead canonicalised with one transposed bf16 copy onto the fast
  bf16 kernel. The unit axis changes no value, only that path. Dense layers' 3-D products
  already contract two axes or are canonical, and a unit axis there would only move
  transposes onto the weights, so they are left as written.
  """
  sa, sb, so = mixed_precision.split_spec(spec)
  contracted = [c for c in sa if c in sb and c not in so]
  if len(contracted) != 1:
    return None
  c = contracted[0]
  batched = any(x in sb and x in so for x in sa)
  if not batched and c in (sa[-1], sb[-1]):
    return None
  unit = next(x for x in string.ascii_letters if x not in spec)
  return (f"{sa.replace(c, unit + c)},{sb.replace(c, unit + c)}->{so}",
          sa.index(c), sb.index(c))


def _einsum_f32(spec, a, b):
  """jnp.einsum accumulated in float32; low-precision operands stay on the fast bf16 path.

  The unit axis is for XLA:CPU's canonicalisation only; GPU and TPU dots take transposed
  operands natively, so elsewhere the product is left as written.
  """
  if (is_low_precision(a.dtype) and is_low_precision(b.dtype)
      and jax.default_backend() == "cpu"):
    unit = _unit_contraction(spec)
    if unit is not None:
      spec, ia, ib = unit
      a, b = jnp.expand_dims(a, ia), jnp.expand_dims(b, ib)
  return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


def _f32acc_product(spec, a, b, dtype):
  """The product of `mixed_precision.cast_einsum` on XLA:CPU: accumulated and returned in
  float32 (its fast bf16 path), then cast to `dtype`."""
  return _einsum_f32(spec, a, b).astype(dtype)


def einsum_f32acc(spec, a, b, out_dtype=None, compute_dtype=None):
  """`jnp.einsum(spec, a, b)` accumulated in float32, in the forward and both backward dots.

  Args:
    spec: a two-operand einsum without ellipsis, e.g. 'bhqd,bhkd->bhqk'.
    a, b: operands, usually bfloat16, or float32 parameters / activations to be multiplied
      in `compute_dtype`.
    out_dtype: result dtype; defaults to the compute dtype. Attention logits ask for float32
      so the softmax never sees a rounded input.
    compute_dtype: the dtype both operands are cast to for the three matmuls (default: the
      operands' promoted dtype). The cast is inside the rule, so each operand's cotangent
      comes back in that operand's own dtype straight from the float32 accumulator: a
      float32 kernel used in bf16 gets an unrounded float32 gradient, with no convert pass.
  """
  return mixed_precision.cast_einsum(spec, a, b, _f32acc_product, compute_dtype, out_dtype)


def _dropout(x, keep, rate):
  """x with attention dropout's kept entries scaled by 1 / (1 - rate), the rest zeroed."""
  return x if keep is None else jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def _attention_forward(q, k, v, mask, keep, rate, product):
  """(output, probabilities in the compute dtype); `product(spec, a, b)` does both matmuls."""
  logits = product("bhqd,bhkd->bhqk", q * q.shape[-1] ** -0.5, k).astype(jnp.float32)
  if mask is not None:
    # A finite floor rather than -inf: a row with no real key gets uniform weights (its
    # outputs are all padding) instead of NaNs that would reach the gradients.
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  out = product("bhqk,bhkd->bhqd", _dropout(probs, keep, rate), v).astype(v.dtype)
  return out, probs


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(rate, q, k, v, mask, keep):
  return _attention_fwd(rate, q, k, v, mask, keep)[0]


def _attention_fwd(rate, q, k, v, mask, keep):
  out, probs = _attention_forward(q, k, v, mask, keep, rate, _einsum_f32)
  return out, (q, k, v, out, probs, mask, keep)


def _attention_grads(rate, res, g):
  """(dq, dk, dv) as the products' float32 accumulators, heads-major."""
  q, k, v, out, probs, mask, keep = res
  g = g.astype(v.dtype)
  dprobs = _dropout(_einsum_f32("bhqd,bhkd->bhqk", g, v), keep, rate)
  # The softmax backward's row sum: sum_k p * dp = sum_d g * out (flash attention's
  # identity, dropout included), a pass over [N, d] instead of one over [N, N].
  rows = jnp.sum(g.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
  dlogits = probs.astype(jnp.float32) * (dprobs - rows)
  if mask is not None:
    dlogits = jnp.where(mask, dlogits, 0)
  dlogits = (dlogits * q.shape[-1] ** -0.5).astype(q.dtype)
  dq = _einsum_f32("bhqk,bhkd->bhqd", dlogits, k)
  dk = _einsum_f32("bhqk,bhqd->bhkd", dlogits, q)
  dv = _einsum_f32("bhqk,bhqd->bhkd", _dropout(probs, keep, rate), g)
  return dq, dk, dv


def _attention_bwd(rate, res, g):
  dq, dk, dv = _attention_grads(rate, res, g)
  return dq.astype(res[0].dtype), dk.astype(res[1].dtype), dv.astype(res[2].dtype), None, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def _heads(x):
  """Token-major [B, N, H, d] <-> heads-major [B, H, N, d]."""
  return jnp.swapaxes(x, 1, 2)


def _unpack_qkv(qkv):
  """Heads-major q, k, v from a packed token-major qkv [B, N, 3, H, d]."""
  return tuple(_heads(qkv[:, :, i]) for i in range(3))


def _qkv_attention_fwd(rate, qkv, mask, keep):
  q, k, v = _unpack_qkv(qkv)
  out, probs = _attention_forward(q, k, v, mask, keep, rate, _einsum_f32)
  return _heads(out), (q, k, v, out, probs, mask, keep)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _qkv_attention(rate, qkv, mask, keep):
  return _qkv_attention_fwd(rate, qkv, mask, keep)[0]


def _qkv_attention_bwd(rate, res, g):
  grads = _attention_grads(rate, res, _heads(g))
  # One stacking pass writes the packed cotangent; autodiff of the three slices made it a sum
  # of three padded copies.
  return jnp.stack([_heads(d) for d in grads], axis=2).astype(res[0].dtype), None, None


_qkv_attention.defvjp(_qkv_attention_fwd, _qkv_attention_bwd)


def dot_product_attention(q, k, v, *, mask=None, dropout_keep=None, dropout_rate: float = 0.0):
  """softmax(q k^T / sqrt(d)) v for heads-major [B, H, N, d] q, k, v, with a hand VJP.

  Logits and softmax are float32 whatever the compute dtype (q, k, v's); the probabilities
  are rounded to it for the p v product, and all six products (two forward, four backward)
  accumulate in float32 (on the bf16 kernel for low-precision inputs, `_einsum_f32`). The
  backward rule takes the softmax's row sums from the output (sum_d dO * O, as flash
  attention does), where autodiff of the same forward reduces over the [N, N]
  probabilities.

  Args:
    mask: bool, broadcastable to [B, H, N, N]; False removes a key.
    dropout_keep: bool [B, H, N, N] or None; the weights kept by attention dropout, whose
      survivors are scaled by 1 / (1 - dropout_rate).
  """
  return _attention(float(dropout_rate), q, k, v, mask, dropout_keep)


def qkv_attention(qkv, *, mask=None, dropout_keep=None, dropout_rate: float = 0.0):
  """`dot_product_attention` on a packed token-major qkv [B, N, 3, H, d] (a fused qkv
  projection's output), returning token-major [B, N, H, d].

  The heads are rearranged inside the rule, and the backward writes the packed qkv cotangent
  in one stacking pass, where differentiating slices of qkv would sum three padded copies.
  `mask` and `dropout_keep` are as in `dot_product_attention` (heads-major shapes).
  """
  return _qkv_attention(float(dropout_rate), qkv, mask, dropout_keep)


def dot_general_f32acc(lhs, rhs, dimension_numbers, precision=None,
                       preferred_element_type=None):
  """A drop-in `lax.dot_general` (e.g. for `nn.Dense(dot_general=...)`) via einsum_f32acc.

  The result has the operands' dtype, as flax expects; only the accumulation is float32.
  """
  del precision, preferred_element_type  # Accumulation is float32 by construction.
  (lc, rc), (lb, rb) = dimension_numbers
  letters = iter(string.ascii_letters)
  sa = [next(letters) for _ in range(lhs.ndim)]
  sb = [next(letters) for _ in range(rhs.ndim)]
  for i, j in zip(tuple(lc) + tuple(lb), tuple(rc) + tuple(rb)):
    sb[j] = sa[i]
  # lax.dot_general's output order: batch dims, lhs free dims, rhs free dims.
  out = ([sa[i] for i in lb]
         + [s for i, s in enumerate(sa) if i not in lc and i not in lb]
         + [s for j, s in enumerate(sb) if j not in rc and j not in rb])
  spec = f"{''.join(sa)},{''.join(sb)}->{''.join(out)}"
  return einsum_f32acc(spec, lhs, rhs)


def _normal_cdf(x32):
  return 0.5 * (1.0 + jax.lax.erf(x32 * np.float32(2 ** -0.5)))


@jax.custom_vjp
def gelu(x):
  """Exact GELU as torch's `nn.GELU()` computes it: x/2 (1 + erf(x/sqrt 2)), in float32.

  `jax.nn.gelu(approximate=False)` goes through erfc, which XLA:CPU evaluates at a higher
  cost than erf. The result has x's dtype; for bf16 inputs only the final value is rounded.
  The gradient, Phi(x) + x phi(x), is recomputed from x in the backward pass: autodiff would
  keep the forward's float32 erf(x) for it, an [M, 4D] float32 buffer written and read
  again. Reverse mode only, like any `jax.custom_vjp`.
  """
  x32 = x.astype(jnp.float32)
  return (x32 * _normal_cdf(x32)).astype(x.dtype)


def _gelu_fwd(x):
  return gelu(x), x


def _gelu_bwd(x, g):
  x32 = x.astype(jnp.float32)
  pdf = jnp.exp(-0.5 * x32 * x32) * np.float32((2 * np.pi) ** -0.5)
  return ((g.astype(jnp.float32) * (_normal_cdf(x32) + x32 * pdf)).astype(x.dtype),)


gelu.defvjp(_gelu_fwd, _gelu_bwd)


def _layer_norm_fwd(x, scale, bias, epsilon):
  x32 = x.astype(jnp.float32)
  mean = jnp.mean(x32, axis=-1, keepdims=True)
  rstd = jax.lax.rsqrt(jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True) + epsilon)
  return (x32 - mean) * rstd * scale + bias, (x, mean, rstd, scale, bias)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def layer_norm(x, scale, bias, epsilon):
  """LayerNorm over the last axis in float32, (x - mean) / sqrt(var + eps) * scale + bias.

  The variance is the two-pass mean of squared deviations (torch's; flax's default is
  E[x^2] - E[x]^2). A hand VJP keeps only x and the per-row mean and 1/std: autodiff of
  the same forward had XLA:CPU materialise the broadcast statistics and the scale as full
  [M, D] arrays and reduce the parameter gradients over the leading axes. The result is
  float32; x's gradient has x's dtype.
  """
  return _layer_norm_fwd(x, scale, bias, epsilon)[0]


def _layer_norm_bwd(epsilon, res, g):
  del epsilon
  x, mean, rstd, scale, bias = res
  xhat = (x.astype(jnp.float32) - mean) * rstd
  g = g.astype(jnp.float32)
  gs = g * scale
  dx = rstd * (gs - jnp.mean(gs, axis=-1, keepdims=True)
               - xhat * jnp.mean(gs * xhat, axis=-1, keepdims=True))
  width = x.shape[-1]
  dscale = (g * xhat).reshape(-1, width).sum(axis=0)
  dbias = g.reshape(-1, width).sum(axis=0)
  return dx.astype(x.dtype), dscale.astype(scale.dtype), dbias.astype(bias.dtype)


layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


@jax.custom_vjp
def add_bias(y, bias):
  """`y + bias` over trailing dims, the bias cast to y's dtype, whose bias gradient is one
  flat [M, F] column sum in float32, returned in the bias's dtype (a float32 bias of a bf16
  layer gets it unrounded, as on the stock set).

  Autodiff's reduce over the leading (batch, token) axes becomes a slow tree of
  reduce-windows on XLA:CPU; the flat sum is one pass.
  """
  return y + bias.astype(y.dtype)


def _add_bias_fwd(y, bias):
  return add_bias(y, bias), bias


def _add_bias_bwd(bias, g):
  db = g.reshape(-1, bias.size).astype(jnp.float32).sum(axis=0)
  return g, db.reshape(bias.shape).astype(bias.dtype)


add_bias.defvjp(_add_bias_fwd, _add_bias_bwd)


# Winograd / Toom-Cook F(m, k) over 8 points: 0, +-1, +-2, +-1/2 and infinity. These keep the
# transforms well conditioned (float32 results within ~3e-6 of a direct convolution).
WINOGRAD_POINTS = (0.0, 1.0, -1.0, 2.0, -2.0, 0.5, -0.5)


@functools.lru_cache(maxsize=None)
def winograd_matrices(kernel_size: int):
  """(A^T [m, a], G [a, k], B^T [a, a]) of F(m, k), m = a - k + 1, a = 8.

  For one tile s of a inputs, the m correlation outputs y_i = sum_j g_j s_{i+j} are
  A^T [(G g) * (B^T s)]: polynomial evaluation at the points, a pointwise product, and
  interpolation back, transposed from convolution to correlation (Lavin & Gray 2016).
  """
  num = len(WINOGRAD_POINTS) + 1
  m = num - kernel_size + 1

  def evaluate(n):  # [a, n]: an n-coefficient polynomial at the points and at infinity
    rows = [[p ** j for j in range(n)] for p in WINOGRAD_POINTS]
    return np.array(rows + [[0.0] * (n - 1) + [1.0]])

  return (evaluate(m).T.astype(np.float32), evaluate(kernel_size).astype(np.float32),
          np.linalg.inv(evaluate(num)).T.astype(np.float32))


def _ceil_div(a: int, b: int) -> int:
  return -(-a // b)


def winograd_conv(x, kernel, dilation: int, padding: tuple[int, int]):
  """`conv1d` by Winograd's minimal filtering: F(4, 5) costs 8 channel matmuls per 4
  outputs where the direct convolution costs 20.

  A dilated convolution is `dilation` interleaved undilated ones (the polyphase split), so
  tiles are cut from each phase. Each tile of a inputs gives m outputs.
  """
  batch, length, channels = x.shape
  k = kernel.shape[0]
  at, g, bt = winograd_matrices(k)
  num, m = bt.shape[0], at.shape[0]
  tiles_per_phase = _ceil_div(_ceil_div(length, dilation), m)
  span = tiles_per_phase * m  # outputs per phase, rounded up to whole tiles
  # Zeros on the right beyond `padding` only reach outputs past `length`, which are cut.
  total = (span + k - 1) * dilation
  xp = jnp.pad(x, ((0, 0), (padding[0], total - length - padding[0]), (0, 0)))
  phases = xp.reshape(batch, -1, dilation, channels)  # [B, T'/d, d, C]: phase p = [:, :, p]
  tiles = jnp.stack([phases[:, i:i + span:m] for i in range(num)])  # [a, B, n, d, C]
  v = jnp.einsum("ai,ibnpc->abnpc", bt, tiles).reshape(num, -1, channels)  # [a, N, C]
  u = jnp.einsum("aj,jco->aco", g, kernel)  # [a, C, O]
  # The whole cost: a batched matmul with the point axis leading, [a, N, C] x [a, C, O].
  prod = jax.lax.dot_general(v, u, (((2,), (1,)), ((0,), (0,))))  # [a, N, O]
  prod = prod.reshape(num, batch, tiles_per_phase, dilation, -1)
  y = jnp.einsum("ia,abnpo->bnipo", at, prod)  # [B, n, m, d, O]: time = (n*m + i)*d + p
  return y.reshape(batch, span * dilation, -1)[:, :length]


def conv1d(x, kernel, dilation: int, padding: tuple[int, int]):
  """[B, T, C_in] * [k, C_in, C_out] -> [B, T, C_out], zero padded along T.

  Float32 kernels of 3-7 taps take Winograd's algorithm (`winograd_conv`), which needs fewer
  multiplications than XLA:CPU's direct convolution. Low-precision inputs keep the direct
  convolution, accumulated in float32: the transforms would round bfloat16 tiles that they
  scale by up to 2^6.
  """
  low = is_low_precision(x.dtype)
  if not low and 3 <= kernel.shape[0] <= 7:
    return winograd_conv(x, kernel, dilation, padding)
  y = jax.lax.conv_general_dilated(
      x, kernel, window_strides=(1,), padding=[padding], rhs_dilation=(dilation,),
      dimension_numbers=("NWC", "WIO", "NWC"),
      preferred_element_type=jnp.float32 if low else None)
  return y.astype(x.dtype)
