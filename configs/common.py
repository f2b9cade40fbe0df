"""Fields every stage shares: where the dataset lives and what it looks like.

Task configs call `get_data_config()` and override fields, e.g.
`--config.data.root=/path/to/affwild2`.
"""

import ml_collections

from affect_jax import sharding
from affect_jax.data import affwild2, loaders

# Where launchers write (and read) the embedded synthetic dataset when no root is given.
DEFAULT_SYNTHETIC_ROOT = "/tmp/affect_jax/synthetic"


def get_data_config() -> ml_collections.ConfigDict:
  data = ml_collections.ConfigDict()
  # An Aff-Wild2 tree (cropped_aligned/, *_Challenge/, audio/) - real or synthetic.
  data.root = DEFAULT_SYNTHETIC_ROOT
  # Frames per second of the videos (Aff-Wild2 is mostly 30; the synthetic set's default).
  data.fps = 30.0
  # Pixel size frames are resized to before they enter a model.
  data.image_size = 112
  # Label rows vs frame images (affwild2.check_frames): the largest fraction of a video's
  # frames that may be unmatched (images past the last label row, label rows past the last
  # image) before its annotation is refused as not belonging to its frames.
  data.max_unmatched_frames = affwild2.MAX_UNMATCHED_FRAMES
  return data


def add_image_loader(data: ml_collections.ConfigDict) -> None:
  """Fields of the stages that read images (pretraining, fine-tuning, extraction)."""
  # 'folders' (the trees as they are) or 'tfds' (ArrayRecord datasets built once by
  # launch/build_tfds.py; the same records, read in large chunks: affect_jax.data.sources).
  data.source = "folders"
  # source='tfds': the aff_wild2_frames dataset directory (<data_dir>/aff_wild2_frames/1.0.0).
  data.tfds_dir = ""
  # grain worker processes decoding and cropping: -1 sizes them from the host's cores (none
  # on a CPU backend, whose cores run the model), 0 decodes in the training process.
  data.worker_count = -1
  # Threads reading and decoding in each of those processes; raise it for storage with a
  # long latency per read (a bucket).
  data.read_threads = loaders.READ_THREADS
  # Batches put on the devices ahead of the step, from a background thread (0: none).
  data.prefetch = 2


def add_augmentation(data: ml_collections.ConfigDict, crop_scale: tuple[float, float]) -> None:
  """MAE's training augmentation (pretraining, fine-tuning): random-resized crop + flip."""
  data.crop_scale = crop_scale
  data.flip = True
  # Where the crop-resize and flip run: 'host' (the loader, PIL) or 'device' (the jitted
  # step, affect_jax.data.augment: the loader only decodes, for hosts whose CPUs cannot keep
  # the accelerators busy). The same boxes and flips; pixels within one level of each other.
  data.augment = "host"
  # augment='device': the square size images reach the device at (0: image_size); images of
  # another size are resized to it on the host first. Aff-Wild2's crops are 112.
  data.source_size = 0


def set_vit_scale(c: ml_collections.ConfigDict, preset: str) -> None:
  """Memory and scale fields of a ViT stage (pretraining, fine-tuning), with the defaults of
  its size: bfloat16 compute for base/large/huge (params, optimizer state, losses stay
  float32), and for large/huge the weights sharded over every device (FSDP, mesh
  (1, -1, 1)) rather than replicated."""
  big = preset in ("base", "large", "huge")
  c.model.dtype = "bfloat16" if big else "float32"
  # Activation rematerialisation of the transformer blocks: none | full | dots_saveable
  # (models.vit.REMAT_POLICIES); the same function, less memory, more compute.
  c.model.remat = "none"
  # Run the blocks under nn.scan (params stacked on a leading 'layers' axis): one block to
  # compile instead of depth of them. On for the deep large/huge; checkpoints keep their
  # layout, `vit.load_mae_encoder` and the converter map between the two.
  c.model.scan_layers = preset in ("large", "huge")
  # The gradient of one optimizer step as the mean over this many micro-batches (each of
  # batch_size / grad_accum_steps, split over the devices): a large batch in less memory.
  c.grad_accum_steps = 1
  # Trace this many steps (after the first, which compiles) into <workdir>/profile.
  c.profile_steps = 0
  add_steps_per_call(c)
  c.mesh_shape = (1, -1, 1) if preset in ("large", "huge") else (-1, 1, 1)


def add_steps_per_call(c: ml_collections.ConfigDict) -> None:
  """Train steps per jitted call (loop.TrainStep.calls): the same steps, their per-call
  costs paid once per n. Worth 4 or so on a CPU host, where XLA:CPU allocates and the
  kernel zeroes a step's temporary buffers at every call; keep log/checkpoint/eval
  intervals multiples of it, so one function is compiled."""
  c.steps_per_call = 1


# The paper's recipe per task (DESIGN.md "Paper training recipe"): epochs differ.
PAPER_EPOCHS = {"VA": 40, "EXPR": 10, "AU": 30}


def get_temporal_config(task: str, preset: str = "paper") -> ml_collections.ConfigDict:
  """The temporal model of one task (configs/va.py, expr.py, au.py call this).

  `preset`: 'paper' (the authors' model and recipe, visual features only), 'tiny' (CPU
  tests and the demo). Ablations are overrides, e.g. `--config.model.kind=frame_mlp`,
  `--config.model.modalities=visual,audio`, `--config.model.use_transformer=False`.
  """
  c = ml_collections.ConfigDict()
  c.task = task
  c.seed = 0
  c.data = get_data_config()
  c.data.visual_features = ""  # launch/extract.py --workdir + /visual
  c.data.audio_features = ""   # ... + /audio
  c.data.segment_len = 300
  c.data.stride = 200
  c.data.predict_stride = 200  # the authors predict with 300 (no overlap); we overlap + merge
  c.data.merge = "uniform"     # or 'triangular': weight frames near a window's centre more

  c.model = ml_collections.ConfigDict()
  # Decoded by affect_jax.models.temporal.from_config; these are the released model's values.
  c.model.kind = "temporal"    # 'temporal' (TCN + Transformer) | 'frame_mlp' (no context)
  c.model.modalities = ("visual",)  # features of the MAE encoder only
  c.model.tcn_channels = (768, 256, 128)  # one dilated level each (dilation 1, 2, 4, ...)
  c.model.kernel_size = 5
  c.model.d_model = 512        # the Transformer's width, after the 1x1 projection
  c.model.num_layers = 8
  c.model.num_heads = 4
  c.model.ff_dim = 512
  c.model.use_tcn = True
  c.model.use_transformer = True
  c.model.tcn_padding = "causal"
  c.model.norm_first = False
  c.model.positional = "none"
  c.model.activation = "relu"
  c.model.va_tanh = False
  c.model.dropout = 0.0
  c.model.mlp_hidden = 512     # frame_mlp only
  c.model.dtype = "float32"
  c.model.kernels = "auto"     # affect_jax.models.layers.KERNELS

  c.batch_size = 32
  c.num_epochs = PAPER_EPOCHS[task]
  c.num_steps = -1
  c.warmup_epochs = 2
  c.optim = ml_collections.ConfigDict(dict(
      name="adamw", lr=3e-5, base_lr=None, b1=0.9, b2=0.999, eps=1e-8, weight_decay=1e-5,
      schedule="cosine", min_lr=1e-8, init_lr=1e-8, grad_clip=0.0))
  c.class_weights = ()   # EXPR: 8 weights, or empty for none
  c.pos_weight = ()      # AU: 12 weights, or empty for none
  c.fold = 0             # 0 = official split, 1-4 the authors' extra folds
  c.cross_validate = False
  c.eval_every_epochs = 1.0
  c.early_stopping_epochs = 0  # stop when the metric has not improved for this long; 0 = off
  # 90% interval of the final headline scores over videos resampled with replacement
  # (metrics.video_bootstrap): this many draws; 0 = off.
  c.bootstrap_samples = 1000

  c.mesh_shape = (-1, 1, 1)
  c.axis_rules = sharding.DEFAULT_RULES
  add_steps_per_call(c)
  c.log_every = 50
  c.checkpoint_every = 500
  c.max_to_keep = 2
  c.resume = True

  if preset == "tiny":
    c.data.segment_len = 64
    c.data.stride = 48
    c.data.predict_stride = 48
    c.batch_size = 8
    c.num_epochs = 30
    c.warmup_epochs = 1
    c.optim.lr = 1e-3
    c.model.tcn_channels = (32, 16)  # the paper's structure at toy widths
    c.model.d_model = 32
    c.model.num_layers = 2
    c.model.num_heads = 2
    c.model.ff_dim = 64
    c.model.mlp_hidden = 64
    c.log_every = 20
    c.checkpoint_every = 200
  elif preset != "paper":
    raise ValueError(f"unknown preset {preset!r}: use paper or tiny")
  return c
