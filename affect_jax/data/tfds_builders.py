"""TFDS datasets of affect-jax's images (ArrayRecord files), built once and read through grain.

At pod scale a bucket of millions of small JPEGs read one file at a time starves the chips;
the same bytes packed into a few ArrayRecord shards are read in large sequential chunks with
random access by index. Two builders, written and read without TensorFlow
(`file_format="array_record"`, `tfds.data_source`-style random access):

  face_images       every jpg/png under one or more face-image roots (MAE pretraining),
                    one record {image, path} per file, in the folder reader's order
  aff_wild2_frames  an Aff-Wild2 tree (the licence-gated data from `manual_dir`, as TFDS does
                    for gated sets, or the synthetic set): one record per frame 0..T-1 of every
                    annotated or test-listed video {image, video, frame, has_image, va, expr,
                    au}; a frame without an image holds its stand-in's bytes
                    (`affwild2.nearest_image`) with has_image False, labels are the task's
                    annotation row (invalid markers where a task does not annotate the video).
                    The dataset's metadata.json is the index: per video its first record,
                    frame count, frames without an image, a hash of its image bytes and its
                    EXPR labels; per task the videos of Train_Set / Validation_Set / Test_Set.

Build with `launch/build_tfds.py`. Read with `FaceRecords` / `FramesDataset`: they return
random-access sequences of the same records the folder readers make (the encoded image bytes
in place of a path), so `affect_jax.data.loaders` takes either and decodes, crops and batches
them the same way. Records are stored as the files' bytes: decoding (and skipping a corrupt
one, logged and counted) happens in the loaders, as for a folder.

With `pixels=S` (launch/build_tfds.py --pixels=S) a build stores each image decoded instead:
RGB uint8 [S, S, 3] (resized with PIL bicubic when not S x S: a non-square image is squashed),
as one bytes value per record, in the config `rgb{S}` (`<data_dir>/<name>/rgb{S}/<version>`,
beside the encoded build). Use it where decoding costs more CPU than reading, on hosts feeding
accelerators: the decode is paid once at build time instead of every epoch, and with the crop on
the device (`data.augment='device'`) the loader is left nearly nothing to do per image
(launch/bench.py --what=loader). It costs S*S*3 bytes per image (37.6 KB at 112 against ~5 KB
of JPEG). A file that
cannot be decoded is stored empty and listed in metadata["undecodable"]; the loaders skip it
as they skip a corrupt file.
"""

from __future__ import annotations

import bisect
import concurrent.futures
import functools
import hashlib
import os
from typing import Iterable, Iterator, Sequence

import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from etils import epath
from PIL import Image
from tensorflow_datasets.proto import tf_example_pb2

from affect_jax import fileio
from affect_jax.data import affwild2, faces, loaders

FACE_IMAGES = "face_images"
AFFWILD2_FRAMES = "aff_wild2_frames"
FACES_SPLIT = "train"
FRAMES_SPLIT = "frames"
EXPR_CODES = "01234567"  # metadata: one character per frame, '-' for an invalid label
_READ_THREADS = 16
_READ_CHUNK = 256
MIN_PIXELS = 8


def _check_pixels(pixels: int | None) -> int | None:
  if pixels is not None and (not isinstance(pixels, (int, np.integer)) or pixels < MIN_PIXELS):
    raise ValueError(f"pixels={pixels!r}: expected None (the files' bytes) or an int >= "
                     f"{MIN_PIXELS} (decoded RGB at pixels x pixels)")
  return None if pixels is None else int(pixels)


def _config(pixels: int | None) -> tfds.core.BuilderConfig | None:
  """The RGB build's own config, so it lives beside the encoded one (<name>/rgb{S}/<version>)."""
  if pixels is None:
    return None
  return tfds.core.BuilderConfig(name=f"rgb{pixels}",
                                 description=f"decoded RGB pixels, {pixels} x {pixels}")


def _read_image(path: str | os.PathLike, pixels: int | None) -> bytes | np.ndarray:
  """The file's bytes (pixels None), or its pixels: RGB uint8 [pixels, pixels, 3], resized
  (bicubic) unless already that size; [0, pixels, 3] (logged) when it cannot be decoded, which
  the loaders skip like a corrupt file. A file that cannot be read raises."""
  data = epath.Path(path).read_bytes()
  if pixels is None:
    return data
  try:
    image = loaders.load_rgb(data)
  except Exception as e:  # noqa: BLE001 - any decoder failure skips the file, never the build
    logging.warning("%s cannot be decoded (%s: %s): stored as an empty image", path,
                    type(e).__name__, e)
    return np.zeros((0, pixels, 3), np.uint8)
  if image.size != (pixels, pixels):
    image = image.resize((pixels, pixels), Image.Resampling.BICUBIC)
  return np.asarray(image)


def _read_images(paths: Iterable[str | os.PathLike], pixels: int | None = None,
                 threads: int = _READ_THREADS) -> Iterator[bytes | np.ndarray]:
  """`_read_image` of each file, in order, by a thread pool (overlaps a bucket's latency;
  decoding and resizing too: PIL releases the GIL)."""
  paths = list(paths)
  with concurrent.futures.ThreadPoolExecutor(threads) as pool:
    for i in range(0, len(paths), _READ_CHUNK):
      yield from pool.map(lambda p: _read_image(p, pixels), paths[i:i + _READ_CHUNK])


def _undecodable(image: bytes | np.ndarray) -> bool:
  """Whether `_read_image` stored this file empty: an RGB build's undecodable file."""
  return isinstance(image, np.ndarray) and not image.size


def _image_feature(pixels: int | None) -> tfds.features.FeatureConnector:
  if pixels is None:  # fed the files' encoded bytes, stored as they are (jpg and png mixed)
    return tfds.features.Image(shape=(None, None, 3))
  # Row-major uint8 pixels as ONE bytes value (the default encoding would store an int64
  # list: 8x larger, slow to parse); 0 rows for an undecodable file.
  return tfds.features.Tensor(shape=(None, pixels, 3), dtype=np.uint8,
                              encoding=tfds.features.Encoding.BYTES)


def _rgb_metadata(metadata, pixels: int | None) -> list[str]:
  """Records an RGB build's size in its metadata, and the list the build fills with the names
  of the files it could not decode (a list not recorded for an encoded build)."""
  undecodable = []
  if pixels is not None:
    metadata["pixels"] = pixels
    metadata["undecodable"] = undecodable
  return undecodable


class _DatasetInfo(tfds.core.DatasetInfo):
  """TFDS' DatasetInfo without the look-up of precomputed info on TFDS' bucket, which these
  datasets are never on (it makes an empty temporary folder per builder and leaves it)."""

  def initialize_from_bucket(self) -> None:
    pass


class FaceImages(tfds.core.GeneratorBasedBuilder):
  """Face images for self-supervised pretraining: the files of one or more folder trees."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First version."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Pass the face-image roots (folder trees of jpg/png, e.g. AffectNet, RAF-DB, FER crops) "
      "as roots=[...], or one root as manual_dir.")

  def __init__(self, *, roots: Sequence[str | os.PathLike] = (), pixels: int | None = None,
               **kwargs):
    self._roots = [os.fspath(r) for r in roots]
    self._pixels = _check_pixels(pixels)
    self._listing = None
    super().__init__(config=_config(self._pixels), **kwargs)

  def source_files(self, manual_dir=None) -> list[str]:
    """The image files this build reads (the roots walked once per builder)."""
    if self._listing is None:
      self._roots = self._roots or [os.fspath(manual_dir)]
      self._listing = _face_files(self._roots)
    return self._listing[1]

  def _info(self) -> tfds.core.DatasetInfo:
    return _DatasetInfo(
        builder=self,
        description="Face images (the files' bytes, or RGB) of one or more folder trees.",
        features=tfds.features.FeaturesDict({"image": _image_feature(self._pixels),
                                             "path": tfds.features.Text()}),
        disable_shuffling=True, metadata=tfds.core.MetadataDict())

  def _split_generators(self, dl_manager):
    if self._listing is None:  # (reads manual_dir only when no roots were given)
      self.source_files(None if self._roots else dl_manager.manual_dir)
    return {FACES_SPLIT: self._generate_examples()}

  def _generate_examples(self):
    names, paths = self._listing
    self.info.metadata["roots"] = [os.path.realpath(r) for r in self._roots]
    self.info.metadata["source_fingerprint"] = fileio.stat_fingerprint(paths)
    undecodable = _rgb_metadata(self.info.metadata, self._pixels)
    for i, (name, image) in enumerate(zip(names, _read_images(paths, self._pixels))):
      if _undecodable(image):
        undecodable.append(name)
      yield i, {"image": image, "path": name}


def _face_files(roots) -> tuple[list[str], list[str]]:
  """(record names '<root folder>/<relative path>', absolute paths) of the roots' images."""
  names, paths = [], []
  for r in roots:
    root = os.path.realpath(r)
    for p in faces.index_images(root, cache_dir=None):
      names.append(os.path.join(os.path.basename(root), os.path.relpath(p, root)))
      paths.append(p)
  return names, paths


def _affwild2_files(root, max_unmatched: float) -> tuple[dict[str, int], list[str]]:
  """({video: num_frames} as `affwild2.all_videos`, every file an aff_wild2_frames build
  reads: annotations, test lists, frame images)."""
  files = []
  for task in affwild2.TASKS:
    try:
      folder = affwild2.task_dir(root, task)
    except FileNotFoundError:
      continue
    files += sorted(str(p) for split in affwild2.SPLITS for p in (folder / split).glob("*.txt"))
    files.append(os.path.join(root, affwild2.task_test_list(task)))
  videos = affwild2.all_videos(root, True, max_unmatched)
  for video, n in videos.items():
    files += [os.path.join(root, affwild2.FRAMES_DIR, video, affwild2.frame_name(int(k) + 1))
              for k in np.flatnonzero(affwild2.image_mask(root, video, n))]
  return videos, files


def _frame_labels(root, task: str, split: str, video: str, num_frames: int,
                  max_unmatched: float) -> np.ndarray:
  """A task's labels of `video` padded (invalid) or cut to `num_frames` rows."""
  labels = affwild2.load_video(root, task, split, video, max_unmatched=max_unmatched).labels
  out = affwild2.invalid_labels(task, num_frames)
  n = min(num_frames, labels.shape[0])
  out[:n] = labels[:n]
  return out


class AffWild2Frames(tfds.core.GeneratorBasedBuilder):
  """Aff-Wild2's cropped-aligned frames with their VA / EXPR / AU labels and split index."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First version."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Aff-Wild2 is licence-gated: request it from the ABAW organisers, unpack it into one "
      "tree (cropped_aligned/<video>/00001.jpg ..., <Task>_Challenge/{Train,Validation}_Set/"
      "<video>.txt, <Task>_Challenge_test_set.txt) and pass that tree as manual_dir. The "
      "synthetic set (launch/make_synthetic.py) has the same layout.")

  def __init__(self, *, max_unmatched: float = affwild2.MAX_UNMATCHED_FRAMES,
               pixels: int | None = None, **kwargs):
    self._max_unmatched = max_unmatched
    self._pixels = _check_pixels(pixels)
    self._listing = None
    super().__init__(config=_config(self._pixels), **kwargs)

  def source_files(self, manual_dir) -> list[str]:
    """The files this build reads (the tree's annotations parsed once per builder)."""
    if self._listing is None:
      self._listing = _affwild2_files(os.fspath(manual_dir), self._max_unmatched)
    return self._listing[1]

  def _info(self) -> tfds.core.DatasetInfo:
    return _DatasetInfo(
        builder=self, description="Aff-Wild2 frames (one record per frame) with VA/EXPR/AU labels.",
        features=tfds.features.FeaturesDict({
            "image": _image_feature(self._pixels),
            "video": tfds.features.Text(),
            "frame": tfds.features.Scalar(np.int32),  # 0-based: frame k+1 is image 0000(k+1).jpg
            "has_image": tfds.features.Scalar(np.bool_),
            "va": tfds.features.Tensor(shape=(2,), dtype=np.float32),
            "expr": tfds.features.Scalar(np.int32),
            "au": tfds.features.Tensor(shape=(len(affwild2.AU_NAMES),), dtype=np.int32),
        }),
        disable_shuffling=True, metadata=tfds.core.MetadataDict())

  def _split_generators(self, dl_manager):
    return {FRAMES_SPLIT: self._generate_examples(os.fspath(dl_manager.manual_dir))}

  def _generate_examples(self, root):
    unmatched = self._max_unmatched
    files = self.source_files(root)
    videos = self._listing[0]
    sets: dict[str, dict[str, list[str]]] = {}
    where: dict[str, dict[str, str]] = {v: {} for v in videos}  # video -> task -> split
    for task in affwild2.TASKS:
      try:
        affwild2.task_dir(root, task)
      except FileNotFoundError:
        continue
      sets[task] = {}
      for split in (*affwild2.SPLITS, affwild2.TEST_SET):
        try:
          names = affwild2.list_videos(root, task, split)
        except FileNotFoundError:
          names = []
        sets[task][split] = names
        for v in names:
          where[v].setdefault(task, split)
    index, start = {}, 0
    self.info.metadata["root"] = os.path.realpath(root)
    self.info.metadata["source_fingerprint"] = fileio.stat_fingerprint(files)
    self.info.metadata["sets"] = sets
    self.info.metadata["videos"] = index
    undecodable = _rgb_metadata(self.info.metadata, self._pixels)
    key = 0
    for video, num_frames in videos.items():
      frames_dir = os.path.join(root, affwild2.FRAMES_DIR, video)
      has_image = affwild2.image_mask(root, video, num_frames)
      stand_in = affwild2.nearest_image(has_image, frames_dir)
      labels = {task: (_frame_labels(root, task, split, video, num_frames, unmatched)
                       if split != affwild2.TEST_SET else affwild2.invalid_labels(task, num_frames))
                for task, split in where[video].items()}
      for task in affwild2.TASKS:
        labels.setdefault(task, affwild2.invalid_labels(task, num_frames))
      digest = hashlib.sha256()
      images = {}
      present = np.flatnonzero(has_image)
      paths = [os.path.join(frames_dir, affwild2.frame_name(int(k) + 1)) for k in present]
      for k, image in zip(present, _read_images(paths, self._pixels)):
        images[int(k)] = image
        if _undecodable(image):
          undecodable.append(f"{video}/{affwild2.frame_name(int(k) + 1)}")
        data = image if isinstance(image, bytes) else image.tobytes()  # as stored
        digest.update(f"{k}:{len(data)}:".encode())
        digest.update(data)
      index[video] = {
          "start": start, "num_frames": int(num_frames),
          "missing": [int(k) for k in np.flatnonzero(~has_image)],
          "sha256": digest.hexdigest()[:16],
          "expr": "".join(EXPR_CODES[c] if c >= 0 else "-" for c in labels["EXPR"].tolist())}
      for t in range(num_frames):
        yield key, {"image": images[int(stand_in[t])], "video": video, "frame": t,
                    "has_image": bool(has_image[t]), "va": labels["VA"][t],
                    "expr": int(labels["EXPR"][t]), "au": labels["AU"][t]}
        key += 1
      start += num_frames


BUILDERS = {FACE_IMAGES: FaceImages, AFFWILD2_FRAMES: AffWild2Frames}


def build(name: str, data_dir: str | os.PathLike, *, manual_dir: str | os.PathLike | None = None,
          overwrite: bool = False, pixels: int | None = None, **kwargs) -> epath.Path:
  """Builds dataset `name` (a key of BUILDERS) under `data_dir` as ArrayRecord; returns the
  dataset's directory (`<data_dir>/<name>/<version>`, what the readers and configs take).
  With `pixels=S` the images are stored decoded, RGB S x S, in `<data_dir>/<name>/rgb{S}/
  <version>` (beside an encoded build; each is checked against its own source).

  TFDS writes into a temporary folder and renames it at the end, so an interrupted build
  leaves nothing half-written. A complete build of the same files (names, sizes, mtimes) is
  kept; one of other files is refused, naming both, unless `overwrite` (then it is rebuilt).
  """
  if name not in BUILDERS:
    raise ValueError(f"unknown dataset {name!r}: expected one of {sorted(BUILDERS)}")
  if name == AFFWILD2_FRAMES and manual_dir is None:
    raise ValueError("aff_wild2_frames: manual_dir must be the Aff-Wild2 tree")
  source = ",".join(map(os.fspath, kwargs.get("roots") or [manual_dir]))
  builder = BUILDERS[name](data_dir=os.fspath(data_dir), file_format="array_record",
                           pixels=pixels, **kwargs)
  files = builder.source_files(manual_dir)  # the builder generates from this same listing
  out = epath.Path(builder.data_dir)
  mode = tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS
  if (out / "dataset_info.json").exists():
    built = tfds.builder_from_directory(out).info.metadata or {}
    if built.get("source_fingerprint") != fileio.stat_fingerprint(files):
      if not overwrite:
        raise FileExistsError(
            f"{out} was built from other files than those now under {source} (added, removed "
            "or changed since): pass overwrite=True (launch/build_tfds.py --overwrite) to "
            "rebuild it, or another data_dir")
      mode = tfds.download.GenerateMode.FORCE_REDOWNLOAD
  config = tfds.download.DownloadConfig(
      manual_dir=None if manual_dir is None else os.fspath(manual_dir), download_mode=mode)
  builder.download_and_prepare(download_config=config)
  return out


# ---- Reading ----


def _open(directory: str | os.PathLike, *expect: str):
  """The read-only builder of a built dataset of one of the `expect` kinds."""
  directory = epath.Path(directory)
  kinds = " or ".join(expect)
  if not (directory / "dataset_info.json").exists():
    raise FileNotFoundError(f"{directory}: not a built TFDS dataset (no dataset_info.json); build "
                            f"it with launch/build_tfds.py and pass <data_dir>/<{kinds}>/<version> "
                            "(<data_dir>/<name>/rgb<S>/<version> for an RGB build)")
  builder = tfds.builder_from_directory(directory)
  if builder.info.name not in expect:
    raise ValueError(f"{directory}: a {builder.info.name!r} dataset, expected {kinds}")
  return builder


class Records(Sequence):
  """Random access to chosen records of one or more ArrayRecord splits (their raw sources),
  as loader records: {'image': encoded bytes, or the pixels of an RGB dataset (uint8
  [S, S, 3]; b"" for a file the build could not decode), 'path': a name for messages,
  **columns[i]}. Each part is (raw source, record indices, name, S or None for encoded).
  Picklable (grain's worker processes get a copy)."""

  def __init__(self, parts: Sequence[tuple[object, np.ndarray, str, int | None]],
               columns: dict[str, np.ndarray] | None = None):
    self._parts = [(src, np.asarray(idx, np.int64), name, pixels)
                   for src, idx, name, pixels in parts]
    self._ends = np.cumsum([len(p[1]) for p in self._parts]).tolist()
    self._columns = dict(columns or {})
    for k, v in self._columns.items():
      if len(v) != len(self):
        raise ValueError(f"column {k!r}: {len(v)} values for {len(self)} records")

  def __len__(self) -> int:
    return self._ends[-1] if self._ends else 0

  def column(self, name: str) -> np.ndarray:
    """A non-image field of every record, without reading a record."""
    return self._columns[name]

  def __getitem__(self, i):
    if isinstance(i, slice):
      return [self[j] for j in range(*i.indices(len(self)))]
    if not -len(self) <= i < len(self):
      raise IndexError(i)
    i %= len(self)
    p = bisect.bisect_right(self._ends, i)
    src, idx, name, pixels = self._parts[p]
    # The serialized tf.train.Example, parsed by protobuf's C++ parser for just the fields
    # needed (TFDS's generic numpy deserialisation holds the GIL several times longer,
    # which the loader's decode threads feel).
    raw = src[int(idx[i - (self._ends[p - 1] if p else 0)])]
    feature = tf_example_pb2.Example.FromString(raw).features.feature
    if "video" in feature:
      what = (f"{feature['video'].bytes_list.value[0].decode()}/"
              f"{affwild2.frame_name(feature['frame'].int64_list.value[0] + 1)}")
    else:
      what = feature["path"].bytes_list.value[0].decode()
    image = feature["image"].bytes_list.value[0]
    if pixels and len(image) == pixels * pixels * 3:
      image = np.frombuffer(image, np.uint8).reshape(pixels, pixels, 3)
    out = {"image": image, "path": f"{name}: {what}"}
    out.update({k: v[i] for k, v in self._columns.items()})
    return out


def _pixels(builder) -> int | None:
  """S of an RGB dataset (its images uint8 [S, S, 3]), None for encoded images."""
  pixels = (builder.info.metadata or {}).get("pixels")
  return None if pixels is None else int(pixels)


def _source(builder, split: str, raw: bool = False):
  """The split's records by index: decoded to numpy (an encoded image left as its bytes, an
  RGB one as uint8 [S, S, 3] or [0, S, 3]), or with `raw` the serialized examples as stored."""
  if raw:
    return builder.as_data_source(split, deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES)
  if _pixels(builder) is not None:
    return builder.as_data_source(split)
  return builder.as_data_source(split, decoders={"image": tfds.decode.SkipDecoding()})


def face_records(directories: Sequence[str | os.PathLike] | str) -> Records:
  """Every image of one or more datasets, mixed (concatenated; the loader shuffles): built
  face_images datasets, or aff_wild2_frames datasets (their frames that have an image). A
  string may hold several directories separated by commas; encoded and RGB datasets mix
  (each record's image as its dataset stores it)."""
  if isinstance(directories, (str, os.PathLike)):
    directories = [d for d in os.fspath(directories).split(",") if d]
  parts = []
  for d in directories:
    builder = _open(d, FACE_IMAGES, AFFWILD2_FRAMES)
    if builder.info.name == FACE_IMAGES:
      parts.append((_source(builder, FACES_SPLIT, raw=True),
                    np.arange(builder.info.splits[FACES_SPLIT].num_examples), str(d),
                    _pixels(builder)))
    else:
      frames = FramesDataset(d)
      idx = [frames.start(v) + np.flatnonzero(frames.has_image(v)) for v in frames.videos()]
      parts.append((frames.raw_source, np.concatenate(idx), str(d), frames.pixels))
  if not parts or not sum(len(p[1]) for p in parts):
    raise ValueError(f"{','.join(map(str, directories))}: no image in these datasets")
  return Records(parts)


class FramesDataset:
  """A built aff_wild2_frames dataset: its index (from metadata.json, no record read) and
  the frame records the pipelines take, the folder reader's records with bytes for paths."""

  def __init__(self, directory: str | os.PathLike):
    self.directory = str(directory)
    builder = _open(directory, AFFWILD2_FRAMES)
    meta = builder.info.metadata
    if not meta or "videos" not in meta:
      raise ValueError(f"{directory}: metadata.json without the video index; rebuild the dataset")
    self._videos: dict = meta["videos"]
    self._sets: dict = meta["sets"]
    self.pixels = _pixels(builder)  # S of an RGB dataset, None for encoded images
    self._builder = builder
    self.raw_source = _source(builder, FRAMES_SPLIT, raw=True)  # what `Records` parse

  @functools.cached_property
  def source(self):
    """The frame records decoded by TFDS, by index: for looking at what is stored (the
    pipelines parse `raw_source` themselves)."""
    return _source(self._builder, FRAMES_SPLIT)

  def videos(self, with_test: bool = True) -> dict[str, int]:
    """{video: num_frames} like `affwild2.all_videos`."""
    keep = set()
    for task_sets in self._sets.values():
      for split, names in task_sets.items():
        if with_test or split != affwild2.TEST_SET:
          keep.update(names)
    return {v: int(self._videos[v]["num_frames"]) for v in sorted(keep)}

  def list_videos(self, task: str, split: str) -> list[str]:
    """Sorted video names of a task's split, like `affwild2.list_videos`."""
    if task not in self._sets:
      raise FileNotFoundError(f"{self.directory}: no videos of task {task}")
    return list(self._sets[task].get(split, []))

  def fold_videos(self, task: str, fold: int) -> dict[str, list[str]]:
    """{'train', 'val'} video names of fold `fold`, as `affwild2.fold_videos`."""
    train = self.list_videos(task, affwild2.TRAIN_SET)
    val = self.list_videos(task, affwild2.VALIDATION_SET)
    return affwild2.fold_split(train, val, fold)

  def start(self, video: str) -> int:
    return int(self._videos[video]["start"])

  def has_image(self, video: str) -> np.ndarray:
    has = np.ones(int(self._videos[video]["num_frames"]), bool)
    has[self._videos[video]["missing"]] = False
    return has

  def where(self, video: str) -> str:
    """The video's records, for messages."""
    return f"{self.directory}: video {video}"

  def fingerprint(self, video: str) -> str:
    """What a video's visual features are made from: a hash of its image bytes as stored
    (and S for an RGB build, so it never shares one with an encoded build)."""
    kind = "" if self.pixels is None else f"rgb{self.pixels}:"
    return f"tfds:{kind}{self._videos[video]['sha256']}"

  def expr_labels(self, video: str) -> np.ndarray:
    return np.array([EXPR_CODES.find(c) for c in self._videos[video]["expr"]], np.int32)

  def expr_records(self, split: str) -> Records:
    """{'image', 'path', 'label'} of every frame of the EXPR `split` with a valid label (a
    frame without an image holds its stand-in's image), as `finetune.frame_records`."""
    idx, labels = [], []
    for v in self.list_videos("EXPR", split):
      lab = self.expr_labels(v)
      valid = np.flatnonzero(lab >= 0)
      idx.append(self.start(v) + valid)
      labels.append(lab[valid])
    if not idx or not sum(map(len, idx)):
      raise ValueError(f"{self.directory}: no valid EXPR labels in {split}")
    return Records([(self.raw_source, np.concatenate(idx), self.directory, self.pixels)],
                   {"label": np.concatenate(labels).astype(np.int32)})

  def image_records(self, videos: Sequence[str]) -> Records:
    """{'image', 'path', 'video', 'frame'} of each frame with an image of `videos` (video =
    position in `videos`), in order, as the extraction's folder records."""
    idx, vid, frame = [], [], []
    for i, v in enumerate(videos):
      k = np.flatnonzero(self.has_image(v))
      idx.append(self.start(v) + k)
      vid.append(np.full(len(k), i, np.int32))
      frame.append(k.astype(np.int32))
    cat = lambda xs, dt: np.concatenate(xs) if xs else np.zeros(0, dt)
    return Records([(self.raw_source, cat(idx, np.int64), self.directory, self.pixels)],
                   {"video": cat(vid, np.int32), "frame": cat(frame, np.int32)})

