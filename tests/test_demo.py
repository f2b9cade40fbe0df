"""The main job at micro size, end to end, as a person would run it (twice)."""

import json

import pytest

from affect_jax import demo, report
from affect_jax.data import affwild2
from configs import demo as demo_config


def test_demo_micro_end_to_end_then_reuses_every_stage(tmp_path, monkeypatch):
  lines = []
  config = demo_config.get_config("micro")
  first = demo.run(str(tmp_path), config, log=lines.append)
  stage_lines = [l for l in lines if l.startswith("[")]
  assert len(stage_lines) == 33 and all(" ran " in l for l in stage_lines)
  for task in ("VA", "EXPR", "AU"):
    assert set(first["results"][task]) == {v[0] for v in config.variants}
  table = (tmp_path / "results.md").read_text()
  assert "oracle (clean latent vs labels)" in table and "TCN+Transformer, visual+audio" in table
  saved = json.loads((tmp_path / "results.json").read_text())
  assert saved["oracle"] == first["oracle"]
  assert report.PIXEL_ROW in table
  # Every row, the pixel one included, has its video-bootstrap interval on the two splits and
  # the fresh draw.
  intervals = table.split("| 90% interval, videos resampled")[1].split("\n\n")[0].splitlines()[2:]
  assert len(intervals) == len(config.variants) + 1
  assert all(l.count(" to ") == 9 for l in intervals), intervals
  # Paired differences on every scored set: each side's score is what that model scored alone
  # (the temporal runs, their fresh-draw scores, the pixel probe).
  pixels = saved["pixel_baseline"]
  for task in ("VA", "EXPR", "AU"):
    main = "mean" if task == "VA" else "f1"
    assert set(saved["paired_differences"][task]) == {f"{a}-{b}" for a, b in config.pairs}
    for pair, by_key in saved["paired_differences"][task].items():
      a, b = pair.split("-")
      for key, res_key in ((affwild2.VALIDATION_SET, "val"), (affwild2.TEST_SET, "test"),
                           (demo.FRESH, demo.FRESH)):
        assert by_key[key]["a"] == pytest.approx(first["results"][task][a][res_key][main], abs=1e-6)
        want_b = (pixels[task] if key == affwild2.VALIDATION_SET else pixels[task][key]
                  ) if b == "pixels" else first["results"][task][b][res_key]
        assert by_key[key]["b"] == pytest.approx(want_b[main], abs=1e-6)
  assert f"| TCN+Transformer, visual+audio minus {report.PIXEL_ROW} |" in table
  # The fresh draw: its own videos (another seed, every one a test video), its own oracle.
  fresh = json.loads((tmp_path / "fresh" / "data" / "synthetic_manifest.json").read_text())
  assert fresh["config"]["seed"] == config.data.seed + config.fresh_seed_offset == 1005
  assert fresh["totals"]["VA"][affwild2.TRAIN_SET]["videos"] == 0
  assert saved["oracle"]["VA"][demo.FRESH]["mean"] > 0.5
  assert "VA CCC fresh draw" in table
  # Prediction strides: the training stride re-scored through predict.load must give what the
  # training run's own evaluation reported for its best state; the authors' disjoint windows
  # are the second row.
  stride, segment_len = config.stages.VA.data.stride, config.stages.VA.data.segment_len
  assert "disjoint (the authors')" in table and f"stride {stride} of {segment_len}" in table
  for task, main in (("VA", "mean"), ("EXPR", "f1"), ("AU", "f1")):
    by_stride = saved["prediction_strides"][task]
    assert set(by_stride) == {str(stride), str(segment_len)}
    own = first["results"][task]["tcn_tf_va"]["val"][main]
    assert by_stride[str(stride)][affwild2.VALIDATION_SET][main] == pytest.approx(own, abs=1e-6)
  for png in ("mae_reconstruction.png", "loss_curves.png", "va_prediction.png", "au_raster.png"):
    assert (tmp_path / "report" / png).stat().st_size > 2000, png
  lines.clear()
  second = demo.run(str(tmp_path), config, log=lines.append)
  rerun = [l for l in lines if l.startswith("[")]
  # Nothing ran, so there is nothing to estimate the rest from (rather than a false 0 s).
  assert all(" reused " in l and l.endswith("ETA     ? s") for l in rerun), rerun
  assert second["table"] == first["table"]
  # Another fine-tuning: the encoders change, so their feature stores are made afresh (a
  # store refuses another encoder's features); stopped at the first temporal run.
  from affect_jax.train import temporal

  class Stop(Exception):
    pass

  def stop(*args, **kwargs):
    raise Stop

  config.stages.finetune.num_steps += 1
  monkeypatch.setattr(temporal, "train_and_evaluate", stop)
  lines.clear()
  with pytest.raises(Stop):
    demo.run(str(tmp_path), config, log=lines.append)
  ran = {l.split("]")[1].split()[0] for l in lines if " ran " in l}
  assert ran == {"finetune_mae_init", "finetune_random_init", "features_mae_init",
                 "features_random_init", "fresh_features_mae_init",
                 "fresh_features_random_init"}, lines


def test_full_preset_configures_the_paper_sizes(tmp_path):
  """--preset=full is for an accelerator host (never run in CI): check what it would run."""
  cfg = demo.stage_configs(demo_config.get_config("full"), str(tmp_path / "data"), str(tmp_path))
  assert cfg["mae"].model.variant == "base" and cfg["mae"].data.image_size == 224
  assert cfg["finetune"].model.variant == "base" and cfg["finetune"].init.kind == "converted"
  assert cfg["finetune"].init.params_path == str(tmp_path / "mae_params")
  assert cfg["finetune"].data.root == cfg["extract"].data.root == str(tmp_path / "data")
  assert cfg["mae"].data.roots == str(tmp_path / "faces")
  for task in ("VA", "EXPR", "AU"):
    t = cfg[task]
    assert (t.data.segment_len, t.data.stride, t.data.predict_stride) == (300, 200, 200)
    # The authors' model, checked against torch elsewhere.
    assert (tuple(t.model.tcn_channels), t.model.d_model, t.model.num_layers) == ((768, 256, 128), 512, 8)
    assert t.num_steps <= 0 and t.num_epochs == {"VA": 40, "EXPR": 10, "AU": 30}[task]


def test_a_changed_input_reruns_exactly_the_stages_downstream_of_it(tmp_path):
  data = tmp_path / "data"
  data.mkdir()
  (data / "a.txt").write_text("1")
  runs, lines = [], []

  def pipeline(settings_b=1):
    step = demo.Stages(str(tmp_path), 4, lines.append)
    step.made_from["data"] = demo.data_fingerprint(str(data))
    a = step("a", {"x": 1}, lambda: runs.append("a") or {"v": 1})
    step("b", {"x": settings_b}, lambda: runs.append("b") or {"v": a["v"] + 1}, after=())
    step("c", {}, lambda: runs.append("c") or {}, after=("a",))
    step("d", {}, lambda: runs.append("d") or {}, after=("b", "c"))

  pipeline()
  assert runs == ["a", "b", "c", "d"] and all(" ran " in l for l in lines)
  runs.clear()
  pipeline()
  assert runs == []  # nothing changed
  pipeline(settings_b=2)
  assert runs == ["b", "d"]  # b's settings, and what reads b
  runs.clear()
  (data / "a.txt").write_text("22")  # a data file edited: what reads the data
  pipeline(settings_b=2)
  assert runs == ["a", "c", "d"]


def test_update_readme_replaces_only_the_demo_results_block(tmp_path):
  readme, results = tmp_path / "README.md", tmp_path / "results.md"
  results.write_text("# heading\n\n| a | b |\n|---|---|\n| 1 | 2 |\n")
  readme.write_text(f"intro\n{demo.README_BEGIN}\nold table\n{demo.README_END}\nrest\n")
  demo.update_readme(str(readme), str(results))
  assert readme.read_text() == (f"intro\n{demo.README_BEGIN}\n| a | b |\n|---|---|\n| 1 | 2 |\n"
                                f"{demo.README_END}\nrest\n")
  readme.write_text("no markers\n")
  with pytest.raises(ValueError, match="README.md: needs one <!-- demo-results:begin -->"):
    demo.update_readme(str(readme), str(results))
  assert readme.read_text() == "no markers\n"
