"""The XLA:CPU kernels (`affect_jax.models.cpu_kernels`) against float64 numpy and hand
derivations, and the switch (`layers.kernels`): the stock path against numpy, and every model
the same function on both kernel sets."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from affect_jax.models import cpu_kernels, layers, mae, tcn, temporal, vit
from tests.models.test_vit import IMG, TINY


# ---- The float32-accumulating bf16 matmul ----


def _dot_dtypes(jaxpr):
  """(lhs, rhs, out) dtypes of every dot_general in a (closed) jaxpr, nested ones included."""
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      found.append((eqn.invars[0].aval.dtype, eqn.invars[1].aval.dtype,
                    eqn.outvars[0].aval.dtype))
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          sub = sub.jaxpr
        if isinstance(sub, jax.extend.core.Jaxpr):
          found += _dot_dtypes(sub)
  return found


@pytest.mark.parametrize("spec,a_shape,b_shape", [
    ("bnk,kf->bnf", (2, 5, 8), (8, 6)),
    ("bhqd,bhkd->bhqk", (2, 3, 5, 4), (2, 3, 7, 4)),
])
def test_einsum_f32acc_matches_einsum_values_and_gradients(spec, a_shape, b_shape):
  ka, kb, kg = jax.random.split(jax.random.key(0), 3)
  a, b = jax.random.normal(ka, a_shape), jax.random.normal(kb, b_shape)
  g = jax.random.normal(kg, jnp.einsum(spec, a, b).shape)

  def loss(f, a, b):
    return jnp.sum(f(a, b).astype(jnp.float32) * g)

  ref = lambda a, b: jnp.einsum(spec, a, b, precision="highest")
  fast = lambda a, b: cpu_kernels.einsum_f32acc(spec, a, b)
  np.testing.assert_allclose(fast(a, b), ref(a, b), rtol=1e-5, atol=1e-5)
  for got, want in zip(jax.grad(loss, (1, 2))(fast, a, b), jax.grad(loss, (1, 2))(ref, a, b)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)

  # bf16 operands: close to the float32 result, and every dot is bf16 x bf16 -> f32.
  ab, bb = a.astype(jnp.bfloat16), b.astype(jnp.bfloat16)
  np.testing.assert_allclose(fast(ab, bb).astype(jnp.float32), ref(a, b), rtol=0.05, atol=0.1)
  for got, want in zip(jax.grad(loss, (1, 2))(fast, ab, bb), jax.grad(loss, (1, 2))(ref, a, b)):
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(got.astype(jnp.float32), want, rtol=0.05, atol=0.15)
  jaxpr = jax.make_jaxpr(jax.grad(loss, (1, 2)), static_argnums=0)(fast, ab, bb).jaxpr
  bf16, f32 = jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)
  assert _dot_dtypes(jaxpr) == [(bf16, bf16, f32)] * 3  # forward and both backward dots


@pytest.mark.parametrize("kernels", ["cpu", "xla"])
def test_float32_operands_in_bf16_get_unrounded_float32_gradients(kernels):
  # A float32 kernel multiplied in bf16 (what Dense does), on either kernel set: its gradient
  # is the float32 accumulation of the bf16 cotangent and bf16 input, never rounded to bf16
  # on the way (so data-parallel devices sum it in float32), and all three products take
  # bf16 operands.
  ka, kb, kg = jax.random.split(jax.random.key(3), 3)
  x, w = jax.random.normal(ka, (4, 6, 16)), jax.random.normal(kb, (16, 8))
  g = jax.random.normal(kg, (4, 6, 8))
  bf = jnp.bfloat16
  f = lambda x, w: jnp.sum(layers.einsum("bnk,kf->bnf", x, w, kernels=kernels,
                                         compute_dtype=bf).astype(jnp.float32) * g)
  dx, dw = jax.grad(f, (0, 1))(x, w)
  assert dx.dtype == dw.dtype == jnp.float32
  # By hand, in numpy float64 from the bf16-rounded operands (exact products, f32-size sums).
  r = lambda a: np.asarray(jnp.asarray(a).astype(bf).astype(jnp.float32), np.float64)
  gb = r(g.astype(bf))
  np.testing.assert_allclose(dw, np.einsum("bnf,bnk->kf", gb, r(x)), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(dx, np.einsum("bnf,kf->bnk", gb, r(w)), rtol=1e-6, atol=1e-6)
  assert np.any(np.asarray(dw) != r(dw))  # bits below bf16's mantissa survive
  bf16 = jnp.dtype(bf)
  dots = _dot_dtypes(jax.make_jaxpr(jax.grad(f, (0, 1)))(x, w).jaxpr)
  assert len(dots) == 3 and all(d[:2] == (bf16, bf16) for d in dots)


@pytest.mark.parametrize("add_bias", [layers.add_bias, cpu_kernels.add_bias],
                         ids=["xla", "cpu"])
def test_a_float32_bias_of_a_bf16_layer_gets_an_unrounded_float32_gradient(add_bias):
  # y + bias in y's dtype; the bias gradient is the float32 sum of the cotangent over the
  # leading axes (the stock set keeps trailing ones, e.g. heads, as they are).
  rng = np.random.default_rng(5)
  y = jnp.asarray(rng.normal(size=(4, 6, 3, 5)), jnp.bfloat16)
  bias = jnp.asarray(rng.normal(size=(3, 5)), jnp.float32)
  g = jnp.asarray(rng.normal(size=(4, 6, 3, 5)), jnp.bfloat16)
  out, vjp = jax.vjp(add_bias, y, bias)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_array_equal(out, y + bias.astype(jnp.bfloat16))
  dy, dbias = vjp(g)
  assert dy.dtype == jnp.bfloat16 and dbias.dtype == jnp.float32
  np.testing.assert_array_equal(dy, g)
  want = np.asarray(g, np.float64).sum(axis=(0, 1))
  np.testing.assert_allclose(dbias, want, rtol=1e-6, atol=1e-6)
  rounded = np.asarray(jnp.asarray(want, jnp.bfloat16), np.float64)
  assert np.any(np.asarray(dbias, np.float64) != rounded)  # not rounded to bf16


@pytest.mark.parametrize("kernels", ["cpu", "xla"])
def test_a_bf16_dense_gives_its_float32_params_float32_gradients(kernels):
  rng = np.random.default_rng(6)
  dense = layers.Dense(5, ("embed", "mlp"), dtype=jnp.bfloat16, kernels=kernels)
  x = jnp.asarray(rng.normal(size=(4, 6, 8)), jnp.float32)
  params = nn.unbox(dense.init(jax.random.key(0), x)["params"])
  loss = lambda p: jnp.sum(dense.apply({"params": p}, x).astype(jnp.float32) * x[..., :5])
  grads = jax.grad(loss)(params)
  assert grads["kernel"].dtype == grads["bias"].dtype == jnp.float32
  r = lambda a: np.asarray(jnp.asarray(a).astype(jnp.bfloat16), np.float64)
  np.testing.assert_allclose(grads["bias"], r(x[..., :5]).sum(axis=(0, 1)), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(grads["kernel"], np.einsum("bnk,bnf->kf", r(x), r(x[..., :5])),
                             rtol=1e-6, atol=1e-5)


def test_unit_contraction_picks_the_batched_and_tn_products():
  unit = cpu_kernels._unit_contraction
  assert unit("bnk,kf->bnf") is None  # a Dense forward: canonical
  assert unit("bnf,kf->bnk") is None  # its input gradient: contracts both minor axes
  assert unit("bnf,bnk->fk") is None  # its 3-D weight gradient: two contracted axes
  assert unit("mk,mn->kn") == ("amk,amn->kn", 0, 0)  # a 2-D weight gradient (TN)
  assert unit("bhqk,bhqd->bhkd") == ("bhaqk,bhaqd->bhkd", 2, 2)  # p^T dO
  assert unit("bhqd,bhkd->bhqk") == ("bhqad,bhkad->bhqk", 3, 3)  # batched q k^T
  assert unit("bhqk,bhkd->bhqd") == ("bhqak,bhakd->bhqd", 3, 2)  # batched p v


@pytest.mark.parametrize("spec,a_shape,b_shape", [
    ("mk,mn->kn", (40, 24), (40, 16)),
    ("bhqk,bhkd->bhqd", (2, 3, 9, 11), (2, 3, 11, 8)),
])
def test_unit_contraction_keeps_bf16_values_and_gradients_exact(spec, a_shape, b_shape):
  # By hand in float64 from the bf16-rounded operands: the extra unit axis changes nothing
  # beyond float32 summation order, forward and backward.
  ka, kb, kg = jax.random.split(jax.random.key(7), 3)
  bf = jnp.bfloat16
  a, b = jax.random.normal(ka, a_shape).astype(bf), jax.random.normal(kb, b_shape).astype(bf)
  out = cpu_kernels.einsum_f32acc(spec, a, b, out_dtype=jnp.float32)
  g = jax.random.normal(kg, out.shape).astype(bf).astype(jnp.float32)
  r = lambda x: np.asarray(jnp.asarray(x).astype(jnp.float32), np.float64)
  np.testing.assert_allclose(out, np.einsum(spec, r(a), r(b)), rtol=1e-5, atol=1e-5)
  da, db = jax.grad(lambda a, b: jnp.sum(
      cpu_kernels.einsum_f32acc(spec, a, b, out_dtype=jnp.float32) * g), (0, 1))(a, b)
  ins, o = spec.split("->")
  sa, sb = ins.split(",")
  # bf16 gradients: the float64 value rounded once (at most half a bf16 ulp, 2^-8 relative).
  np.testing.assert_allclose(r(da), np.einsum(f"{o},{sb}->{sa}", r(g), r(b)), rtol=2 ** -8,
                             atol=1e-2)
  np.testing.assert_allclose(r(db), np.einsum(f"{o},{sa}->{sb}", r(g), r(a)), rtol=2 ** -8,
                             atol=1e-2)


def test_unit_contraction_keeps_xla_cpu_tn_products_in_bf16():
  # What the unit axis is for: as written, XLA:CPU converts both bf16 operands of a TN
  # product to float32 (its slow path); with it, neither operand is ever upcast.
  a = jnp.ones((64, 48), jnp.bfloat16)
  b = jnp.ones((64, 32), jnp.bfloat16)
  upcast = lambda f: any(f"f32[{n},{m}]" in f.lower(a, b).compile().as_text()
                         for n, m in ((64, 48), (64, 32)))
  plain = jax.jit(lambda a, b: jnp.einsum("mk,mn->kn", a, b,
                                          preferred_element_type=jnp.float32))
  fast = jax.jit(lambda a, b: cpu_kernels.einsum_f32acc("mk,mn->kn", a, b, out_dtype=jnp.float32))
  assert not upcast(fast)
  if jax.default_backend() == "cpu":
    assert upcast(plain), "XLA:CPU no longer upcasts TN bf16 products: the unit axis may go"


def _np_attention_and_grads(q, k, v, g, mask, keep, rate):
  """Attention and its gradients by hand in float64: the textbook softmax backward
  dS = P * (dP - rowsum(P * dP)), not the output-based row sums the VJP uses."""
  q, k, v, g = (np.asarray(x, np.float64) for x in (q, k, v, g))
  scale = q.shape[-1] ** -0.5
  s = np.einsum("bhqd,bhkd->bhqk", q, k) * scale
  if mask is not None:
    s = np.where(mask, s, np.finfo(np.float32).min)
  p = np.exp(s - s.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  m = np.ones_like(p) if keep is None else np.where(keep, 1 / (1 - rate), 0.0)
  out = np.einsum("bhqk,bhkd->bhqd", p * m, v)
  dv = np.einsum("bhqk,bhqd->bhkd", p * m, g)
  dp = np.einsum("bhqd,bhkd->bhqk", g, v) * m
  ds = p * (dp - (p * dp).sum(-1, keepdims=True))
  if mask is not None:
    ds = np.where(mask, ds, 0.0)
  dq = np.einsum("bhqk,bhkd->bhqd", ds, k) * scale
  dk = np.einsum("bhqk,bhqd->bhkd", ds, q) * scale
  return out, (dq, dk, dv)


def _mask_and_keep(key, b, h, n, masked: bool, dropout: bool):
  """(key mask [b, 1, 1, n] or None, attention-dropout keep [b, h, n, n] or None, rate). The
  mask keeps 4 keys of sample 0, all of sample 1 and none of sample 2 (uniform weights)."""
  mask = keep = None
  if masked:
    mask = jnp.asarray(np.arange(n)[None] < np.array([4, n, 0])[:, None])[:, None, None, :]
  rate = 0.3 if dropout else 0.0
  if dropout:
    keep = jax.random.bernoulli(key, 1 - rate, (b, h, n, n))
  return mask, keep, rate


@pytest.mark.parametrize("masked,dropout", [(False, False), (True, False), (True, True)])
def test_dot_product_attention_matches_numpy_values_and_gradients(masked, dropout):
  b, h, n, d = 3, 2, 7, 4
  kq, kk, kv, kg, km, kd = jax.random.split(jax.random.key(11), 6)
  q, k, v = (jax.random.normal(key, (b, h, n, d)) for key in (kq, kk, kv))
  g = jax.random.normal(kg, (b, h, n, d))
  mask, keep, rate = _mask_and_keep(kd, b, h, n, masked, dropout)
  attn = lambda q, k, v: cpu_kernels.dot_product_attention(q, k, v, mask=mask, dropout_keep=keep,
                                                      dropout_rate=rate)
  out, vjp = jax.vjp(attn, q, k, v)
  want, want_grads = _np_attention_and_grads(q, k, v, g, mask, keep, rate)
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
  for got, ref in zip(vjp(g), want_grads):
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)
  if masked:  # a removed key gets no gradient, a sequence with no keys none at all
    dq, dk, dv = vjp(g)
    assert np.all(np.asarray(dk)[0, :, 4:] == 0) and np.all(np.asarray(dq)[2] == 0)
  # bf16 operands: close to the float32 values, and every product bf16 x bf16 -> f32.
  qb, kb, vb = (x.astype(jnp.bfloat16) for x in (q, k, v))
  outb, vjpb = jax.vjp(attn, qb, kb, vb)
  assert outb.dtype == jnp.bfloat16
  np.testing.assert_allclose(outb.astype(jnp.float32), want, rtol=0.05, atol=0.05)
  for got, ref in zip(vjpb(g.astype(jnp.bfloat16)), want_grads):
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(got.astype(jnp.float32), ref, rtol=0.1, atol=0.1)
  loss = lambda q, k, v: jnp.sum(attn(q, k, v).astype(jnp.float32) * g)
  bf16, f32 = jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)
  dots = _dot_dtypes(jax.make_jaxpr(jax.grad(loss, (0, 1, 2)))(qb, kb, vb).jaxpr)
  assert dots == [(bf16, bf16, f32)] * 6  # q k^T and p v; dp, dq, dk and dv


@pytest.mark.parametrize("masked,dropout", [(False, False), (True, True)])
def test_qkv_attention_takes_a_packed_token_major_qkv(masked, dropout):
  b, n, h, d = 3, 7, 2, 4
  kx, kg, kd = jax.random.split(jax.random.key(12), 3)
  qkv = jax.random.normal(kx, (b, n, 3, h, d))  # a fused projection's output
  g = jax.random.normal(kg, (b, n, h, d))
  mask, keep, rate = _mask_and_keep(kd, b, h, n, masked, dropout)
  heads = lambda x: np.swapaxes(np.asarray(x), 1, 2)  # [B, N, H, d] <-> [B, H, N, d]
  want, (dq, dk, dv) = _np_attention_and_grads(
      *(heads(qkv[:, :, i]) for i in range(3)), heads(g), mask, keep, rate)
  want_dqkv = np.stack([heads(dq), heads(dk), heads(dv)], axis=2)
  attn = lambda qkv: cpu_kernels.qkv_attention(qkv, mask=mask, dropout_keep=keep,
                                               dropout_rate=rate)
  out, vjp = jax.vjp(attn, qkv)
  assert out.shape == (b, n, h, d)
  np.testing.assert_allclose(out, heads(want), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(vjp(g)[0], want_dqkv, rtol=1e-4, atol=1e-5)
  # bf16 in, bf16 cotangent out (the model's path).
  attn = lambda qkv: cpu_kernels.qkv_attention(qkv, mask=mask, dropout_keep=keep, dropout_rate=rate)
  out, vjp = jax.vjp(attn, qkv.astype(jnp.bfloat16))
  (dqkv,) = vjp(g.astype(jnp.bfloat16))
  assert out.dtype == dqkv.dtype == jnp.bfloat16
  np.testing.assert_allclose(dqkv.astype(jnp.float32), want_dqkv, rtol=0.1, atol=0.1)


def test_gelu_is_torchs_exact_formula_with_its_derivative():
  from scipy import special
  x = np.linspace(-8, 8, 2001, dtype=np.float32)
  x64 = x.astype(np.float64)
  cdf, pdf = 0.5 * (1 + special.erf(x64 / np.sqrt(2))), np.exp(-x64 ** 2 / 2) / np.sqrt(2 * np.pi)
  # float32's 1 + erf loses the far negative tail's few 1e-7 (as torch's kernel does).
  np.testing.assert_allclose(cpu_kernels.gelu(jnp.asarray(x)), x64 * cdf, rtol=2e-6, atol=1e-6)
  grad = jax.vmap(jax.grad(cpu_kernels.gelu))(jnp.asarray(x))
  np.testing.assert_allclose(grad, cdf + x64 * pdf, rtol=1e-5, atol=1e-6)
  # The same function as jax's erfc-based exact GELU (not the tanh approximation).
  np.testing.assert_allclose(cpu_kernels.gelu(jnp.asarray(x)), jax.nn.gelu(x, approximate=False),
                             atol=1e-6)
  # bf16 in, bf16 out: the float32 value rounded once.
  xb = jnp.asarray(x).astype(jnp.bfloat16)
  assert cpu_kernels.gelu(xb).dtype == jnp.bfloat16
  np.testing.assert_array_equal(cpu_kernels.gelu(xb),
                                cpu_kernels.gelu(xb.astype(jnp.float32)).astype(jnp.bfloat16))
  # Its gradient (a hand rule): float32 Phi(x) + x phi(x) at the bf16 input, times the
  # cotangent, rounded once to bf16.
  xb64 = np.asarray(xb, np.float64)
  cdfb = 0.5 * (1 + special.erf(xb64 / np.sqrt(2)))
  pdfb = np.exp(-xb64 ** 2 / 2) / np.sqrt(2 * np.pi)
  g = jnp.linspace(-2, 2, x.size).astype(jnp.bfloat16)
  _, vjp = jax.vjp(cpu_kernels.gelu, xb)
  (gradb,) = vjp(g)
  assert gradb.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(gradb, np.float64),
                             np.asarray(g, np.float64) * (cdfb + xb64 * pdfb),
                             rtol=2 ** -8, atol=1e-6)


def test_layer_norm_matches_numpy_values_and_finite_difference_gradients():
  rng = np.random.default_rng(0)
  x = (rng.standard_normal((2, 3, 8)) * 3 + 1).astype(np.float32)
  scale = (1 + 0.3 * rng.standard_normal(8)).astype(np.float32)
  bias = (0.1 * rng.standard_normal(8)).astype(np.float32)
  w = rng.standard_normal((2, 3, 8))
  eps = 1e-6

  def ref(x, scale, bias):  # float64 numpy, two-pass variance (torch's LayerNorm)
    mean = x.mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(((x - mean) ** 2).mean(-1, keepdims=True) + eps) * scale + bias

  got = cpu_kernels.layer_norm(jnp.asarray(x), jnp.asarray(scale), jnp.asarray(bias), eps)
  assert got.dtype == jnp.float32
  args64 = [a.astype(np.float64) for a in (x, scale, bias)]
  np.testing.assert_allclose(got, ref(*args64), rtol=1e-5, atol=1e-5)
  # The same function as flax's LayerNorm on the same params (and the same param tree).
  module = layers.LayerNorm(epsilon=eps)
  params = module.init(jax.random.key(0), jnp.asarray(x))
  assert jax.tree.map(jnp.shape, nn.unbox(params)) == {"params": {"scale": (8,), "bias": (8,)}}
  flax_params = {"params": {"scale": jnp.asarray(scale), "bias": jnp.asarray(bias)}}
  np.testing.assert_allclose(module.apply(flax_params, jnp.asarray(x)),
                             nn.LayerNorm(epsilon=eps).apply(flax_params, jnp.asarray(x)),
                             rtol=1e-5, atol=1e-5)

  # The hand VJP against central differences of the float64 reference, for all three inputs.
  loss = lambda x, s, b: jnp.sum(cpu_kernels.layer_norm(x, s, b, eps) * jnp.asarray(w, jnp.float32))
  grads = jax.grad(loss, argnums=(0, 1, 2))(jnp.asarray(x), jnp.asarray(scale), jnp.asarray(bias))
  h = 1e-6
  for i, grad in enumerate(grads):
    numeric = np.zeros(args64[i].shape)
    for idx in np.ndindex(args64[i].shape):
      up = [a.copy() for a in args64]
      down = [a.copy() for a in args64]
      up[i][idx] += h
      down[i][idx] -= h
      numeric[idx] = ((ref(*up) - ref(*down)) * w).sum() / (2 * h)
    np.testing.assert_allclose(grad, numeric, rtol=1e-4, atol=1e-5)
  # A bf16 input (not the model's case, the residual stream is float32) gets a bf16 gradient.
  gb = jax.grad(lambda x: loss(x, scale, bias))(jnp.asarray(x, jnp.bfloat16))
  assert gb.dtype == jnp.bfloat16
  # Each parameter's gradient in its own dtype (a bf16 bias beside a float32 scale).
  _, dscale, dbias = jax.grad(loss, argnums=(0, 1, 2))(
      jnp.asarray(x), jnp.asarray(scale), jnp.asarray(bias, jnp.bfloat16))
  assert dscale.dtype == jnp.float32 and dbias.dtype == jnp.bfloat16
  np.testing.assert_allclose(dbias.astype(jnp.float32), grads[2], rtol=1e-2, atol=1e-2)


def test_dot_general_f32acc_is_a_drop_in_for_flax_dense():
  x = jax.random.normal(jax.random.key(0), (2, 3, 8))
  plain = nn.Dense(4)
  fast = nn.Dense(4, dot_general=cpu_kernels.dot_general_f32acc)
  params = plain.init(jax.random.key(1), x)
  np.testing.assert_allclose(fast.apply(params, x), plain.apply(params, x), rtol=1e-5, atol=1e-6)
  general = nn.DenseGeneral((2, 2), axis=(-2, -1), dot_general=cpu_kernels.dot_general_f32acc)
  params = general.init(jax.random.key(2), x)
  ref = jnp.einsum("bnk,nkf->bf", x, params["params"]["kernel"].reshape(3, 8, 4))
  np.testing.assert_allclose(general.apply(params, x).reshape(2, 4),
                             ref + params["params"]["bias"].reshape(4), rtol=1e-5, atol=1e-5)


def test_bf16_model_uses_the_fast_dot_everywhere():
  model = vit.VisionTransformer(**TINY, num_classes=3, dtype=jnp.bfloat16, kernels="cpu")
  imgs = jnp.zeros((2, IMG, IMG, 3))
  params = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), imgs)["params"])
  loss = lambda p: model.apply({"params": p}, imgs).sum()
  dots = _dot_dtypes(jax.make_jaxpr(jax.grad(loss))(params).jaxpr)
  bf16, f32 = jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)
  # 4 Dense + 2 attention matmuls per block, patch embed and head; 3 dots each.
  assert len(dots) == 3 * (6 * TINY["depth"] + 2)
  assert set(dots) == {(bf16, bf16, f32)}
  slow = vit.VisionTransformer(**TINY, num_classes=3, dtype=jnp.bfloat16, kernels="xla")
  slow_dots = _dot_dtypes(jax.make_jaxpr(jax.grad(
      lambda p: slow.apply({"params": p}, imgs).sum()))(params).jaxpr)
  assert (bf16, bf16, bf16) in set(slow_dots)


# ---- Winograd convolution ----


@pytest.mark.parametrize("length,dilation,kernel_size,padding", [
    (37, 4, 5, "causal"), (37, 2, 3, "same"), (300, 1, 5, "same"), (11, 8, 5, "causal"),
    (5, 1, 5, "same"), (23, 3, 7, "causal")])
def test_winograd_conv_equals_the_direct_convolution(length, dilation, kernel_size, padding):
  rng = np.random.default_rng(6)
  x = jnp.asarray(rng.normal(size=(2, length, 6)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(kernel_size, 6, 7)), jnp.float32)
  pad = tcn.conv_padding(kernel_size, dilation, padding)
  direct = jax.lax.conv_general_dilated(x, kernel, (1,), [pad], rhs_dilation=(dilation,),
                                        dimension_numbers=("NWC", "WIO", "NWC"))
  fast = cpu_kernels.winograd_conv(x, kernel, dilation, pad)
  np.testing.assert_allclose(fast, direct, atol=1e-5 * float(jnp.abs(direct).max()))


# ---- The switch, and the stock path against the CPU kernels ----


def test_kernel_choice_resolves_per_backend():
  assert layers.resolve("auto", "cpu") == "cpu"
  assert layers.resolve("auto", "gpu") == layers.resolve("auto", "tpu") == "auto"
  assert [layers.resolve(k, "cpu") for k in ("xla", "cudnn", "cpu")] == ["xla", "cudnn", "cpu"]
  with pytest.raises(ValueError, match="kernels must be one of"):
    layers.resolve("fast")


@pytest.mark.parametrize("masked,dropout", [(False, False), (True, False), (True, True)])
def test_stock_attention_matches_numpy_values_and_gradients(masked, dropout):
  b, n, h, d = 3, 7, 2, 4
  kx, kg, kd = jax.random.split(jax.random.key(13), 3)
  qkv = jax.random.normal(kx, (b, n, 3, h, d))
  g = jax.random.normal(kg, (b, n, h, d))
  mask, keep, rate = _mask_and_keep(kd, b, h, n, masked, dropout)
  heads = lambda x: np.swapaxes(np.asarray(x), 1, 2)
  want, (dq, dk, dv) = _np_attention_and_grads(
      *(heads(qkv[:, :, i]) for i in range(3)), heads(g), mask, keep, rate)
  want_dqkv = np.stack([heads(dq), heads(dk), heads(dv)], axis=2)
  attn = lambda qkv: layers.attention(qkv, mask=mask, dropout_keep=keep, dropout_rate=rate,
                                      kernels="xla")
  out, vjp = jax.vjp(attn, qkv)
  np.testing.assert_allclose(out, heads(want), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(vjp(g)[0], want_dqkv, rtol=1e-4, atol=1e-5)
  out, vjp = jax.vjp(attn, qkv.astype(jnp.bfloat16))
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(out.astype(jnp.float32), heads(want), rtol=0.05, atol=0.05)
  np.testing.assert_allclose(vjp(g.astype(jnp.bfloat16))[0].astype(jnp.float32), want_dqkv,
                             rtol=0.1, atol=0.1)
  if dropout:
    with pytest.raises(ValueError, match="cuDNN attention has no attention dropout"):
      layers.attention(qkv, mask=mask, dropout_keep=keep, dropout_rate=rate, kernels="cudnn")


def test_stock_gelu_layer_norm_and_conv_equal_the_cpu_kernels():
  rng = np.random.default_rng(4)
  x = jnp.asarray(rng.normal(size=(3, 5, 8)) * 3, jnp.float32)
  scale, bias = jnp.asarray(1 + 0.3 * rng.normal(size=8), jnp.float32), jnp.asarray(rng.normal(size=8), jnp.float32)
  for f in (lambda x, k: layers.gelu(x, k), lambda x, k: layers.layer_norm(x, scale, bias, 1e-6, k)):
    cpu, vjp_cpu = jax.vjp(lambda x: f(x, "cpu"), x)
    xla, vjp_xla = jax.vjp(lambda x: f(x, "xla"), x)
    np.testing.assert_allclose(cpu, xla, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(vjp_cpu(x)[0], vjp_xla(x)[0], rtol=1e-4, atol=1e-4)
  kernel = jnp.asarray(rng.normal(size=(5, 8, 4)), jnp.float32)
  for dtype in (jnp.float32, jnp.bfloat16):
    conv = lambda k: layers.conv1d(x.astype(dtype), kernel.astype(dtype), 2, (8, 0), k)
    assert conv("xla").dtype == conv("cpu").dtype == dtype
    tol = 1e-4 if dtype == jnp.float32 else 0.05
    np.testing.assert_allclose(conv("xla").astype(jnp.float32), conv("cpu").astype(jnp.float32),
                               rtol=tol, atol=tol * float(jnp.abs(conv("xla")).max()))


def _relative_error(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12)


def _models():
  """(name, module factory of kernels and dtype, inputs, apply kwargs) of every model."""
  rng = np.random.default_rng(9)
  imgs = jnp.asarray(rng.uniform(size=(2, IMG, IMG, 3)), jnp.float32)
  feats = {"visual": jnp.asarray(rng.normal(size=(2, 24, 12)), jnp.float32),
           "audio": jnp.asarray(rng.normal(size=(2, 24, 6)), jnp.float32)}
  mask = jnp.asarray(np.arange(24)[None] < np.array([24, 17])[:, None], jnp.float32)
  return [
      ("vit", lambda k, dt: vit.VisionTransformer(**TINY, num_classes=3, pool="mean",
                                                  dtype=dt, kernels=k), (imgs,), {}),
      ("mae", lambda k, dt: mae.MaskedAutoencoder(**TINY, decoder_width=16, decoder_depth=1,
                                                  decoder_num_heads=2, decoder_mlp_dim=32,
                                                  dtype=dt, kernels=k), (imgs,), "mae"),
      ("tcn", lambda k, dt: tcn.TemporalConvNet((8, 6), 5, dtype=dt, kernels=k),
       (feats["visual"], mask), {}),
      ("temporal", lambda k, dt: temporal.make_temporal_model(
          2, tcn_channels=(32, 16), d_model=32, num_layers=2, num_heads=2, ff_dim=64, modalities=("visual", "audio"), dtype=dt, kernels=k),
       (feats, mask), {}),
  ]


# The ViT and the temporal model hold every block (the MAE is ViT blocks; the temporal model
# has the TCN, its transformer and the head); the MAE and the TCN alone are in _models too.
@pytest.mark.parametrize("name", ["vit", "temporal"])
def test_every_model_is_the_same_function_on_both_kernel_sets(name):
  """Same params, kernels 'cpu' and 'xla': outputs and parameter gradients agree, float32 to
  rounding, bfloat16 to its precision."""
  (_, make, inputs, kind), = [m for m in _models() if m[0] == name]
  model = make("xla", jnp.float32)
  extra = {"train": False} if kind == "mae" else {}
  variables = model.init({"params": jax.random.key(0), "masking": jax.random.key(1)}, *inputs,
                         **extra)
  params = nn.unbox(variables["params"])
  others = {k: v for k, v in variables.items() if k != "params"}

  def scalar(kernels, dtype):
    m = make(kernels, dtype)

    def f(p):
      if kind == "mae":
        loss, _, _ = m.apply({"params": p}, *inputs, train=False,
                             rngs={"masking": jax.random.key(2)})
        return loss.astype(jnp.float32)
      out = m.apply({"params": p, **others}, *inputs)
      out = out if isinstance(out, jax.Array) else jax.tree.leaves(out)[0]
      return jnp.sum(jnp.sin(jnp.arange(out.size).reshape(out.shape)) * out.astype(jnp.float32))
    return jax.jit(jax.value_and_grad(f))(params)

  flat = lambda g: np.concatenate([np.ravel(x) for x in jax.tree.leaves(g)])
  (v_cpu, g_cpu), (v_xla, g_xla) = scalar("cpu", jnp.float32), scalar("xla", jnp.float32)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(g_cpu) + jax.tree.leaves(g_xla))
  assert _relative_error(v_cpu, v_xla) < 1e-5
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g_cpu), jax.tree.leaves(g_xla)):
    assert _relative_error(a, b) < 3e-4, jax.tree_util.keystr(path)
  # bfloat16: the two sets differ by rounding, and neither is further from float32.
  ref = flat(g_cpu)
  (vb_cpu, gb_cpu), (vb_xla, gb_xla) = scalar("cpu", jnp.bfloat16), scalar("xla", jnp.bfloat16)
  err_cpu, err_xla = _relative_error(flat(gb_cpu), ref), _relative_error(flat(gb_xla), ref)
  assert err_cpu < 0.1 and err_xla < 0.1, (err_cpu, err_xla)
  assert err_xla < 1.5 * err_cpu + 2e-3 and err_cpu < 1.5 * err_xla + 2e-3, (err_cpu, err_xla)
  assert _relative_error(flat(gb_cpu), flat(gb_xla)) < 0.05
  assert abs(float(vb_cpu) - float(vb_xla)) < 0.05 * abs(float(v_cpu)) + 0.05
