"""grain input pipelines.

Images leave the pipeline as uint8 [B, H, W, 3]; normalisation happens on the device inside
the jitted step (`normalize_images`), which moves a quarter of the bytes host -> device and
keeps the workers' work to decode + crop.
"""

from __future__ import annotations

import io
import math
import os
from typing import Any, Callable, Sequence

import grain
import jax
import numpy as np
from absl import flags, logging
from PIL import Image

# ImageNet statistics, as the MAE recipe and the public checkpoints use.
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


def normalize_images(images, dtype=None):
  """uint8 [..., 3] -> (x/255 - mean) / std, in float32 (or `dtype`). jnp or np input."""
  import jax.numpy as jnp
  x = (jnp.asarray(images, jnp.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
  return x if dtype is None else x.astype(dtype)


def random_resized_crop_box(width: int, height: int, rng: np.random.Generator,
                            scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
  """(left, top, right, bottom) as torchvision's RandomResizedCrop draws it: 10 tries of a
  random area fraction and log-uniform aspect ratio, else the central crop clamped to `ratio`."""
  area = width * height
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target = area * rng.uniform(*scale)
    aspect = math.exp(rng.uniform(*log_ratio))
    w = int(round(math.sqrt(target * aspect)))
    h = int(round(math.sqrt(target / aspect)))
    if 0 < w <= width and 0 < h <= height:
      left = int(rng.integers(0, width - w + 1))
      top = int(rng.integers(0, height - h + 1))
      return left, top, left + w, top + h
  in_ratio = width / height
  if in_ratio < ratio[0]:
    w, h = width, int(round(width / ratio[0]))
  elif in_ratio > ratio[1]:
    h, w = height, int(round(height * ratio[1]))
  else:
    w, h = width, height
  left, top = (width - w) // 2, (height - h) // 2
  return left, top, left + w, top + h


_skipped = 0  # per worker process


def load_rgb(image: str | bytes | np.ndarray) -> Image.Image:
  """The decoded image (a path, a file's encoded bytes, or pixels already decoded: uint8
  [H, W, 3], as an RGB TFDS dataset stores them) as RGB (grey, RGBA, CMYK... converted);
  raises if unreadable."""
  if isinstance(image, np.ndarray):
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
      raise ValueError(f"decoded pixels of shape {image.shape} and dtype {image.dtype}: "
                       "expected uint8 [H, W, 3]")
    return Image.fromarray(image)
  with Image.open(io.BytesIO(image) if isinstance(image, bytes) else image) as im:
    im.load()
    return im.convert("RGB")


def _encoded(record: dict) -> str | bytes | np.ndarray:
  """What to decode: the record's image (a TFDS record's bytes or pixels) or its path (a
  folder's)."""
  return record["image"] if "image" in record else record["path"]


def _open_rgb(record: dict) -> Image.Image | None:
  """The record's image, or None (logged with its path and counted) when it cannot be
  decoded."""
  global _skipped
  try:
    return load_rgb(_encoded(record))
  except Exception as e:  # noqa: BLE001 - any decoder failure skips the file, never the job
    _skipped += 1
    logging.warning("skipping unreadable image %s (%s: %s); %d skipped so far in this process",
                    record["path"], type(e).__name__, e, _skipped)
    return None


def check_readable(items: Sequence, where: str, corpus: str = "the data") -> None:
  """Raises ValueError naming `where` unless some image of `items` (paths or records)
  decodes: the pipelines skip unreadable files, and with none left would stop or spin.
  Reads up to the first readable image (one file, normally)."""
  first = None
  for item in items:
    record = _as_record(item)
    try:
      load_rgb(_encoded(record))
      return
    except Exception as e:  # noqa: BLE001 - the same failures the pipelines skip
      first = first or f"{record['path']}: {type(e).__name__}: {e}"
  if first is None:
    raise ValueError(f"{where}: no image in {corpus}")
  raise ValueError(f"{where}: no readable image in {corpus} ({len(items)} of {len(items)} "
                   f"unreadable, e.g. {first}); replace them with decodable jpg/png files")


def _as_record(item) -> dict:
  """Sources hold image paths or records {'path': ..., other fields}; a TFDS record
  (`tfds_builders.Records`) also has 'image', the encoded bytes, and 'path' names it."""
  return {"path": item} if isinstance(item, str) else item


def _with_image(record: dict, x: np.ndarray) -> dict:
  out = {k: v for k, v in record.items() if k != "path"}
  out["image"] = np.ascontiguousarray(x)
  return out


class _CropFlip(grain.transforms.RandomMap):
  """MAE's augmentation drawn for an image: the random-resized-crop box, then the flip. One
  draw for both transforms below, so the host and the device augment with the same numbers."""

  def __init__(self, size: int, scale=(0.2, 1.0), flip: bool = True):
    self.size = size
    self.scale = tuple(scale)
    self.flip = flip

  def draw(self, width: int, height: int, rng: np.random.Generator):
    """((left, top, right, bottom), flip) for a width x height image."""
    box = random_resized_crop_box(width, height, rng, self.scale)
    return box, bool(self.flip and rng.random() < 0.5)


class RandomResizedCropFlip(_CropFlip):
  """path or {'path', ...} -> {'image': uint8 [S, S, 3], ...} with MAE's augmentation;
  None (grain's "filtered") if unreadable (logged). Other record fields (a label) pass through."""

  def random_map(self, item, rng: np.random.Generator):
    record = _as_record(item)
    im = _open_rgb(record)
    if im is None:
      return None
    box, flip = self.draw(im.width, im.height, rng)
    im = im.resize((self.size, self.size), Image.Resampling.BICUBIC, box=box)
    if flip:
      # PIL's flip: the same pixels as numpy's x[:, ::-1], whose 3-byte-pixel copy costs
      # more than the JPEG decode at 224 px.
      im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return _with_image(record, np.asarray(im, dtype=np.uint8))


class CropBoxFlip(_CropFlip):
  """path or {'path', ...} -> {'image': uint8 [S0, S0, 3], 'crop': float32 [4], 'flip': bool,
  ...}: `RandomResizedCropFlip`'s crop box and flip (the same draw), left for the device to
  apply (`affect_jax.data.augment`). The image goes as it is stored when it is S0 = `size`
  square (Aff-Wild2's crops, an RGB TFDS dataset), else resized to that first (the box is
  drawn on the resized image); None if unreadable."""

  def random_map(self, item, rng: np.random.Generator):
    record = _as_record(item)
    size = self.size
    image = _encoded(record)
    if isinstance(image, np.ndarray) and image.shape == (size, size, 3) and image.dtype == np.uint8:
      x = image  # pixels as stored: no decode, no copy until the batch is stacked
    else:
      im = _open_rgb(record)
      if im is None:
        return None
      if im.size != (size, size):
        im = im.resize((size, size), Image.Resampling.BICUBIC)
      x = np.asarray(im, dtype=np.uint8)
    box, flip = self.draw(size, size, rng)
    out = _with_image(record, x)
    out["crop"] = np.asarray(box, np.float32)
    out["flip"] = np.bool_(flip)
    return out


class ResizeImage(grain.transforms.Map):
  """path or {'path', ...} -> {'image': uint8 [S, S, 3], ...}, no augmentation; None if
  unreadable (logged)."""

  def __init__(self, image_size: int):
    self.image_size = image_size

  def map(self, item):
    record = _as_record(item)
    im = _open_rgb(record)
    if im is None:
      return None
    if im.size != (self.image_size, self.image_size):
      im = im.resize((self.image_size, self.image_size), Image.Resampling.BICUBIC)
    return _with_image(record, np.asarray(im, dtype=np.uint8))


def _is_present(x) -> bool:
  return x is not None


class ProcessRows(grain.MapDataset):
  """This process's rows of every global batch: elements [(b * count + index) * rows, ...
  + rows) of global batch b. Every process shuffles and augments the same global sequence
  (keyed by global position), so what a global batch holds does not depend on how many
  processes read it."""

  def __init__(self, parent: grain.MapDataset, rows: int, index: int, count: int):
    super().__init__(parent)
    if not 0 <= index < count or rows < 1:
      raise ValueError(f"process {index} of {count}, {rows} rows: out of range")
    self._rows, self._index, self._count = rows, index, count
    full, rest = divmod(len(parent), rows * count)
    self._length = full * rows + min(max(rest - index * rows, 0), rows)

  def __len__(self) -> int:
    return self._length

  def _parent_index(self, index: int) -> int:
    block, offset = divmod(index, self._rows)
    return (block * self._count + self._index) * self._rows + offset

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    return self._parent[self._parent_index(index)]

  def __str__(self) -> str:
    return f"ProcessRows(rows={self._rows}, index={self._index}, count={self._count})"


def process_rows(ds: grain.MapDataset, rows: int, shard_index: int | None = None,
                 shard_count: int | None = None) -> grain.MapDataset:
  """`ProcessRows` of this process (process index/count by default)."""
  shard_index = jax.process_index() if shard_index is None else shard_index
  shard_count = jax.process_count() if shard_count is None else shard_count
  return ProcessRows(ds, rows, shard_index, shard_count)


MAX_AUTO_WORKERS = 16


def host_cores() -> int:
  """The cores this process may run on (its CPU affinity, which schedulers and launchers
  that pin one process per accelerator set), else the machine's."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # not Linux
    return os.cpu_count() or 1


def worker_count(requested: int = -1) -> int:
  """grain worker processes for a loader: `requested` when >= 0; -1 sizes them from the
  host: none on a CPU backend (there the cores run the model, and workers would take them
  from XLA) or outside an absl app (grain's workers need its flags), else this process's
  cores less one for the training thread, at most MAX_AUTO_WORKERS. Processes sharing a host
  without CPU pinning each see all its cores: give them a count of their own
  (`--config.data.worker_count`)."""
  if requested >= 0:
    return int(requested)
  if requested != -1:
    raise ValueError(f"worker_count={requested}: use -1 (sized from the host) or a count >= 0")
  if jax.default_backend() == "cpu" or not flags.FLAGS.is_parsed():
    return 0  # (grain's workers read absl flags: a process not run by absl.app decodes itself)
  return max(0, min(host_cores() - 1, MAX_AUTO_WORKERS))


# Threads reading and decoding in each process that runs the pipeline (the training process,
# or each worker). PIL releases the GIL while it decodes and resizes, so a few threads use a
# few cores; grain's default of 16 spends a third more CPU per image on two cores in lock
# traffic (launch/bench.py --what=loader). Storage with a long latency per read (a bucket)
# wants more.
READ_THREADS = 4


def options(data) -> dict:
  """The loader arguments a stage's `config.data` sets: worker_count, read_threads."""
  return {"worker_count": int(data.get("worker_count", -1)),
          "read_threads": int(data.get("read_threads", READ_THREADS))}


class _Chunks(grain.MapDataset):
  """Element j: the readable elements among the `size` consecutive indices from j * size,
  stacked: {'index': int64 [n], 'fields': {name: [n, ...]}} ('fields' None when n = 0) -
  what a worker makes and ships in one piece. Per-element transfers cost more than the
  decoding; one stacked array per field goes through one shared-memory block (grain's
  workers copy each array into one) and, when nothing was skipped, is the batch itself.
  (Stacking straight into a shared block would save that copy, but a worker stopped with
  chunks in its read-ahead buffer would leave their blocks behind.)"""

  def __init__(self, parent: grain.MapDataset, size: int):
    super().__init__(parent)
    self._size = size

  def __len__(self) -> int:
    return -(-len(self._parent) // self._size)

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    start = index * self._size
    stop = min(start + self._size, len(self._parent))
    present = [(i, x) for i in range(start, stop) if _is_present(x := self._parent[i])]
    fields = ({k: np.stack([x[k] for _, x in present]) for k in present[0][1]}
              if present else None)
    return {"index": np.array([i for i, _ in present], np.int64), "fields": fields}

  def __str__(self) -> str:
    return f"Chunks(size={self._size})"


def _rows(chunk: dict, rows: slice) -> dict:
  """Those rows of a `_Chunks` element (views, no copy)."""
  return {"index": chunk["index"][rows], "fields": {f: v[rows] for f, v in chunk["fields"].items()}}


class _ResumableBatches(grain.IterDataset):
  """Batches of a random-access pipeline, the same for any number of worker processes and
  threads, with a checkpointed position that resumes under any number of them.

  Workers and threads make chunks of consecutive elements (grain merges the workers' outputs
  round robin, so chunks arrive in order) with the unreadable ones (None) left out; this
  process cuts batches from them. grain's own batching in the workers would fill each batch
  from one worker's every N-th element (batches that depend on N, and one pass out of order),
  and its multiprocess state is per worker. The state here is how many elements were
  consumed; a resume slices the MapDataset there and rebuilds."""

  def __init__(self, ds: grain.MapDataset, batch_size: int, drop_remainder: bool, workers: int,
               read_threads: int):
    super().__init__()
    self._ds, self._batch_size, self._drop = ds, batch_size, drop_remainder
    self._workers, self._threads = workers, read_threads

  def chunks(self, start: int):
    """An iterator of the chunks from element `start` on."""
    part = _Chunks(self._ds[start:] if start else self._ds, self._batch_size)
    it = part.to_iter_dataset(grain.ReadOptions(num_threads=self._threads,
                                                prefetch_buffer_size=2 * self._threads))
    if self._workers > 0:
      it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=self._workers))
    return iter(it)

  def __iter__(self) -> grain.DatasetIterator:
    return _ResumableIterator(self)


class _ResumableIterator(grain.DatasetIterator):

  def __init__(self, batches: _ResumableBatches):
    super().__init__()
    self._batches = batches
    self._it = None
    self._start(0)

  def _start(self, consumed: int) -> None:
    """Restarts at element `consumed`; threads and workers start with the first batch asked
    for (a resume calls this right after the constructor did)."""
    self.close()
    self._it = None
    self._base = self._consumed = consumed  # element indices of the chunks are from _base
    self._pending: list[dict] = []  # chunks (or their tails) not yet in a batch
    self._num_pending = 0
    self._done = False

  def __next__(self) -> dict:
    if self._it is None:
      self._it = self._batches.chunks(self._base)
    size = self._batches._batch_size
    while self._num_pending < size and not self._done:
      try:
        chunk = next(self._it)
      except StopIteration:
        self._done = True
        break
      if len(chunk["index"]):
        self._pending.append(chunk)
        self._num_pending += len(chunk["index"])
    if not self._num_pending or (self._num_pending < size and self._batches._drop):
      raise StopIteration
    take, n = [], 0
    while n < size and self._pending:
      chunk = self._pending.pop(0)
      k = min(size - n, len(chunk["index"]))
      if k < len(chunk["index"]):  # the rest waits for the next batch
        self._pending.insert(0, _rows(chunk, slice(k, None)))
        chunk = _rows(chunk, slice(k))
      take.append(chunk)
      n += k
    self._num_pending -= n
    self._consumed = self._base + int(take[-1]["index"][-1]) + 1
    if len(take) == 1:
      return take[0]["fields"]
    return {f: np.concatenate([c["fields"][f] for c in take]) for f in take[0]["fields"]}

  def get_state(self) -> dict:
    return {"consumed": self._consumed}

  def set_state(self, state: dict) -> None:
    if "consumed" in state:
      self._start(int(state["consumed"]))
    elif set(state) == {"next_index"}:  # grain's own state of the same pipeline, no workers
      self._start(int(state["next_index"]))
    else:
      raise ValueError(f"a loader position saved in grain's per-worker form ({sorted(state)}) "
                       "by an earlier affect-jax: it cannot be carried over; start a new "
                       "--workdir, or resume with the affect-jax that wrote it")

  def close(self) -> None:
    if self._it is not None and hasattr(self._it, "close"):
      self._it.close()  # stops worker processes and frees their shared memory


def _finish(ds: grain.MapDataset, batch_size: int, drop_remainder: bool, workers: int,
            read_threads: int = READ_THREADS) -> grain.IterDataset:
  workers = worker_count(workers)
  if workers > 0 and not flags.FLAGS.is_parsed():
    raise ValueError(f"worker_count={workers}: grain's worker processes need absl flags parsed; "
                     "run the job through absl.app.run (as launch/*.py do) or call "
                     "absl.flags.FLAGS.mark_as_parsed() first, or use worker_count=0")
  return _ResumableBatches(ds, batch_size, drop_remainder, workers, read_threads)


def prefetch_to_device(ds: grain.IterDataset, put: Callable[[dict], Any],
                       size: int = 2) -> grain.IterDataset:
  """`ds` with each batch passed through `put` (host numpy -> device arrays, e.g.
  `sharding.shard_batch`) in a background thread, `size` batches ahead: the host->device copy
  of the next batches overlaps the step running on the current one (grain's
  `experimental.device_put`, with a sharded put). The iterator's state still counts only the
  batches handed out, so a checkpoint taken mid-epoch resumes at the first batch the step did
  not see. 0 = no prefetch (`put` in the caller's thread)."""
  if size <= 0:
    return ds.map(put)
  return grain.experimental.ThreadPrefetchIterDataset(ds.map(put), prefetch_buffer_size=size)


def _sequence(items) -> Sequence:
  """A random-access source: lists and `tfds_builders.Records` as they are (a Records is
  never copied: its records are read on demand), other iterables listed."""
  return items if isinstance(items, Sequence) else list(items)


def pretrain_dataset(items: Sequence, *, image_size: int, batch_size: int, seed: int,
                     num_epochs: int | None = None, worker_count: int = -1,
                     crop_scale=(0.2, 1.0), flip: bool = True, read_threads: int = READ_THREADS,
                     augment: str = "host", source_size: int = 0,
                     shard_index: int | None = None, shard_count: int | None = None) -> grain.IterDataset:
  """Shuffled, augmented, batched images (paths, or records with a 'path' and e.g. a label).

  `batch_size` is this process's share of the global batch; each process reads only its
  rows of every global batch (`process_rows`), so the global batches are the same for any
  number of processes. Every epoch is reshuffled; unreadable files are skipped (and
  logged), so batches stay full. `augment='device'` leaves the crop-resize and flip to the
  step (`CropBoxFlip`: images at `source_size`, 0 = image_size, with their boxes and flips).
  """
  ds = grain.MapDataset.source(_sequence(items)).shuffle(seed=seed).repeat(num_epochs)
  if augment == "device":
    transform = CropBoxFlip(source_size or image_size, crop_scale, flip)
  elif augment == "host":
    transform = RandomResizedCropFlip(image_size, crop_scale, flip)
  else:
    raise ValueError(f"augment={augment!r}: expected 'host' or 'device'")
  ds = ds.random_map(transform, seed=seed)
  return _finish(process_rows(ds, batch_size, shard_index, shard_count), batch_size, True,
                 worker_count, read_threads)


def eval_dataset(items: Sequence, *, image_size: int, batch_size: int, worker_count: int = -1,
                 read_threads: int = READ_THREADS, shard_index: int | None = None,
                 shard_count: int | None = None) -> grain.IterDataset:
  """In order, resized, one pass; the last batch may be short. Records keep their fields,
  so predictions stay paired with labels even when an unreadable file is skipped."""
  ds = process_rows(grain.MapDataset.source(_sequence(items)), batch_size, shard_index, shard_count)
  return _finish(ds.map(ResizeImage(image_size)), batch_size, False, worker_count, read_threads)
