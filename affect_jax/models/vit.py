"""Vision Transformer pieces shared by the MAE and the frame classifier.

Parameter names follow timm / facebookresearch/mae (`patch_embed/proj`, `blocks_{i}/attn/qkv`,
`mlp/fc1`, `norm`, ...) so that public PyTorch checkpoints map onto them one to one
(`affect_jax.models.convert`). The MAE and `VisionTransformer` name the shared part
identically: `patch_embed`, `cls_token` and `encoder`.

Every parameter carries logical axis names ('embed', 'mlp', 'heads', 'kv', 'qkv', 'patch',
'classes'); the rules in `affect_jax.sharding` map them onto the mesh axes.
"""

import functools
import re
from typing import Any, Callable

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from affect_jax.models import layers

Dtype = Any

# Size presets (big_vision style). The MAE decoder is the paper's light one (512 x 8, 16
# heads) for every real size. `tiny` trains on two CPU cores at 64-112 px (64 px = 64
# tokens with patch 8); it is for tests and the demo, not for results.
VARIANTS = {
    "tiny": dict(patch_size=8, width=128, depth=4, num_heads=4, mlp_dim=512,
                 decoder_width=64, decoder_depth=2, decoder_num_heads=4,
                 decoder_mlp_dim=256),
    "base": dict(patch_size=16, width=768, depth=12, num_heads=12, mlp_dim=3072,
                 decoder_width=512, decoder_depth=8, decoder_num_heads=16,
                 decoder_mlp_dim=2048),
    "large": dict(patch_size=16, width=1024, depth=24, num_heads=16, mlp_dim=4096,
                  decoder_width=512, decoder_depth=8, decoder_num_heads=16,
                  decoder_mlp_dim=2048),
    "huge": dict(patch_size=14, width=1280, depth=32, num_heads=16, mlp_dim=5120,
                 decoder_width=512, decoder_depth=8, decoder_num_heads=16,
                 decoder_mlp_dim=2048),
}
DECODER_KEYS = ("decoder_width", "decoder_depth", "decoder_num_heads", "decoder_mlp_dim")


def variant_config(name: str, *, decoder: bool = True, **overrides) -> dict[str, Any]:
  """Module kwargs of a size preset, e.g. `MaskedAutoencoder(**variant_config('base'))`.

  `decoder=False` leaves out the MAE decoder's sizes, for `VisionTransformer`.
  """
  if name not in VARIANTS:
    raise ValueError(f"Unknown ViT variant {name!r}; known: {sorted(VARIANTS)}")
  config = dict(VARIANTS[name])
  if not decoder:
    config = {k: v for k, v in config.items() if k not in DECODER_KEYS}
  return {**config, **overrides}


def patchify(imgs, patch_size):
  """[B, H, W, C] images -> [B, N, p*p*C] patches, row-major over the grid.

  Each patch vector is ordered (row in patch, column in patch, channel), exactly as MAE's
  `nchpwq->nhwpqc` on NCHW images, so a converted `decoder_pred` predicts the same pixels.
  """
  return einops.rearrange(imgs, "b (h p) (w q) c -> b (h w) (p q c)",
                          p=patch_size, q=patch_size)


def unpatchify(patches, patch_size, grid=None):
  """Inverse of `patchify`: [B, N, p*p*C] -> [B, h*p, w*p, C]; `grid` (h, w) defaults square."""
  if grid is None:
    side = int(round(patches.shape[1] ** 0.5))
    grid = (side, side)
  return einops.rearrange(patches, "b (h w) (p q c) -> b (h p) (w q) c",
                          h=grid[0], w=grid[1], p=patch_size, q=patch_size)


def _sincos_1d(dim, pos):
  omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2))
  angles = np.outer(pos.reshape(-1), omega)  # [M, dim/2]
  return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def sincos_pos_embed_2d(width, grid, cls_token=True):
  """MAE's fixed 2-D sin-cos position embedding: [(1 +) h*w, width] float32 numpy constant.

  The first half of the channels encodes the column and the second half the row: MAE builds
  its grid with `np.meshgrid(grid_w, grid_h)`, and checkpoints were trained with that order.
  The CLS row is zeros.
  """
  if width % 4:
    raise ValueError(f"sin-cos position embedding needs width % 4 == 0, got {width}")
  rows, cols = np.meshgrid(np.arange(grid[0]), np.arange(grid[1]), indexing="ij")
  emb = np.concatenate([_sincos_1d(width // 2, cols), _sincos_1d(width // 2, rows)], axis=1)
  if cls_token:
    emb = np.concatenate([np.zeros([1, width]), emb], axis=0)
  return emb.astype(np.float32)


POS_EMBEDS = ("sincos", "learned")


def _cubic_weights(size_in: int, size_out: int, a: float = -0.75) -> np.ndarray:
  """[size_out, size_in] weights of 1-D bicubic interpolation as torch's
  `F.interpolate(mode='bicubic', align_corners=False)` computes it: Keys' kernel with
  a = -0.75, half-pixel centres, taps clamped at the borders, no antialiasing."""
  def kernel(x):
    x = abs(x)
    if x <= 1:
      return ((a + 2) * x - (a + 3)) * x * x + 1
    if x < 2:
      return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return 0.0
  w = np.zeros((size_out, size_in))
  for i in range(size_out):
    src = (i + 0.5) * size_in / size_out - 0.5
    base = int(np.floor(src))
    for tap in range(base - 1, base + 3):
      w[i, min(max(tap, 0), size_in - 1)] += kernel(src - tap)
  return w


def table_grid(rows: int) -> int | None:
  """The side of the square patch grid a position table of `rows` rows (CLS first) covers,
  or None when rows - 1 is not a square."""
  side = int(round(max(rows - 1, 0) ** 0.5))
  return side if side * side == rows - 1 else None


def resample_pos_embed(table: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
  """A learned [1 + h*w, D] position table (CLS row first, square grid) resampled to
  `grid` with torch's bicubic interpolation (what timm does when a ViT meets another image
  size); the CLS row is kept. Host numpy, float32."""
  table = np.asarray(table, np.float64)
  side = table_grid(table.shape[0])
  if side is None:
    raise ValueError(f"position table of {table.shape[0]} rows is not 1 + a square grid")
  if (side, side) == tuple(grid):
    return table.astype(np.float32)
  patches = table[1:].reshape(side, side, -1)
  patches = np.einsum("ih,hwd->iwd", _cubic_weights(side, grid[0]), patches)
  patches = np.einsum("jw,iwd->ijd", _cubic_weights(side, grid[1]), patches)
  return np.concatenate([table[:1], patches.reshape(-1, table.shape[1])]).astype(np.float32)


def layer_norm(name, param_dtype, epsilon: float = 1e-6, kernels: str = "auto"):
  """LayerNorm (`layers.LayerNorm`); eps 1e-6 as MAE/timm (torch's default is 1e-5).
  Statistics and output in float32 whatever the compute dtype; the next Dense casts."""
  return layers.LayerNorm(epsilon=epsilon, param_dtype=param_dtype, kernels=kernels, name=name)


class PatchEmbed(nn.Module):
  """Non-overlapping p x p patches -> width; a Dense on `patchify` output.

  Equivalent to timm's conv (kernel = stride = p); its [D, C, p, p] weight is the
  kernel [p*p*C, D] transposed to (p, q, c) order.
  """
  patch_size: int
  width: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  kernels: str = "auto"

  @nn.compact
  def __call__(self, imgs):  # [B, H, W, C]
    patches = patchify(imgs, self.patch_size)  # [B, N, p*p*C]
    return layers.Dense(
        self.width, ("patch", "embed"), dtype=self.dtype, param_dtype=self.param_dtype,
        kernels=self.kernels, name="proj")(patches)  # [B, N, D]


class DropPath(nn.Module):
  """Stochastic depth: drops a sample's whole residual branch with probability `rate`.

  `rate` given at call time overrides the field; it may be a traced scalar (the per-layer
  rate of a scanned stack of blocks)."""
  rate: float = 0.0

  @nn.compact
  def __call__(self, x, deterministic: bool, rate=None):
    rate = self.rate if rate is None else rate
    if deterministic or (isinstance(rate, (int, float)) and rate == 0.0):
      return x
    keep = 1.0 - rate
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    kept = jax.random.bernoulli(self.make_rng("dropout"), keep, shape)
    return jnp.where(kept, x / keep, 0).astype(x.dtype)


class MultiHeadSelfAttention(nn.Module):
  """timm's Attention (and torch's MultiheadAttention on one sequence): one fused qkv
  projection, softmax(q k^T / sqrt(hd)) v per head, an output projection.

  The qkv kernel is [D, 3, H, hd] rather than timm's flat [D, 3D] so that sharding 'heads'
  over the model axis gives every device whole heads of q, k and v alike. `mask` [B, N] bool
  (True = a real token) removes padded keys; `dropout` acts on the attention weights when
  training. The temporal model names the output projection 'out' and starts it with torch's
  Linear init; the ViT calls it 'proj' (timm).
  """
  num_heads: int
  dropout: float = 0.0
  out_name: str = "proj"
  out_init: Callable[..., Any] = nn.initializers.xavier_uniform()
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  kernels: str = "auto"

  @nn.compact
  def __call__(self, x, mask=None, *, train: bool = False):  # [B, N, D], [B, N] bool
    width = x.shape[-1]
    head_dim = width // self.num_heads
    dense = functools.partial(layers.Dense, dtype=self.dtype, param_dtype=self.param_dtype,
                              kernels=self.kernels)

    qkv = dense((3, self.num_heads, head_dim), ("embed", "qkv", "heads", "kv"),
                name="qkv")(x)  # [B, N, 3, H, hd]
    if mask is not None:
      mask = mask[:, None, None, :]
    keep = None
    if self.dropout and train:
      # nn.Dropout's own mask (same rng stream and shape as dropping the weights directly).
      b, n, _, h, _ = qkv.shape
      keep = nn.Dropout(self.dropout, deterministic=False)(
          jnp.ones((b, h, n, n), jnp.float32)) > 0
    # [B, N, H, hd]
    out = layers.attention(qkv, mask=mask, dropout_keep=keep, dropout_rate=self.dropout,
                           kernels=self.kernels)
    return dense(width, ("heads", "kv", "embed"), in_axes=2, kernel_init=self.out_init,
                 name=self.out_name)(out)


class MlpBlock(nn.Module):
  """fc1 -> exact (erf) GELU, as torch's nn.GELU default (`layers.gelu`) -> fc2."""
  mlp_dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  kernels: str = "auto"

  @nn.compact
  def __call__(self, x):  # [B, N, D]
    dense = functools.partial(layers.Dense, dtype=self.dtype, param_dtype=self.param_dtype,
                              kernels=self.kernels)
    h = dense(self.mlp_dim, ("embed", "mlp"), name="fc1")(x)  # [B, N, mlp]
    h = layers.gelu(h, self.kernels)
    return dense(x.shape[-1], ("mlp", "embed"), name="fc2")(h)


class Encoder1DBlock(nn.Module):
  """Pre-LN transformer block: x + attn(LN(x)), then x + mlp(LN(x)), each with drop-path.

  `drop_path_rate` at call time overrides the field (a scanned stack passes each layer's).
  `scan_body=True` returns (x, None), the form `nn.scan` iterates.
  """
  num_heads: int
  mlp_dim: int
  drop_path_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  kernels: str = "auto"
  scan_body: bool = False

  @nn.compact
  def __call__(self, x, deterministic: bool, drop_path_rate=None):  # [B, N, D]
    rate = self.drop_path_rate if drop_path_rate is None else drop_path_rate
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype,
              kernels=self.kernels)
    # The residual stream stays float32 (as under torch autocast); branches may be bf16. It
    # is split over the batch only (`sharding.ACTIVATION_AXES`, where a step sets the rules).
    residual = lambda x: nn.with_logical_constraint(x, ("batch", "length", "act_embed"))
    x = residual(x)
    y = layer_norm("norm1", self.param_dtype, kernels=self.kernels)(x)
    y = MultiHeadSelfAttention(self.num_heads, name="attn", **kw)(y)
    x = residual(x + DropPath()(y, deterministic, rate))
    y = layer_norm("norm2", self.param_dtype, kernels=self.kernels)(x)
    y = MlpBlock(self.mlp_dim, name="mlp", **kw)(y)
    x = residual(x + DropPath()(y, deterministic, rate))
    return (x, None) if self.scan_body else x


# Rematerialisation of the encoder blocks (`remat`): what the backward pass may keep from the
# forward instead of recomputing it. 'full' keeps only each block's input; 'dots_saveable'
# keeps the matmul outputs and recomputes the cheap elementwise work (GELU, LayerNorm, softmax).
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def drop_path_rates(depth: int, rate: float) -> np.ndarray:
  """Per-block drop-path rates, growing linearly from 0 to `rate` over depth (timm/MAE)."""
  return np.array([rate * i / max(depth - 1, 1) for i in range(depth)], np.float32)


class Encoder(nn.Module):
  """`depth` blocks and, if `final_norm`, a LayerNorm (`norm`).

  Drop-path rates grow linearly from 0 to `drop_path_rate` over depth (`drop_path_rates`).
  `remat` (REMAT_POLICIES) trades the blocks' activation memory for recomputation.
  `scan_layers=False` unrolls the blocks (`blocks_{i}`, the timm/MAE layout);
  `scan_layers=True` runs one block under `nn.scan` over parameters stacked on a leading
  'layers' axis (`blocks`, every leaf [depth, ...]), which compiles one block instead of
  `depth` of them. The function is the same whatever they are; `stack_blocks` /
  `unstack_blocks` move parameters between the two layouts (`load_mae_encoder` does it for
  pretrained weights). Dropout/drop-path draw other random numbers under scan.
  """
  depth: int
  num_heads: int
  mlp_dim: int
  drop_path_rate: float = 0.0
  final_norm: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  kernels: str = "auto"
  remat: str = "none"
  scan_layers: bool = False

  @nn.compact
  def __call__(self, x, *, deterministic: bool):  # [B, N, D]
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"remat must be one of {sorted(REMAT_POLICIES)}, got {self.remat!r}")
    block = Encoder1DBlock
    if self.remat != "none":
      # Under scan, CSE cannot merge the recomputation into the forward anyway (MaxText).
      block = nn.remat(Encoder1DBlock, policy=REMAT_POLICIES[self.remat], static_argnums=(2,),
                       prevent_cse=not self.scan_layers)
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, kernels=self.kernels)
    rates = drop_path_rates(self.depth, self.drop_path_rate)
    x = x.astype(jnp.float32)
    if self.scan_layers:
      blocks = nn.scan(block, variable_axes={"params": 0},
                       split_rngs={"params": True, "dropout": True},
                       in_axes=(nn.broadcast, 0), length=self.depth,
                       metadata_params={nn.PARTITION_NAME: "layers"})
      x, _ = blocks(self.num_heads, self.mlp_dim, scan_body=True, name="blocks", **kw)(
          x, deterministic, jnp.asarray(rates))
    else:
      for i in range(self.depth):
        x = block(self.num_heads, self.mlp_dim, float(rates[i]), name=f"blocks_{i}", **kw)(
            x, deterministic)
    if self.final_norm:
      x = layer_norm("norm", self.param_dtype, kernels=self.kernels)(x)
    return x  # [B, N, D] float32


_BLOCK_KEY = re.compile(r"blocks_(\d+)$")


def _stack(leaves):
  if all(isinstance(a, np.ndarray) for a in leaves):
    return np.stack(leaves)
  if all(isinstance(a, jax.ShapeDtypeStruct) for a in leaves):
    return jax.ShapeDtypeStruct((len(leaves),) + leaves[0].shape, leaves[0].dtype)
  return jnp.stack(leaves)


def _take(leaf, i):
  if isinstance(leaf, jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct(leaf.shape[1:], leaf.dtype)
  return leaf[i]


def stack_blocks(tree):
  """Unrolled -> scanned layout: in every dict, `blocks_0..blocks_{L-1}` become one `blocks`
  whose leaves are stacked on a leading [L] axis. Leaves: arrays or ShapeDtypeStructs
  (unboxed)."""
  if not isinstance(tree, dict):
    return tree
  out = {k: stack_blocks(v) for k, v in tree.items() if not _BLOCK_KEY.match(k)}
  indices = sorted(int(_BLOCK_KEY.match(k).group(1)) for k in tree if _BLOCK_KEY.match(k))
  if indices:
    if indices != list(range(len(indices))):
      raise ValueError(f"blocks {indices} are not 0..{len(indices) - 1}: cannot stack them")
    if "blocks" in out:
      raise ValueError("both 'blocks' and 'blocks_{i}' entries: mixed layouts")
    out["blocks"] = jax.tree.map(lambda *xs: _stack(xs), *[tree[f"blocks_{i}"] for i in indices])
  return out


def unstack_blocks(tree):
  """Scanned -> unrolled layout, the inverse of `stack_blocks`."""
  if not isinstance(tree, dict):
    return tree
  out = {k: unstack_blocks(v) for k, v in tree.items() if k != "blocks"}
  if "blocks" in tree:
    depth = {np.shape(leaf)[0] for leaf in jax.tree.leaves(tree["blocks"])}
    if len(depth) != 1:
      raise ValueError(f"scanned blocks with different leading sizes {sorted(depth)}")
    for i in range(depth.pop()):
      out[f"blocks_{i}"] = jax.tree.map(lambda leaf: _take(leaf, i), tree["blocks"])
  return out


def is_scanned(tree) -> bool:
  """Whether a params tree (or subtree) holds a scanned stack of blocks anywhere."""
  if not isinstance(tree, dict):
    return False
  return "blocks" in tree or any(is_scanned(v) for v in tree.values())


def to_layout(tree, scanned: bool):
  """`tree` in the scanned (`stack_blocks`) or unrolled (`unstack_blocks`) layout."""
  return stack_blocks(tree) if scanned else unstack_blocks(tree)


def cls_token_param(module: nn.Module, width: int, param_dtype: Dtype):
  """MAE's learned CLS token, [1, 1, D], init N(0, 0.02)."""
  return module.param(
      "cls_token",
      nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, None, "embed")),
      (1, 1, width), param_dtype)


class VisionTransformer(nn.Module):
  """The MAE encoder without masking, pooled, with an optional linear head.

  `pool='cls'` reads the normed CLS token (MAE linear probe / timm default); `pool='mean'`
  averages the patch tokens and applies `fc_norm` with no final encoder norm (MAE
  fine-tuning's global pool). Returns [B, num_classes] logits, or [B, D] features when
  `num_classes == 0`; float32 either way.

  `pos_embed='sincos'`: MAE's fixed 2-D table for any image size; 'learned': a `pos_embed`
  param [1, 1 + N, D] (timm's supervised ViTs) for the grid of the images it is initialised
  with (`resample_pos_embed` fits a checkpoint's table to another grid).
  """
  patch_size: int
  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  num_classes: int = 0
  pool: str = "cls"
  drop_path_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  kernels: str = "auto"
  remat: str = "none"  # REMAT_POLICIES
  scan_layers: bool = False  # Encoder: blocks under nn.scan, params stacked
  pos_embed: str = "sincos"  # POS_EMBEDS

  @nn.compact
  def __call__(self, imgs, *, train: bool = False):  # [B, H, W, C]
    if self.pool not in ("cls", "mean"):
      raise ValueError(f"pool must be 'cls' or 'mean', got {self.pool!r}")
    if self.pos_embed not in POS_EMBEDS:
      raise ValueError(f"pos_embed must be one of {POS_EMBEDS}, got {self.pos_embed!r}")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype,
              kernels=self.kernels)
    grid = (imgs.shape[1] // self.patch_size, imgs.shape[2] // self.patch_size)
    if self.pos_embed == "sincos":
      pos = sincos_pos_embed_2d(self.width, grid)  # [1 + N, D]
    else:
      rows = 1 + grid[0] * grid[1]
      if self.has_variable("params", "pos_embed"):
        have = np.shape(nn.unbox(self.get_variable("params", "pos_embed")))
        if have[1] != rows:
          raise ValueError(f"a learned position table of {have[1] - 1} patches for "
                           f"{grid[0]}x{grid[1]} patches: resample it (vit.resample_pos_embed, "
                           "or convert_weights.py --image_size) for this image size")
      pos = self.param(
          "pos_embed", nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                    (None, None, "embed")),
          (1, rows, self.width), self.param_dtype)[0]

    x = PatchEmbed(self.patch_size, self.width, name="patch_embed", **kw)(imgs)
    x = x + pos[1:]  # [B, N, D]
    cls = cls_token_param(self, self.width, self.param_dtype) + pos[:1]
    x = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, self.width)), x], axis=1)
    x = Encoder(self.depth, self.num_heads, self.mlp_dim, self.drop_path_rate,
                final_norm=self.pool == "cls", name="encoder", remat=self.remat,
                scan_layers=self.scan_layers, **kw)(
                    x, deterministic=not train)  # [B, 1 + N, D]

    if self.pool == "cls":
      x = x[:, 0]
    else:
      x = layer_norm("fc_norm", self.param_dtype, kernels=self.kernels)(x[:, 1:].mean(axis=1))
    if self.num_classes:
      # MAE fine-tuning starts the head near zero (trunc-normal, std 2e-5).
      x = layers.Dense(self.num_classes, ("embed", "classes"), name="head",
                       kernel_init=nn.initializers.truncated_normal(2e-5), **kw)(x)
    return x.astype(jnp.float32)


def load_mae_encoder(params, mae_params):
  """`params` of a VisionTransformer with the MAE's `patch_embed`, `cls_token`, `encoder`
  (and `pos_embed`, a learned table, when both have one: one without the other is an error).

  Keeps the classifier's own entries (head, fc_norm), drops the MAE's final encoder norm
  when the classifier has none (mean pooling), and stacks or unstacks the blocks to the
  classifier's layout (`scan_layers`), whichever the MAE was trained with.
  """
  def pick(template, source, path):
    if isinstance(template, dict):
      if not isinstance(source, dict):
        raise ValueError(f"{path}: a dict in the classifier, {type(source).__name__} in the MAE")
      missing = sorted(set(template) - set(source))
      if missing:
        raise ValueError(f"{path}: {missing} missing from the MAE's params")
      return {k: pick(v, source[k], f"{path}/{k}") for k, v in template.items()}
    if np.shape(template) != np.shape(source):
      raise ValueError(f"{path}: shape {np.shape(source)} in the MAE, "
                       f"{np.shape(template)} in the classifier")
    return source

  params = dict(params)
  if ("pos_embed" in params) != ("pos_embed" in mae_params):
    raise ValueError(
        "the weights have a learned position table (pos_embed) and the classifier does not: "
        "set config.model.pos_embed='learned'" if "pos_embed" in mae_params else
        "the classifier has a learned position table (config.model.pos_embed='learned') and "
        "the weights do not: use pos_embed='sincos' for MAE weights")
  keys = ("patch_embed", "cls_token", "encoder") + (("pos_embed",) if "pos_embed" in params else ())
  for key in keys:
    template, source = nn.unbox(params[key]), nn.unbox(mae_params[key])
    if key == "encoder":
      source = to_layout(source, is_scanned(template))
    params[key] = pick(template, source, key)
  return params
