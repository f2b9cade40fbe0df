"""Temporal-model training: overfitting one segment, a fold end to end, 5-fold CV, ablations."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from affect_jax import checkpoint, metrics, sharding
from affect_jax.data import features
from affect_jax.train import loop, temporal
from configs import common


def _config(task, root, paths, **kw):
  c = common.get_temporal_config(task, "tiny")
  c.data.root = str(root)
  c.data.visual_features = paths["visual"]
  c.data.audio_features = paths["audio"]
  c.data.segment_len, c.data.stride, c.data.predict_stride = 32, 24, 24
  c.num_steps, c.log_every, c.eval_every_epochs, c.checkpoint_every = 24, 8, 1.0, 24
  for k, v in kw.items():
    c[k] = v
  return c


@pytest.mark.parametrize("task", ["VA", "EXPR", "AU"])
def test_tiny_model_overfits_one_segment(task):
  c = common.get_temporal_config(task, "tiny")
  c.data.segment_len = 32
  c.optim.lr, c.optim.init_lr = 3e-3, 3e-3
  model = temporal.create_model(c)
  mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  schedule = optax.constant_schedule(3e-3)
  state, _ = temporal.create_train_state(c, model, jax.random.key(0), mesh, schedule, {"visual": 16})
  rng = np.random.default_rng(0)
  t = np.arange(32)
  feats = rng.normal(size=(2, 32, 16)).astype(np.float32)
  if task == "VA":
    label = np.stack([np.sin(t / 5), np.cos(t / 7)], -1)[None].repeat(2, 0).astype(np.float32)
  elif task == "EXPR":
    label = rng.integers(0, 8, (2, 32)).astype(np.int32)
  else:
    label = rng.integers(0, 2, (2, 32, 12)).astype(np.int32)
  mask = np.ones((2, 32), np.float32)
  batch = {"visual": feats, "label": label, "frame_mask": mask, "label_mask": mask}
  step = jax.jit(functools.partial(temporal.train_step, model=model, task=task,
                                   modalities=("visual",), seed=0, schedule=schedule,
                                   class_weights=None, pos_weight=None))
  losses = []
  for _ in range(300):
    state, m = step(state, batch)
    losses.append(float(m["loss"]))
  assert losses[-1] < 0.05 * losses[0] + 0.02, (losses[0], losses[-1])


@pytest.fixture(scope="module")
def va_run(synthetic_root, extracted, tmp_path_factory):
  _, paths, _ = extracted
  workdir = tmp_path_factory.mktemp("va")
  return workdir, temporal.train_and_evaluate(_config("VA", synthetic_root, paths), str(workdir))


def test_fold_run_reports_best_state_scores(synthetic_root, extracted, va_run):
  _, paths, _ = extracted
  workdir, out = va_run
  saved = json.loads((workdir / "results.json").read_text())
  assert saved["val"] == out["val"] and "test" in saved
  evals = [h["eval/mean"] for h in out["history"] if "eval/mean" in h]
  assert out["best_step"] == checkpoint.read_best(str(workdir))["step"]
  np.testing.assert_allclose(out["val"]["mean"], max(evals), atol=1e-6)
  # Recompute the validation CCC independently: raw per-window outputs of the best state,
  # averaged per frame by hand, scored with a plain CCC.
  c = _config("VA", synthetic_root, paths)
  model = temporal.create_model(c)
  mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  state, _ = temporal.create_train_state(c, model, jax.random.key(0), mesh,
                                         optax.constant_schedule(0.0), {"visual": 128})
  best = loop.load_best(str(workdir), state)
  store = features.FeatureStore(paths["visual"])
  labels = temporal.load_labels(str(synthetic_root), "VA", temporal.split_videos(c)["val"])
  preds, labs = [], []
  for video, lab in sorted(labels.items()):
    x = np.asarray(store.read(video), np.float32)
    total, count = np.zeros((len(x), 2)), np.zeros(len(x))
    for s in temporal.segments.segment_starts(len(x), 32, 24):
      win = np.zeros((1, 32, x.shape[1]), np.float32)
      n = min(32, len(x) - s)
      win[0, :n] = x[s:s + n]
      m = np.zeros((1, 32), np.float32)
      m[0, :n] = 1
      y = np.asarray(model.apply({"params": best["params"], "batch_stats": best["batch_stats"]},
                                 {"visual": jnp.asarray(win)}, jnp.asarray(m), train=False))[0, :n]
      total[s:s + n] += y
      count[s:s + n] += 1
    preds.append(np.clip(total / count[:, None], -1, 1))
    labs.append(lab.labels)
  p, l = np.concatenate(preds), np.concatenate(labs)
  ok = (l != -5).all(-1)
  want = np.mean([metrics.ccc(p[ok, d], l[ok, d]) for d in range(2)])
  np.testing.assert_allclose(out["val"]["mean"], want, atol=2e-4)
  # Its interval resamples those videos (in name order, as every run does).
  assert out["intervals"]["samples"] == c.bootstrap_samples > 0 and "test" in out["intervals"]
  np.testing.assert_allclose(out["intervals"]["val"], metrics.video_bootstrap(
      functools.partial(metrics.main_score, "VA"), preds, labs,
      num_samples=c.bootstrap_samples), atol=2e-4)


@pytest.mark.parametrize("task,kw", [
    ("AU", {}),
    ("EXPR", {"model.kind": "frame_mlp"}),
    ("VA", {"model.modalities": ("visual", "audio")}),
])
def test_tasks_and_ablations_train(synthetic_root, extracted, tmp_path, task, kw):
  _, paths, _ = extracted
  c = _config(task, synthetic_root, paths, num_steps=8, eval_every_epochs=100.0)
  for k, v in kw.items():
    section, field = k.split(".")
    c[section][field] = v
  out = temporal.train_and_evaluate(c, str(tmp_path))
  key = temporal.MAIN_METRIC[task]
  assert np.isfinite(out["val"][key])
  if task == "AU":
    # Thresholds tuned on validation can only help on validation.
    assert out["val"]["f1_tuned"] >= out["val"]["f1"] - 1e-9
    assert len(out["au_thresholds"]) == 12


def test_cross_validation_table(synthetic_root, extracted, tmp_path):
  _, paths, _ = extracted
  c = _config("EXPR", synthetic_root, paths, num_steps=3, eval_every_epochs=100.0)
  out = temporal.cross_validate(c, str(tmp_path))
  assert len(out["folds"]) == 5
  f1s = [f["f1"] for f in out["folds"]]
  np.testing.assert_allclose(out["summary"]["f1"]["mean"], np.mean(f1s))
  np.testing.assert_allclose(out["summary"]["f1"]["std"], np.std(f1s))
  assert "mean ± std" in (tmp_path / "cross_validation.md").read_text()


def test_submission_files_parse_back_with_the_data_layer(synthetic_root, va_run, tmp_path):
  from affect_jax import predict
  from affect_jax.data import affwild2
  workdir, _ = va_run
  paths = predict.write_submission(str(tmp_path), {"VA": str(workdir)}, affwild2.TEST_SET)
  back = affwild2.parse_predictions(paths["VA"], "VA")
  want = predict.split_frames(str(synthetic_root), "VA", affwild2.TEST_SET)
  assert {v: len(p) for v, p in back.items()} == want
  _, fn, _ = predict.load(str(workdir))
  video = sorted(want)[0]
  np.testing.assert_allclose(back[video], np.clip(fn({video: want[video]})[video], -1, 1), atol=1e-4)
  assert open(paths["VA"]).readline().strip() == "image_location,valence,arousal"
  png = tmp_path / "plot.png"
  predict.plot_video(str(png), "VA", back[video], None, "t")
  assert png.stat().st_size > 1000
  # One video of the run's split plotted against its labels; a video the split lacks is no plot.
  png = tmp_path / "video.png"
  assert predict.plot_run_video(str(png), str(workdir), affwild2.TEST_SET, video)
  assert png.stat().st_size > 1000
  assert not predict.plot_run_video(str(tmp_path / "none.png"), str(workdir), affwild2.TEST_SET,
                                    "no_such_video")
  assert not (tmp_path / "none.png").exists()


def test_median_video_is_the_middle_of_the_per_video_scores(synthetic_root, va_run):
  """The plotted example: the video whose own CCC (recomputed here in float64 from the run's
  predictions and the label files) is the lower median of the split's; the training split,
  the one with several videos here."""
  from affect_jax import predict
  from affect_jax.data import affwild2
  workdir, _ = va_run
  _, fn, _ = predict.load(str(workdir))
  frames = predict.split_frames(str(synthetic_root), "VA", affwild2.TRAIN_SET)
  assert len(frames) >= 4
  out = fn(frames)
  own = {}
  for video in frames:
    labels = affwild2.load_video(str(synthetic_root), "VA", affwild2.TRAIN_SET, video).labels
    valid = (labels > -5).all(axis=1)  # Aff-Wild2's -5 marks an invalid frame
    p, l = np.clip(out[video], -1, 1)[valid].astype(np.float64), labels[valid].astype(np.float64)
    cccs = [2 * np.cov(p[:, k], l[:, k], bias=True)[0, 1]
            / (p[:, k].var() + l[:, k].var() + (p[:, k].mean() - l[:, k].mean()) ** 2)
            for k in range(2)]
    own[video] = float(np.mean(cccs))
  ranked = sorted(own, key=own.get)
  video, score = predict.median_video(str(workdir), affwild2.TRAIN_SET)
  assert video == ranked[(len(ranked) - 1) // 2]
  assert score == pytest.approx(own[video], abs=1e-4)
  # evaluate's decisions (the demo's pairs take them from its one prediction) are decided's.
  scores, by_video = predict.evaluate(str(workdir), (affwild2.TRAIN_SET,), num_samples=20,
                                      with_decided=True)
  decisions, labels = by_video[affwild2.TRAIN_SET]
  assert sorted(decisions) == sorted(frames)
  np.testing.assert_array_equal(decisions[video], np.clip(out[video], -1, 1))
  np.testing.assert_array_equal(labels[video], affwild2.load_video(
      str(synthetic_root), "VA", affwild2.TRAIN_SET, video).labels)
  assert scores == predict.evaluate(str(workdir), (affwild2.TRAIN_SET,), num_samples=20)


def test_paired_comparison_of_two_runs(synthetic_root, extracted, va_run, tmp_path):
  from affect_jax import predict
  from affect_jax.data import affwild2
  _, paths, _ = extracted
  workdir, out = va_run
  c = _config("VA", synthetic_root, paths, num_steps=8, eval_every_epochs=100.0)
  c.model.kind = "frame_mlp"
  other = temporal.train_and_evaluate(c, str(tmp_path / "mlp"))
  cmp = predict.compare_models(str(workdir), str(tmp_path / "mlp"), num_samples=300)
  # Each side's score is what its own training run reported for its best state.
  for split, key in ((affwild2.VALIDATION_SET, "val"), (affwild2.TEST_SET, "test")):
    r = cmp[split]
    np.testing.assert_allclose([r["a"], r["b"]], [out[key]["mean"], other[key]["mean"]], atol=2e-4)
    assert r["difference"] == pytest.approx(r["a"] - r["b"])
    # Paired draws of two different models: with one video every draw is that video, so the
    # interval is the difference itself; with more, a spread (a model against itself would
    # give [0, 0]); and the share of wins agrees with where the interval lies.
    if len(predict.split_frames(str(synthetic_root), "VA", split)) == 1:
      np.testing.assert_allclose(r["interval"], [r["difference"]] * 2, atol=1e-9)
    else:
      assert r["interval"][0] < r["interval"][1]
    assert 0.0 <= r["p_a_better"] <= 1.0
    if r["interval"][0] > 0:
      assert r["p_a_better"] > 0.9
    if r["interval"][1] < 0:
      assert r["p_a_better"] < 0.1
  # A model against itself: zero in every draw.
  same = predict.compare_models(str(workdir), str(workdir), num_samples=50)
  for r in same.values():
    assert r["difference"] == 0.0 and r["interval"] == [0.0, 0.0] and r["p_a_better"] == 0.0
  au = _config("AU", synthetic_root, paths, num_steps=2, eval_every_epochs=100.0)
  temporal.train_and_evaluate(au, str(tmp_path / "au"))
  with pytest.raises(ValueError, match="not the same task"):
    predict.compare_models(str(workdir), str(tmp_path / "au"))


def test_a_trained_model_scored_on_another_dataset(synthetic_root, finetune_workdir, va_run,
                                                   tmp_path):
  """predict.evaluate / decided / compare_models with `data`: the model of one dataset on a
  fresh draw's videos through that draw's feature stores, checked against predictions made
  here from those stores directly."""
  import dataclasses

  from affect_jax import predict
  from affect_jax.data import affwild2, synthetic
  from affect_jax.train import extract
  from tests.conftest import TINY_SYNTHETIC
  from tests.train.conftest import extract_config_for
  workdir, out = va_run
  # The same data through `data`: the training run's own test scores.
  same = predict.evaluate(str(workdir), data={"root": str(synthetic_root)}, num_samples=50)
  assert same[affwild2.TEST_SET]["mean"] == pytest.approx(out["test"]["mean"], abs=2e-4)
  fresh = tmp_path / "fresh"
  synthetic.generate(fresh, dataclasses.replace(TINY_SYNTHETIC, seed=1011, num_videos=4,
                                                train_fraction=0.0, validation_fraction=0.0))
  paths = extract.run(extract_config_for(fresh, finetune_workdir), str(tmp_path / "feats"),
                      log=lambda s: None)
  data = {"root": str(fresh), "visual_features": paths["visual"], "audio_features": paths["audio"]}
  got = predict.evaluate(str(workdir), data=data, num_samples=50)[affwild2.TEST_SET]
  # Independently: the best params on the fresh store's features, merged and scored here.
  config = checkpoint.run_config(str(workdir))
  mesh = sharding.make_mesh(config.mesh_shape)
  params = checkpoint.load_params(str(workdir), "best")
  videos = {v.video: v for v in affwild2.load_split(fresh, "VA", affwild2.TEST_SET, True)}
  preds = temporal.predict_videos(
      temporal.make_predict_fn(temporal.create_model(config), "VA", mesh),
      {"params": params["params"], "batch_stats": params.get("batch_stats", {})},
      {"visual": features.FeatureStore(paths["visual"])},
      {v: l.num_frames for v, l in videos.items()}, segment_len=32, stride=24, merge=config.data.merge,
      batch_size=8, mesh=mesh)
  names = sorted(videos)
  want = metrics.va_scores(np.clip(np.concatenate([preds[v] for v in names]), -1, 1),
                           np.concatenate([videos[v].labels for v in names]))
  assert got["mean"] == pytest.approx(want["mean"], abs=1e-4)
  assert got["interval"][0] <= got["interval"][1]
  decided = predict.decided(str(workdir), (affwild2.TEST_SET,), data=data)[affwild2.TEST_SET]
  assert sorted(decided[0]) == names
  # A model against itself on the fresh draw: no difference in any draw.
  cmp = predict.compare_models(str(workdir), str(workdir), (affwild2.TEST_SET,), num_samples=20,
                               data_a=data, data_b=data)[affwild2.TEST_SET]
  assert cmp["a"] == pytest.approx(want["mean"], abs=1e-4) and cmp["interval"] == [0.0, 0.0]
  with pytest.raises(ValueError, match="not the same task and data"):
    predict.compare_models(str(workdir), str(workdir), (affwild2.TEST_SET,), data_a=data)
  preds, labels = decided
  with pytest.raises(ValueError, match="cover different videos"):
    predict.paired_difference("VA", preds, {v: preds[v] for v in names[1:]}, labels)
  with pytest.raises(KeyError, match="no field 'rooot'"):
    predict.evaluate(str(workdir), data={"rooot": str(fresh)})


def test_modalities_from_the_command_line():
  from configs import va
  c = va.get_config("tiny")
  assert temporal.modalities(c) == ("visual",)
  c.model.modalities = ("visual,audio",)  # what --config.model.modalities=visual,audio gives
  assert temporal.modalities(c) == ("visual", "audio")


def test_results_record_the_run(va_run):
  workdir, out = va_run
  saved = json.loads((workdir / "results.json").read_text())
  assert saved["run"]["job"] == "temporal VA" and saved["run"]["config"]["task"] == "VA"
  assert saved["run"]["version"].startswith("0.1.0")


def test_the_authors_temporal_checkpoint_converts_to_a_run_that_predicts(synthetic_root, extracted,
                                                                         tmp_path):
  """A .pt as upczww/abaw6 saves it (their names, DataParallel's prefix) through
  launch/convert_weights.py --model=temporal: a run workdir whose predictions are the numpy
  reference model's on the same features."""
  import subprocess
  import sys
  from pathlib import Path
  from affect_jax import predict
  from tests.models.test_temporal import (_authors_layout, _np_reference_model,
                                          _torch_like_state_dict)
  from tests.models.test_torch_pickle import _save, _tensor_dict
  _, paths, _ = extracted
  store = features.FeatureStore(paths["visual"])
  rng = np.random.default_rng(4)
  s = _torch_like_state_dict(rng, store.dim, (768, 256, 128), 5, 512, 8, 512, 8)
  s = {k: (v * 0.1 if v.ndim >= 2 else v) for k, v in s.items()}  # moderate activations
  obj, storages = _tensor_dict(_authors_layout(s))
  _save(str(tmp_path / "expr_fold0.pt"), obj, storages)
  repo = Path(__file__).resolve().parents[2]
  subprocess.run([sys.executable, str(repo / "launch" / "convert_weights.py"),
                  f"--input={tmp_path / 'expr_fold0.pt'}", "--model=temporal", "--task=EXPR",
                  f"--visual_features={paths['visual']}", f"--output={tmp_path / 'run'}"],
                 check=True, cwd=repo, env={**__import__("os").environ, "PYTHONPATH": str(repo)},
                 capture_output=True)
  config, fn, thresholds = predict.load(str(tmp_path / "run"))
  assert config.task == "EXPR" and thresholds is None
  assert (tuple(config.model.tcn_channels), config.model.d_model) == ((768, 256, 128), 512)
  video = store.videos()[0]
  x = np.asarray(store.read(video), np.float32)
  assert len(x) <= config.data.segment_len  # one window: the reference sees the same frames
  got = fn({video: len(x)})[video]
  logits = _np_reference_model(s, x[None].astype(np.float64), 4, np.ones((1, len(x)), bool))[0]
  want = np.exp(logits - logits.max(-1, keepdims=True))
  np.testing.assert_allclose(got, want / want.sum(-1, keepdims=True), atol=2e-4)
  with pytest.raises(FileExistsError, match="run: already holds a run"):
    temporal.import_weights(config, {}, str(tmp_path / "run"), "again.pt")


def test_temporal_weights_that_do_not_fit_the_preset_are_refused(tmp_path):
  from tests.models.test_temporal import SMALL, _torch_like_state_dict
  from affect_jax.models import temporal as temporal_model
  s = _torch_like_state_dict(np.random.default_rng(5), 16, SMALL["tcn_channels"], 5,
                             SMALL["d_model"], SMALL["num_layers"], SMALL["ff_dim"], 2)
  variables = temporal_model.params_from_torch_state_dict(s, num_heads=SMALL["num_heads"])
  with pytest.raises(ValueError, match=r"small.pt: the weights do not fit config.model \(tcn_channels "
                     r"\(768, 256, 128\), d_model 512, \d+ names or shapes differ"):
    temporal.import_weights(common.get_temporal_config("VA", "paper"), variables,
                            str(tmp_path / "run"), "small.pt")
  assert not (tmp_path / "run").exists()
