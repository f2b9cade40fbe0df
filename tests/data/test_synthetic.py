"""The synthetic Aff-Wild2 generator: layout, counts, determinism, rendering, oracle.

Written files are checked by parsing them here with plain Python, independently of the
generator's own formatting code.
"""

import dataclasses
import hashlib
import json
import pathlib
import wave

import numpy as np
import pytest
from PIL import Image

from affect_jax import metrics
from affect_jax.data.affwild2 import (
    AU_NAMES, AUDIO_DIR, AUDIO_RATE, EXPR_NAMES, FRAMES_DIR, TASK_COLUMNS, TASK_DIRS, TASKS,
    TEST_LABELS_DIR, TEST_SET, TRAIN_SET, VALIDATION_SET, frame_name)
from affect_jax.data.affwild2 import task_test_list as list_name
from affect_jax.data.synthetic import SyntheticConfig, dynamics, generate, render
from affect_jax.data.synthetic.audio import synthesize

SPLITS = (TRAIN_SET, VALIDATION_SET, TEST_SET)
CONFIG = SyntheticConfig(num_videos=6, min_frames=90, max_frames=150, image_size=32, seed=3)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  root = tmp_path_factory.mktemp("synthetic")
  return root, generate(root, CONFIG)


def _label_file(root, task, split, video) -> pathlib.Path:
  if split == TEST_SET:
    return root / TEST_LABELS_DIR / TASK_DIRS[task][0] / f"{video}.txt"
  return root / TASK_DIRS[task][0] / split / f"{video}.txt"


def _read_labels(path) -> tuple[str, list[list[float]]]:
  lines = path.read_text().splitlines()
  return lines[0], [[float(x) for x in line.split(",")] for line in lines[1:]]


def _is_invalid(task, row) -> bool:
  return row[0] == -5 if task == "VA" else row[0] == -1


def _tree_digest(root) -> dict:
  return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(pathlib.Path(root).rglob("*")) if p.is_file()}


def test_frames_match_manifest(dataset):
  root, manifest = dataset
  for video, entry in manifest["videos"].items():
    names = {p.name for p in (root / FRAMES_DIR / video).iterdir()}
    present = set(range(1, entry["num_frames"] + 1)) - set(entry["missing_frames"])
    assert names == {frame_name(k) for k in present}
    with Image.open(root / FRAMES_DIR / video / frame_name(min(present))) as img:
      assert img.format == "JPEG" and img.mode == "RGB" and img.size == (32, 32)
  missing = [e["missing_frames"] for e in manifest["videos"].values()]
  assert any(1 in m for m in missing), "some video must miss its first frame"
  assert any(any(1 < k < e["num_frames"] for k in e["missing_frames"]) for e in manifest["videos"].values())


def test_annotation_files(dataset):
  root, manifest = dataset
  for video, entry in manifest["videos"].items():
    for task, info in entry["tasks"].items():
      header, rows = _read_labels(_label_file(root, task, info["split"], video))
      assert header == ",".join(TASK_COLUMNS[task])
      assert len(rows) == entry["num_frames"]
      for row in rows:
        if task == "VA":
          assert row == [-5, -5] or all(-1 <= x <= 1 for x in row)
        elif task == "EXPR":
          assert len(row) == 1 and row[0] in range(-1, len(EXPR_NAMES))
        else:
          assert row == [-1] * len(AU_NAMES) or (len(row) == len(AU_NAMES) and set(row) <= {0, 1})


def test_splits_and_test_lists(dataset):
  root, manifest = dataset
  for task in TASKS:
    listed = (root / list_name(task)).read_text().split()
    expected = {v for v, e in manifest["videos"].items() if e["tasks"].get(task, {}).get("split") == TEST_SET}
    assert set(listed) == expected and expected
    for split in (TRAIN_SET, VALIDATION_SET):
      files = {p.stem for p in (root / TASK_DIRS[task][0] / split).iterdir()}
      in_split = {v for v, e in manifest["videos"].items() if e["tasks"].get(task, {}).get("split") == split}
      assert files == in_split
      assert files and not files & expected
    assert {p.stem for p in (root / TEST_LABELS_DIR / TASK_DIRS[task][0]).iterdir()} == expected
  for entry in manifest["videos"].values():  # a video is in one split for every task
    assert len({info["split"] for info in entry["tasks"].values()}) == 1


def test_a_draw_of_test_videos_only(tmp_path):
  """train_fraction = validation_fraction = 0 (a fresh draw to score on): every labelled video
  is a test video, the annotation folders exist and are empty, and the reader agrees."""
  from affect_jax.data import affwild2
  config = dataclasses.replace(CONFIG, num_videos=5, max_frames=100, seed=9, train_fraction=0.0,
                               validation_fraction=0.0)
  manifest = generate(tmp_path, config)
  for task in TASKS:
    for split in (TRAIN_SET, VALIDATION_SET):
      assert not any((tmp_path / TASK_DIRS[task][0] / split).iterdir())
      assert manifest["totals"][task][split]["videos"] == 0
    listed = (tmp_path / list_name(task)).read_text().split()
    labelled = {v for v, e in manifest["videos"].items() if task in e["tasks"]}
    assert set(listed) == labelled and labelled
    assert {v.video for v in affwild2.load_split(tmp_path, task, TEST_SET, True)} == labelled
  # Another seed, other people: no video's frames are the first dataset's.
  assert len(manifest["videos"]) == 5


def test_pairs_share_split_and_audio(dataset):
  root, manifest = dataset
  videos = manifest["videos"]
  lefts = [v for v in videos if v.endswith("_left")]
  assert lefts
  for left in lefts:
    right = left[:-len("_left")] + "_right"
    source = videos[left]["source_video"]
    assert videos[right]["source_video"] == source == left[:-len("_left")]
    assert videos[left]["num_frames"] == videos[right]["num_frames"]
    splits = {i["split"] for v in (left, right) for i in videos[v]["tasks"].values()}
    assert len(splits) == 1
  sources = {e["source_video"]: e["num_frames"] for e in videos.values()}
  assert {p.stem for p in (root / AUDIO_DIR).iterdir()} == set(sources)
  for source, num_frames in sources.items():
    with wave.open(str(root / AUDIO_DIR / f"{source}.wav")) as f:
      assert (f.getnchannels(), f.getsampwidth(), f.getframerate()) == (1, 2, AUDIO_RATE)
      assert f.getnframes() == round(num_frames * AUDIO_RATE / CONFIG.fps)


def test_manifest_counts_match_files(dataset):
  root, manifest = dataset
  totals = {t: {s: {"videos": 0, "frames": 0, "valid": 0, "invalid": 0} for s in SPLITS} for t in TASKS}
  for video, entry in manifest["videos"].items():
    for task, info in entry["tasks"].items():
      _, rows = _read_labels(_label_file(root, task, info["split"], video))
      invalid = sum(_is_invalid(task, row) for row in rows)
      assert (info["valid"], info["invalid"]) == (len(rows) - invalid, invalid)
      row = totals[task][info["split"]]
      row["videos"] += 1
      row["frames"] += len(rows)
      row["valid"] += len(rows) - invalid
      row["invalid"] += invalid
  assert manifest["totals"] == totals
  assert manifest["config"] == dataclasses.asdict(CONFIG)
  assert json.loads((root / "synthetic_manifest.json").read_text()) == manifest
  assert sum(r["invalid"] for t in totals.values() for r in t.values()) > 0


def test_same_seed_same_bytes_and_clean_overwrite(dataset, tmp_path):
  root, _ = dataset
  generate(tmp_path, dataclasses.replace(CONFIG, seed=4, num_videos=5))
  other = _tree_digest(tmp_path)
  generate(tmp_path, CONFIG)  # rerun into the same folder: nothing of seed 4 may survive
  assert _tree_digest(tmp_path) == _tree_digest(root)
  labels = lambda digest: sorted(h for p, h in digest.items() if p.endswith(".txt"))  # noqa: E731
  assert not set(labels(other)) & set(labels(_tree_digest(root)))


def test_refuses_foreign_folder(tmp_path):
  (tmp_path / "precious.txt").write_text("not a synthetic dataset")
  with pytest.raises(FileExistsError):
    generate(tmp_path, CONFIG)


def _au_diff(idn, k, size=112) -> np.ndarray:
  au = np.zeros(len(AU_NAMES))
  base = np.asarray(render.render_face(idn, au, size), np.int16)
  au[k] = 1.0
  return np.abs(np.asarray(render.render_face(idn, au, size), np.int16) - base).max(-1)  # [S, S]


@pytest.mark.parametrize("seed", [0, 7])
def test_each_au_moves_its_face_region(seed):
  idn = render.sample_identity(np.random.default_rng(seed))
  bands = {"brows": (0.0, 0.42), "eyes": (0.33, 0.55), "mouth": (0.6, 1.0)}
  region = {"AU1": "brows", "AU2": "brows", "AU4": "brows", "AU6": "eyes", "AU7": "eyes"}
  centre_x = {}
  for k, name in enumerate(AU_NAMES):
    diff = _au_diff(idn, k)
    ys, xs = np.nonzero(diff > 20)
    assert len(ys) >= 30, f"{name} barely changes the image"
    row = np.average(ys, weights=diff[ys, xs]) / diff.shape[0]
    lo, hi = bands[region.get(name, "mouth")]
    assert lo <= row <= hi, f"{name} changes rows around {row:.2f}, expected {lo}-{hi}"
    centre_x[name] = np.average(np.abs(xs - diff.shape[1] / 2), weights=diff[ys, xs])
  assert centre_x["AU1"] < centre_x["AU2"]  # inner vs outer brow


def test_expressions_look_different():
  idn = render.sample_identity(np.random.default_rng(1))
  face = {n: np.asarray(render.render_face(idn, dynamics.EXPR_PROTOTYPES[EXPR_NAMES.index(n)], 112), np.int16)
          for n in ("Happiness", "Sadness")}
  diff = np.abs(face["Happiness"] - face["Sadness"]).max(-1)
  assert (diff[70:95] > 30).sum() > 150  # the mouth and its folds


def test_expression_events_last_long_enough():
  fps, min_len = 30.0, 15
  for seed in range(8):
    rng = np.random.default_rng(seed)
    affect = dynamics.simulate_affect(rng, 600, fps, min_event_s=0.5)
    labels = dynamics.annotate_expr(rng, affect.expr, fps, np.zeros(600, bool), min_len)
    for seq in (affect.expr, labels):
      starts, lengths = dynamics.runs(seq)
      assert np.all(lengths[1:-1] >= min_len)
    assert set(np.unique(affect.expr)) <= set(range(len(EXPR_NAMES)))


def test_audio_follows_arousal():
  n, fps = 300, 30.0
  rms = []
  for arousal in (-0.8, 0.8):
    affect = dynamics.Affect(
        va=np.tile([0.0, arousal], (n, 1)), expr=np.zeros(n, int), au=np.zeros((n, 12)),
        blink=np.zeros(n), talk=np.ones(n), syllable_phase=np.linspace(0, 2 * np.pi * 40, n))
    track = synthesize(np.random.default_rng(0), affect, fps).astype(np.float64)
    rms.append(np.sqrt(np.mean(track**2)))
  assert rms[1] > 1.5 * rms[0]


def test_oracle(dataset):
  root, manifest = dataset
  oracle = json.loads((root / "oracle.json").read_text())
  for split in SPLITS:
    va = oracle["VA"][split]
    assert set(va) == {"valence", "arousal", "mean"} and all(-1 <= x <= 1 for x in va.values())
    assert 0 <= oracle["EXPR"][split]["f1"] <= 1
    assert set(oracle["AU"][split]["per_au"]) == set(AU_NAMES) and 0 <= oracle["AU"][split]["f1"] <= 1
    assert va["mean"] > 0.5  # a constant prediction scores CCC 0
  # Trivial predictors on the written train labels: the majority class, all AUs on.
  labels = {task: [] for task in TASKS}
  for video, entry in manifest["videos"].items():
    for task, info in entry["tasks"].items():
      if info["split"] == TRAIN_SET:
        labels[task] += _read_labels(_label_file(root, task, TRAIN_SET, video))[1]
  expr = np.array(labels["EXPR"], int)[:, 0]
  majority = np.bincount(expr[expr >= 0]).argmax()
  assert oracle["EXPR"][TRAIN_SET]["f1"] > metrics.expr_f1(np.full_like(expr, majority), expr) + 0.2
  au = np.array(labels["AU"], int)
  assert oracle["AU"][TRAIN_SET]["f1"] > metrics.au_f1(np.ones_like(au), au)["f1"] + 0.1
