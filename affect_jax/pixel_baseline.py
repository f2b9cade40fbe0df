"""A per-frame linear baseline on downsampled pixels: how much a model that sees one frame
at a time, with no learning of features, gets on a dataset (a headroom check beside the
oracle). Ridge regression for VA, multinomial logistic regression for Expr, one logistic
regression per AU (full-batch optax Adam on standardised features).

The regularisation strength is picked from a small grid on the scored split itself, so the
numbers are optimistic for a linear pixel model: a ceiling for it, not an estimate.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from PIL import Image

from affect_jax import fileio, losses, metrics, tasks
from affect_jax.data import affwild2 as aw
from affect_jax.data import features, loaders


def _pixels_and_repaired(root, video, num_frames, has_image, size) -> tuple[np.ndarray, int]:
  """(frame_pixels, number of frames that took another frame's pixels)."""
  frames_dir = os.path.join(root, aw.FRAMES_DIR, video)
  read = {}
  for k in np.flatnonzero(has_image):
    path = os.path.join(frames_dir, aw.frame_name(int(k) + 1))
    try:
      image = loaders.load_rgb(path)
    except Exception as e:  # noqa: BLE001 - repaired as a missing frame, as extraction does
      logging.warning("%s: unreadable image (%s: %s); using the nearest readable frame's "
                      "pixels (replace or delete the file)", path, type(e).__name__, e)
      continue
    read[int(k)] = np.asarray(image.resize((size, size), Image.Resampling.BOX),
                              np.float32).reshape(-1) / 255.0
  return aw.repair_frames(read, num_frames, frames_dir)


def frame_pixels(root: str | os.PathLike, video: str, num_frames: int, has_image: np.ndarray,
                 size: int = 12) -> np.ndarray:
  """float32 [T, size*size*3] in [0, 1]; a frame without a (readable) image uses the nearest
  one's, as feature extraction repairs it (unreadable images are logged with their path)."""
  return _pixels_and_repaired(root, video, num_frames, has_image, size)[0]


def write_feature_store(root: str | os.PathLike, out_dir: str | os.PathLike,
                        size: int = 12) -> str:
  """The downsampled pixels of every frame of every video as a visual feature store, so the
  temporal models can be trained on them (`--config.data.visual_features=<returned path>`):
  what the temporal stage makes of features that do carry per-frame affect. Returns the path.
  A rerun recomputes only the videos whose frame images changed (`aw.frames_fingerprint`).
  """
  kind = "visual"  # the store is named by its kind, as launch/extract.py names its stores
  store = features.FeatureStore.create(
      os.path.join(out_dir, kind), kind=kind, dim=size * size * 3,
      dtype="float16", model_hash=f"pixels{size}", config={"pixels": size})
  for video, num_frames in aw.all_videos(root).items():
    inputs = aw.frames_fingerprint(root, video, num_frames)
    if store.has(video, num_frames, inputs):
      continue
    has_image = aw.image_mask(root, video, num_frames)
    pixels, repaired = _pixels_and_repaired(root, video, num_frames, has_image, size)
    store.write(video, pixels.astype(np.float16), inputs=inputs, repaired_frames=repaired,
                frames_without_image=int((~has_image).sum()))
  return str(store.root)


def _split_arrays(root, task, split, size):
  """(pixels [N, F], labels [N, ...], {video: frames}) of a split's videos in name order."""
  xs, ys, names = [], [], {}
  for v in sorted(aw.load_split(root, task, split, with_test_labels=(split == aw.TEST_SET)),
                  key=lambda v: v.video):
    xs.append(frame_pixels(root, v.video, v.num_frames, v.has_image, size))
    ys.append(v.labels)
    names[v.video] = len(v.labels)
  return np.concatenate(xs), np.concatenate(ys), names


def fit_ridge(x: np.ndarray, y: np.ndarray, l2: float) -> tuple[np.ndarray, np.ndarray]:
  """Closed-form ridge with an unpenalised intercept: (W [F, K], b [K])."""
  mx, my = x.mean(0), y.mean(0)
  xc = x - mx
  w = np.linalg.solve(xc.T @ xc + l2 * np.eye(x.shape[1]), xc.T @ (y - my))
  return w, my - mx @ w


def fit_logistic(x: np.ndarray, y: np.ndarray, mask: np.ndarray, *, multiclass: bool,
                 num_outputs: int, l2: float = 1e-3, steps: int = 300, lr: float = 0.05):
  """Full-batch Adam on the masked loss of affect_jax.losses; returns (W, b)."""
  params = {"w": jnp.zeros((x.shape[1], num_outputs)), "b": jnp.zeros(num_outputs)}
  tx = optax.adam(lr)
  x, y, mask = jnp.asarray(x), jnp.asarray(y), jnp.asarray(mask)

  def loss_fn(p):
    logits = x @ p["w"] + p["b"]
    data = (losses.masked_cross_entropy(logits, y, mask) if multiclass
            else losses.masked_bce_with_logits(logits, y, mask))
    return data + l2 * jnp.sum(p["w"] ** 2)

  @jax.jit
  def fit(p):
    def body(carry, _):
      p, s = carry
      g = jax.grad(loss_fn)(p)
      u, s = tx.update(g, s, p)
      return (optax.apply_updates(p, u), s), None
    (p, _), _ = jax.lax.scan(body, (p, tx.init(p)), None, length=steps)
    return p

  p = fit(params)
  return np.asarray(p["w"]), np.asarray(p["b"])


RIDGE_L2 = (1e1, 1e2, 1e3, 1e4)
LOGISTIC_L2 = (1e-4, 1e-3, 1e-2)


def _l2_grid(task: str) -> tuple[float, ...]:
  """Ridge penalties for a regression task, logistic ones otherwise."""
  return RIDGE_L2 if tasks.get(task).kind == tasks.REGRESSION else LOGISTIC_L2


def _fit_predict(task: str, x_tr, y_tr, x_evs, l2: float) -> list[np.ndarray]:
  """Fits one linear model on (x_tr, y_tr); its decided predictions (VA values, Expr
  classes, AU 0/1) for each x of x_evs."""
  spec = tasks.get(task)
  valid = spec.valid(y_tr)
  if spec.kind == tasks.REGRESSION:
    w, b = fit_ridge(x_tr[valid], y_tr[valid], l2)
    return [spec.decide(x @ w + b) for x in x_evs]
  if spec.kind == tasks.MULTICLASS:
    w, b = fit_logistic(x_tr, np.maximum(y_tr, 0), valid, multiclass=True,
                        num_outputs=spec.out_dim, l2=l2)
    return [spec.decide(x @ w + b) for x in x_evs]
  w, b = fit_logistic(x_tr, np.maximum(y_tr, 0).astype(np.float32), valid,
                      multiclass=False, num_outputs=spec.out_dim, l2=l2)
  return [(x @ w + b > 0).astype(np.int32) for x in x_evs]  # sigmoid > 0.5


def evaluate(root: str | os.PathLike, split: str = aw.VALIDATION_SET, size: int = 12,
             tasks=aw.TASKS, report_split: str | None = None, bootstrap_samples: int = 0,
             others: dict[str, tuple[str, str]] | None = None,
             predictions_dir: str | None = None) -> dict:
  """Fits on Train_Set and scores `split` (whole videos, valid frames) per task, with the
  regularisation that scores best on `split`; each task's result carries the chosen 'l2'.

  With `report_split` (e.g. Test_Set, labelled in the synthetic set) the model chosen on
  `split` is also scored there, under the key `report_split`: an honest held-out figure;
  `others` ({key: (root, split)}) scores it on other datasets' splits too (e.g. a fresh draw
  of videos), under `key`. With `bootstrap_samples` > 0, 'intervals' holds the
  `metrics.interval_record` of the headline score on each scored split (keyed by split name
  or `others` key), as the temporal runs report it. With `predictions_dir`, the decided
  predictions of every scored split go to `<predictions_dir>/<task>_<key>.npz`
  ({video: [T, ...]}), for paired comparisons with other models.
  """
  out = {}
  scored_sets = [(s, root, s) for s in (split, report_split) if s]
  scored_sets += [(key, r, s) for key, (r, s) in (others or {}).items()]
  for task in tasks:
    x_tr, y_tr, _ = _split_arrays(root, task, aw.TRAIN_SET, size)
    evs = [_split_arrays(r, task, s, size) for _, r, s in scored_sets]
    mu, sd = x_tr.mean(0), x_tr.std(0) + 1e-3
    x_tr = (x_tr - mu) / sd
    candidates = []
    for l2 in _l2_grid(task):
      preds = _fit_predict(task, x_tr, y_tr, [(x - mu) / sd for x, _, _ in evs], l2)
      scores = [metrics.task_scores(task, p, y) for p, (_, y, _) in zip(preds, evs)]
      result = {**scores[0], "l2": l2}
      for (key, _, _), sc in zip(scored_sets[1:], scores[1:]):
        result[key] = sc
      candidates.append((scores[0][metrics.MAIN_METRIC[task]], result, preds))
    _, out[task], preds = max(candidates, key=lambda c: c[0])
    per_video = {}
    for (key, _, _), p, (_, y, videos) in zip(scored_sets, preds, evs):
      cuts = np.cumsum(list(videos.values()))[:-1]
      per_video[key] = (dict(zip(videos, np.split(p, cuts))), np.split(y, cuts))
    if bootstrap_samples:
      out[task]["intervals"] = metrics.interval_record(
          task, {k: (list(p.values()), y) for k, (p, y) in per_video.items()}, bootstrap_samples)
    if predictions_dir:
      os.makedirs(predictions_dir, exist_ok=True)
      for key, (p, _) in per_video.items():
        fileio.atomic_write(os.path.join(predictions_dir, f"{task}_{key}.npz"),
                            lambda tmp, p=p: np.savez(tmp, **p))
  return out
