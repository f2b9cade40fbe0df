"""Damaged and unusual inputs, as a new user's data holds them, through the stages that read
them: each case names the damage, the stage, and either the exact fragment of the error (which
names the file, line or key) or the check that the stage made the right thing of it. After a
refused run, nothing already written is changed: every file of the output folder (a complete
feature store of the undamaged data, a used workdir) is as it was.

Each case damages a fresh copy of the tiny synthetic set (mtimes kept, so the copied feature
store is complete for it and a rerun recomputes only the damaged video)."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import shutil
import wave
from typing import Callable

import numpy as np
import pytest
from PIL import Image
import safetensors.numpy

from affect_jax import pixel_baseline
from affect_jax.data import affwild2 as aw
from affect_jax.data import audio, features, tfds_builders
from affect_jax.models import convert
from affect_jax.train import extract, finetune, loop, pretrain, temporal
from configs import common, expr_finetune, mae_pretrain
from tests.models import test_convert
from tests.train.conftest import IMAGE, extract_config_for

VA_DIR = "VA_Estimation_Challenge/Train_Set"


@dataclasses.dataclass(frozen=True)
class Case:
  id: str
  damage: Callable[[str], dict]   # damages the dataset at root; returns names for `error`
  stages: tuple[str, ...]         # see STAGES
  error: str | None = None        # the message fragment, formatted with damage()'s names
  check: Callable | None = None   # for accepted input: check(root, names, stage result)


# ---- What a damage function picks and does ----


def _va_video(root) -> str:
  """A Train_Set VA video with its own audio track (not one of a _left/_right pair)."""
  return next(v for v in aw.list_videos(root, "VA", aw.TRAIN_SET) if aw.source_video(v) == v)


def _annotation(root) -> str:
  return os.path.join(root, VA_DIR, f"{_va_video(root)}.txt")


def _edit_annotation(edit):
  def damage(root):
    path = _annotation(root)
    with open(path, newline="") as f:
      lines = f.read().split("\n")
    with open(path, "w", newline="") as f:
      f.write(edit(lines))
    return {"ann": path}
  return damage


def _set_line(k: int, text: str):  # k: 1-based line number
  return _edit_annotation(lambda lines: "\n".join(lines[:k - 1] + [text] + lines[k:]))


def _labels_for(num_images_kept: int | None = None, extra_rows: int = 0):
  """Rows past the last image (extra_rows), or the images cut to the first few (-1: the
  frames folder removed)."""
  def damage(root):
    video, path = _va_video(root), _annotation(root)
    folder = os.path.join(root, aw.FRAMES_DIR, video)
    if num_images_kept == -1:
      shutil.rmtree(folder)
    elif num_images_kept is not None:
      for name in sorted(os.listdir(folder))[num_images_kept:]:
        os.remove(os.path.join(folder, name))
    with open(path, "a") as f:
      f.write("0.1,0.1\n" * extra_rows)
    return {"ann": path, "frames": folder, "video": video}
  return damage


def _frame(root, k=3) -> str:
  video = _va_video(root)
  index = int(aw.image_indices(root, video)[k])
  return os.path.join(root, aw.FRAMES_DIR, video, aw.frame_name(index))


def _rewrite_frame(how):
  def damage(root):
    path = _frame(root)
    how(path)
    return {"path": path, "video": _va_video(root)}
  return damage


def _truncate(path):
  data = open(path, "rb").read()
  open(path, "wb").write(data[: len(data) // 2])


def _zero(path):
  open(path, "wb").close()


def _recolour(mode, fmt="JPEG"):
  def how(path):
    with Image.open(path) as im:
      im = im.convert(mode)
    im.save(path, format=fmt)  # a PNG under a .jpg name: read by content, as PIL does
  return how


def _wav(how):
  def damage(root):
    video = _va_video(root)
    path = str(aw.audio_path(root, video))
    x, rate = audio.read_wav(path)
    how(path, x, rate)
    return {"wav": path, "video": video}
  return damage


def _write_wav(path, x, rate, channels=1):
  with wave.open(path, "wb") as f:
    f.setnchannels(channels)
    f.setsampwidth(2)
    f.setframerate(rate)
    f.writeframes((np.clip(x, -1, 1) * 32767).astype("<i2").tobytes())


def _stereo(path, x, rate):
  _write_wav(path, np.stack([x, x], axis=1).reshape(-1), rate, channels=2)


def _48k(path, x, rate):
  _write_wav(path, audio.resample(x, rate, 48000), 48000)


def _cut(fraction):
  return lambda path, x, rate: _write_wav(path, x[: int(fraction * len(x))], rate)


def _bytes(data: bytes):
  def how(path, x, rate):
    open(path, "wb").write(data)
  return how


# ---- Checks of accepted input ----


def _same_labels_as_clean(root, names, result):
  assert result["labels"].shape[1] == 2 and np.isfinite(result["labels"]).all()


def _frame_repaired(root, names, store):
  """The unreadable frame takes its neighbour's feature, and is counted (beside the frames
  that have no image)."""
  meta = store.meta(names["video"])
  assert meta["repaired_frames"] == meta["frames_without_image"] + 1, meta


def _frame_used(root, names, store):
  meta = store.meta(names["video"])
  assert meta["repaired_frames"] == meta["frames_without_image"], meta


def _audio_like_clean(root, names, store):
  assert store.meta(names["video"])["frames_without_audio"] == 0


def _audio_partly_silent(root, names, store):
  assert store.meta(names["video"])["frames_without_audio"] > 0


ANNOTATION_STAGES = ("temporal", "extract", "pixel")  # the stages that read VA annotations
FRAMES_STAGES = ANNOTATION_STAGES + ("finetune",)  # the video is in the EXPR set too
# The stages that turn images into features ('extract_visual_tfds': from an ArrayRecord
# dataset built from the damaged tree, into a store of its own).
FRAME_STAGES = ("extract_visual", "extract_visual_tfds", "pixel_store")

CASES = [
    # -- annotations
    Case("bom", _edit_annotation(lambda lines: "\ufeff" + "\n".join(lines)), ("read",),
         check=_same_labels_as_clean),
    Case("crlf", _edit_annotation(lambda lines: "\r\n".join(lines)), ("read",),
         check=_same_labels_as_clean),
    Case("trailing_blank_lines", _edit_annotation(lambda lines: "\n".join(lines) + "\n\n\n"),
         ("read",), check=_same_labels_as_clean),
    Case("blank_line_inside", _set_line(3, ""), ANNOTATION_STAGES,
         "{ann}:3: expected 2 comma-separated value(s) for task VA, found 1: ''"),
    Case("extra_column", _set_line(4, "0.1,0.2,0.3"), ANNOTATION_STAGES,
         "{ann}:4: expected 2 comma-separated value(s) for task VA, found 3: '0.1,0.2,0.3'"),
    Case("nan", _set_line(5, "nan,0.2"), ANNOTATION_STAGES, "{ann}:5: non-finite value in 'nan,0.2'"),
    Case("out_of_range", _set_line(6, "1.5,0.2"), ANNOTATION_STAGES,
         "{ann}:6: values must be in [-1, 1] or -5 (invalid); found '1.5,0.2'"),
    Case("missing_header", _set_line(1, "0.1,0.2"), ANNOTATION_STAGES,
         "{ann}:1: missing header line: expected 'valence,arousal', found data '0.1,0.2'"),
    Case("labels_past_the_images", _labels_for(extra_rows=40), ANNOTATION_STAGES,
         "label rows, but the last 40 label row(s) have no image and reuse frame"),
    Case("images_past_the_labels", _labels_for(num_images_kept=5), FRAMES_STAGES,
         "label row(s) have no image and reuse frame 00005.jpg"),
    Case("empty_frames_folder", _labels_for(num_images_kept=0), FRAMES_STAGES,
         "{frames} holds no frame image for its"),
    Case("annotation_without_folder", _labels_for(num_images_kept=-1), FRAMES_STAGES,
         "annotation for video '{video}' has no frames folder {frames}"),
    # -- frames
    Case("truncated_jpeg", _rewrite_frame(_truncate), FRAME_STAGES, check=_frame_repaired),
    Case("zero_byte_jpeg", _rewrite_frame(_zero), FRAME_STAGES, check=_frame_repaired),
    Case("grey_frame", _rewrite_frame(_recolour("L")), FRAME_STAGES, check=_frame_used),
    Case("rgba_png_frame", _rewrite_frame(_recolour("RGBA", "PNG")), FRAME_STAGES,
         check=_frame_used),
    Case("cmyk_frame", _rewrite_frame(_recolour("CMYK")), FRAME_STAGES, check=_frame_used),
    # -- audio
    Case("stereo_wav", _wav(_stereo), ("extract_audio",), check=_audio_like_clean),
    Case("wav_48khz", _wav(_48k), ("extract_audio",), check=_audio_like_clean),
    Case("wav_70_percent", _wav(_cut(0.7)), ("extract_audio",), check=_audio_partly_silent),
    Case("wav_25_percent", _wav(_cut(0.25)), ("extract_audio",),
         "{wav}: the audio ends before video {video}: it covers "),
    Case("wav_no_samples", _wav(_cut(0.0)), ("extract_audio",),
         "{wav}: the audio ends before video {video}: it covers 0% of its"),
    Case("zero_byte_wav", _wav(_bytes(b"")), ("extract_audio",),
         "{wav}: not a readable WAV file (empty or truncated header)"),
    Case("random_bytes_wav", _wav(_bytes(b"\x17" * 3000)), ("extract_audio",),
         "{wav}: not a WAV file (no RIFF/WAVE header)"),
    Case("missing_wav", _wav(lambda path, x, rate: os.remove(path)), ("extract_audio",),
         "{wav}: no audio track for video "),
]


def _files(folder) -> dict[str, str]:
  out = {}
  for dirpath, _, names in os.walk(folder):
    for n in names:
      p = os.path.join(dirpath, n)
      out[os.path.relpath(p, folder)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
  return out


@pytest.fixture(scope="module")
def clean(synthetic_root, finetune_workdir, tmp_path_factory):
  """A feature store of both modalities made from the undamaged data."""
  out = tmp_path_factory.mktemp("clean_features")
  extract.run(extract_config_for(synthetic_root, finetune_workdir), str(out), log=lambda s: None)
  return out


def _run_stage(stage, root, tmp_path, finetune_workdir, out):
  """Runs `stage` on the dataset at root; extraction writes into `out` (a complete store of
  the undamaged data), the others read it."""
  if stage == "read":
    return {"labels": aw.load_video(root, "VA", aw.TRAIN_SET, _va_video(root)).labels}
  if stage == "temporal":
    c = common.get_temporal_config("VA", "tiny")
    c.data.root, c.data.visual_features = root, str(out / "visual")
    return temporal.train_and_evaluate(c, str(tmp_path / "temporal"))
  if stage == "finetune":
    c = expr_finetune.get_config("tiny")
    c.data.root, c.data.image_size, c.batch_size, c.num_steps = root, IMAGE, 16, 1
    return finetune.train_and_evaluate(c, str(tmp_path / "finetune"))
  if stage == "pixel":
    return pixel_baseline.evaluate(root, tasks=("VA",), size=4)
  if stage == "pixel_store":
    return features.FeatureStore(pixel_baseline.write_feature_store(root, tmp_path / "pixels", 4))
  config = extract_config_for(root, finetune_workdir)
  if stage == "extract_visual_tfds":
    config.data.source, config.audio = "tfds", False
    config.data.tfds_dir = str(tfds_builders.build(tfds_builders.AFFWILD2_FRAMES, tmp_path / "tfds",
                                                   manual_dir=root))
    extract.run(config, str(tmp_path / "tfds_features"), log=lambda s: None)
    return features.FeatureStore(tmp_path / "tfds_features" / "visual")
  config.visual, config.audio = stage in ("extract", "extract_visual"), stage in ("extract", "extract_audio")
  extract.run(config, str(out), log=lambda s: None)
  return features.FeatureStore(out / ("visual" if config.visual else "audio"))


@pytest.mark.parametrize("case,stage", [(c, s) for c in CASES for s in c.stages],
                         ids=[f"{c.id}-{s}" for c in CASES for s in c.stages])
def test_hostile_input(case, stage, synthetic_root, finetune_workdir, clean, tmp_path):
  root, out = tmp_path / "data", tmp_path / "features"
  shutil.copytree(synthetic_root, root)  # copy2: mtimes kept, the copied store is complete
  shutil.copytree(clean, out)
  names = case.damage(str(root))
  before = _files(out)
  if case.error is not None:
    with pytest.raises(Exception, match=re.escape(case.error.format(**names))):
      _run_stage(stage, str(root), tmp_path, finetune_workdir, out)
    assert _files(out) == before  # nothing already written was changed
    return
  result = _run_stage(stage, str(root), tmp_path, finetune_workdir, out)
  case.check(str(root), names, result)
  # Only the damaged video was recomputed.
  changed = {k for k, v in _files(out).items() if before.get(k) != v}
  assert {os.path.basename(k).rsplit(".", 1)[0] for k in changed} <= {names.get("video")}, changed


# ---- Runs refused before they write anything: workdirs of other runs, batch sizes ----


def _finetune_config(root, **changes):
  """The config the session's finetune_workdir was made with (tests/train/conftest.py)."""
  c = expr_finetune.get_config("tiny")
  c.data.root, c.data.image_size = str(root), IMAGE
  c.batch_size, c.eval_batch_size = 16, 64
  c.num_steps, c.log_every, c.eval_every_epochs = 4, 2, 100.0
  for k, v in changes.items():
    c[k] = v
  return c


def _pretrain(root, workdir, **changes):
  c = mae_pretrain.get_config("tiny")
  c.data.root, c.data.image_size, c.batch_size, c.num_steps = str(root), IMAGE, 16, 1
  for k, v in changes.items():
    if k.startswith("data."):
      c.data[k[5:]] = v
    else:
      c[k] = v
  return pretrain.train_and_evaluate(c, str(workdir))


def _temporal(task, root, workdir, features_dir, **changes):
  c = common.get_temporal_config(task, "tiny")
  c.data.root, c.data.visual_features = str(root), str(features_dir / "visual")
  for k, v in changes.items():
    c[k] = v
  return temporal.train_and_evaluate(c, str(workdir))


def _va_then_expr(root, workdir, clean):
  c = common.get_temporal_config("VA", "tiny")
  loop.open_workdir(c, workdir, "temporal VA")  # what a VA run writes first
  _temporal("EXPR", root, workdir, clean)


REFUSED = {
    "pretrain_into_a_finetune_workdir": (
        lambda root, wd, clean, mae: _pretrain(root, wd),
        "{wd} holds a finetune run, not pretrain: use a new --workdir"),
    "expr_into_a_va_workdir": (
        lambda root, wd, clean, mae: _va_then_expr(root, wd / "va", clean),
        "{wd}/va holds a temporal VA run, not temporal EXPR: use a new --workdir"),
    "resume_false_into_a_used_workdir": (
        lambda root, wd, clean, mae: finetune.train_and_evaluate(
            _finetune_config(root, resume=False, init=_init(mae)), str(wd)),
        "{wd} already holds checkpoints of a finetune run and config.resume=False: use a new "
        "--workdir, or --config.resume=True"),
    "resume_with_another_config": (
        lambda root, wd, clean, mae: finetune.train_and_evaluate(
            _finetune_config(root, seed=7, init=_init(mae)), str(wd)),
        "{wd} holds a finetune run of another config (seed: 0 -> 7): use a new --workdir"),
    "finetune_batch_not_dividing_the_devices": (
        lambda root, wd, clean, mae: finetune.train_and_evaluate(
            _finetune_config(root, batch_size=12), str(wd / "new")),
        "config.batch_size=12 must divide over the 8 data-parallel devices"),
    "pretrain_batch_not_dividing_the_devices": (
        lambda root, wd, clean, mae: _pretrain(root, wd / "new", batch_size=12),
        "config.batch_size=12 must divide over the 8 data-parallel devices"),
    "temporal_batch_not_dividing_the_devices": (
        lambda root, wd, clean, mae: _temporal("VA", root, wd / "new", clean, batch_size=12),
        "config.batch_size=12 must divide over the 8 data-parallel devices"),
}


def _init(mae_workdir):
  c = expr_finetune.get_config("tiny").init
  c.mae_workdir = str(mae_workdir)
  return c


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_refused_run_changes_nothing(name, synthetic_root, finetune_workdir, mae_workdir, clean,
                                     tmp_path):
  run, message = REFUSED[name]
  workdir = tmp_path / "workdir"
  shutil.copytree(finetune_workdir, workdir)  # a used fine-tuning workdir
  before = _files(workdir)
  with pytest.raises(Exception, match=re.escape(message.format(wd=workdir))):
    run(synthetic_root, workdir, clean, mae_workdir)
  after = _files(workdir)
  assert {k: v for k, v in after.items() if k in before} == before


# ---- Weight files a user converts (launch/convert_weights.py), and a corpus of bad images ----


def _state_file(tmp_path, name, edit=None):
  state = test_convert._timm_state("vit_cls")
  if edit:
    edit(state)
  path = str(tmp_path / name)
  safetensors.numpy.save_file(state, path)
  return path


def _raw_file(tmp_path, name, data: bytes):
  path = tmp_path / name
  path.write_bytes(data)
  return str(path)


WEIGHTS = {
    "random_bytes_safetensors": (
        lambda t: _raw_file(t, "w.safetensors", b"\x93" * 4096),
        "{path}: not a readable safetensors file (Error while deserializing header: header too large)"),
    "zero_byte_safetensors": (
        lambda t: _raw_file(t, "w.safetensors", b""),
        "{path}: not a readable safetensors file ("),
    "truncated_safetensors": (
        lambda t: _raw_file(t, "w.safetensors", open(_state_file(t, "x.safetensors"), "rb").read()[:300]),
        "{path}: not a readable safetensors file ("),
    "text_named_npz": (
        lambda t: _raw_file(t, "w.npz", b"not weights\n"),
        "{path}: not a readable npz file (not a zip archive)"),
    "pytorch_pickle": (  # a bare pickle, not torch.save's zip archive: never unpickled
        lambda t: _raw_file(t, "w.pth", b"\x80\x04K\x01."),
        "{path}: not a torch.save zip archive (expected the zip file torch >= 1.6 writes"),
    "unknown_extension": (
        lambda t: _raw_file(t, "w.pkl", b"\x80\x04K\x01."),
        "{path}: expected a .safetensors, .npz or PyTorch (.pth/.pt/.bin/.ckpt) state dict"),
    "wrong_shape": (
        lambda t: _state_file(t, "w.safetensors", lambda s: s.update(
            {"blocks.0.mlp.fc1.weight": np.ones((65, 32), np.float32)})),
        "{path} (timm / facebookresearch/mae layout): The checkpoint does not match the model.\nwrong shape (1):\n  "
        "blocks.0.mlp.fc1.weight: checkpoint (65, 32), expected (64, 32)"),
    "extra_key": (
        lambda t: _state_file(t, "w.safetensors", lambda s: s.update(
            {"blocks.0.attn.q_norm.weight": np.ones(32, np.float32)})),
        "{path} (timm / facebookresearch/mae layout): The checkpoint does not match the model.\nunexpected (1):\n  "
        "blocks.0.attn.q_norm.weight"),
    "missing_key": (
        lambda t: _state_file(t, "w.safetensors", lambda s: s.pop("blocks.1.mlp.fc2.bias")),
        "{path} (timm / facebookresearch/mae layout): The checkpoint does not match the model.\nmissing (1):\n  blocks.1.mlp.fc2.bias"),
}


@pytest.mark.parametrize("name", sorted(WEIGHTS))
def test_weight_file_errors_name_the_file(name, tmp_path):
  make, message = WEIGHTS[name]
  path = make(tmp_path)
  with pytest.raises(ValueError, match=re.escape(message.format(path=path))):
    convert.convert_checkpoint(path, "vit", "tiny", **test_convert.ENCODER)


@pytest.mark.parametrize("content", [b"", b"\xff\xd8\xff garbage"], ids=["zero_bytes", "garbage"])
def test_pretraining_on_a_corpus_of_unreadable_images_names_it(content, synthetic_root, tmp_path):
  root = tmp_path / "data"
  shutil.copytree(synthetic_root, root)
  images = sorted((root / aw.FRAMES_DIR).rglob("*.jpg"))
  for p in images:
    p.write_bytes(content)
  with pytest.raises(ValueError, match=re.escape(
      f"{root / aw.FRAMES_DIR}: no readable image in the face corpus ({len(images)} of "
      f"{len(images)} unreadable, e.g. {images[0]}: ")):
    _pretrain(root, tmp_path / "mae", **{"data.index_cache": str(tmp_path / "index")})
