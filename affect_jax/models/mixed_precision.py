"""Products in a low-precision compute dtype whose operands get their gradients in their own
dtypes, for both kernel sets (`layers` and `cpu_kernels` supply the product itself).

`cast_einsum` casts its operands to the compute dtype inside its VJP rule rather than
before it, so each operand's cotangent leaves the backward product's float32 accumulator in
that operand's own dtype: a float32 parameter multiplied in bf16 gets a float32 gradient,
never rounded to bf16. Autodiff of the cast would round it, and a data-parallel (or FSDP)
step would then sum it across devices in bf16 (XLA:TPU does; jax-ml/jax#27496), where
PyTorch's DDP and Megatron sum float32. All three products take compute-dtype operands.
"""

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np


def split_spec(spec: str) -> tuple[str, str, str]:
  """(a, b, out) index strings of a plain bilinear two-operand einsum spec, whose operands'
  gradients are einsums of (out, the other operand); any other spec is refused."""
  inputs, out = spec.split("->")
  a, b = inputs.split(",")
  for operand, other in ((a, b), (b, a)):
    # The backward einsums rebuild an operand from (out, other operand): an index summed
    # within one operand alone, or repeated in it, would be lost.
    if len(set(operand)) != len(operand) or not set(operand) <= set(out) | set(other):
      raise ValueError(f"a hand-differentiated einsum takes plain bilinear specs, got {spec!r}")
  return a, b, out


def _cast_einsum_fwd(spec, dtypes, product, a, b):
  """(result, the operands cast to the compute dtype): the cast copies are the residuals."""
  compute, out, _, _ = dtypes
  a, b = a.astype(compute), b.astype(compute)
  return product(spec, a, b, out), (a, b)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _cast_einsum(spec, dtypes, product, a, b):
  return _cast_einsum_fwd(spec, dtypes, product, a, b)[0]


def _cast_einsum_bwd(spec, dtypes, product, res, g):
  compute, _, a_dtype, b_dtype = dtypes
  a, b = res
  sa, sb, so = split_spec(spec)
  g = g.astype(compute)
  return product(f"{so},{sb}->{sa}", g, b, a_dtype), product(f"{so},{sa}->{sb}", g, a, b_dtype)


_cast_einsum.defvjp(_cast_einsum_fwd, _cast_einsum_bwd)


def cast_einsum(spec: str, a, b, product: Callable, compute_dtype=None, out_dtype=None):
  """`einsum(spec, a, b)` with both operands cast to `compute_dtype` (default: their promoted
  dtype), the result in `out_dtype` (default: the compute dtype), each operand's gradient in
  its own dtype (module doc). `product(spec, x, y, dtype)` multiplies two compute-dtype
  operands with float32 accumulation and returns `dtype`."""
  split_spec(spec)
  if compute_dtype is None:
    compute_dtype = jnp.promote_types(a.dtype, b.dtype)
  if out_dtype is None:
    out_dtype = compute_dtype
  dtypes = tuple(np.dtype(d) for d in (compute_dtype, out_dtype, a.dtype, b.dtype))
  return _cast_einsum(spec, dtypes, product, a, b)
