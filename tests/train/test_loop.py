"""The shared loop on a toy problem: evaluation, best-state export, resume."""

import itertools
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from affect_jax import checkpoint, flops, sharding
from affect_jax.train import loop


def _setup():
  mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  tx = optax.sgd(0.1)
  state = loop.TrainState.create(apply_fn=None, params={"w": jnp.zeros(3)}, tx=tx)

  @jax.jit
  def step(state, batch):
    grads = {"w": -jnp.mean(batch["x"], axis=0)}  # pushes w towards the batch mean
    return state.apply_gradients(grads=grads), {"loss": jnp.sum(state.params["w"])}

  batches = ({"x": np.full((2, 3), float(i))} for i in itertools.count())
  return mesh, state, step, batches


def test_eval_exports_best_state(tmp_path):
  mesh, state, step, batches = _setup()
  # Scores by step: the best is at step 4, later evaluations are worse.
  scores = iter([0.1, 0.7, 0.3])
  seen = {}

  def eval_fn(st):
    seen[int(st.step)] = np.asarray(st.params["w"]).copy()
    return {"f1": next(scores)}

  state, history = loop.run(
      config=ml_collections.ConfigDict(), workdir=str(tmp_path), state=state, step_fn=step,
      data_iter=batches, num_steps=6, mesh=mesh, items_per_step=2, log_every=1,
      checkpoint_every=3, eval_fn=eval_fn, eval_every=2, best_metric="f1")
  best = checkpoint.read_best(str(tmp_path))
  assert best["step"] == 4 and best["value"] == 0.7
  restored = loop.load_best(str(tmp_path), state)
  assert set(restored) == {"params"}
  np.testing.assert_array_equal(np.asarray(restored["params"]["w"]), seen[4])
  assert [h.get("eval/f1") for h in history if "eval/f1" in h] == [0.1, 0.7, 0.3]
  # A resumed run that scores worse leaves the export alone.
  assert not loop.maybe_save_best(str(tmp_path), 9, state, {"eval/f1": 0.5}, "eval/f1", "max")
  assert checkpoint.read_best(str(tmp_path))["step"] == 4
  assert loop.maybe_save_best(str(tmp_path), 9, state, {"eval/f1": 0.9}, "eval/f1", "max")
  assert checkpoint.read_best(str(tmp_path))["step"] == 9


def test_resume_continues_from_latest_checkpoint(tmp_path):
  mesh, state, step, batches = _setup()
  full, _ = loop.run(config=ml_collections.ConfigDict(), workdir=str(tmp_path / "a"), state=state,
                     step_fn=step, data_iter=batches, num_steps=4, mesh=mesh, items_per_step=2,
                     checkpoint_every=2)
  mesh, state, step, batches = _setup()
  loop.run(config=ml_collections.ConfigDict(), workdir=str(tmp_path / "b"), state=state,
           step_fn=step, data_iter=batches, num_steps=2, mesh=mesh, items_per_step=2,
           checkpoint_every=2)
  # The toy iterator is plain Python (no grain state): resume restarts it, so feed the rest.
  rest = ({"x": np.full((2, 3), float(i))} for i in itertools.count(2))
  resumed, hist = loop.run(config=ml_collections.ConfigDict(), workdir=str(tmp_path / "b"),
                           state=state, step_fn=step, data_iter=rest, num_steps=4, mesh=mesh,
                           items_per_step=2, checkpoint_every=2, log_every=1)
  assert [h["step"] for h in hist] == [3, 4]
  np.testing.assert_allclose(np.asarray(resumed.params["w"]), np.asarray(full.params["w"]))


def test_early_stopping_stops_when_the_best_is_old_and_a_rerun_stops_there_too(tmp_path):
  mesh, state, step, batches = _setup()
  # Evaluated every step; the best is at step 3 (0.9), nothing beats it afterwards.
  by_step = {1: 0.2, 2: 0.5, 3: 0.9, 4: 0.8, 5: 0.7, 6: 0.95, 7: 0.1}

  def eval_fn(st):
    return {"f1": by_step[int(st.step)]}

  kw = dict(config=ml_collections.ConfigDict(), workdir=str(tmp_path), step_fn=step, mesh=mesh,
            items_per_step=2, log_every=1, checkpoint_every=100, num_steps=7, eval_fn=eval_fn,
            eval_every=1, best_metric="f1", early_stop_steps=2)
  final, history = loop.run(state=state, data_iter=batches, **kw)
  # Steps 4 and 5 do not improve on step 3: the run stops before step 6 (which would have won).
  assert [h["step"] for h in history if "eval/f1" in h] == [1, 2, 3, 4, 5]
  assert int(final.step) == 5 and checkpoint.read_best(str(tmp_path))["step"] == 3
  again, history = loop.run(state=state, data_iter=batches, **kw)
  assert history == [] and int(again.step) == 5


# ---- One rule for continuing a workdir ----


def _job_config(**kw):
  c = ml_collections.ConfigDict({"seed": 0, "resume": True, "log_every": 10, "steps_per_call": 1,
                                 "optim": {"lr": 1e-3}, "data": {"worker_count": 0}})
  c.update(kw)
  return c


def _with_checkpoint(workdir):
  (workdir / "checkpoints" / "5").mkdir(parents=True)


def test_open_workdir_records_the_run(tmp_path):
  workdir = loop.open_workdir(_job_config(), tmp_path / "w", "pretrain")
  record = json.loads((workdir / "job.json").read_text())
  assert record["job"] == "pretrain" and record["config"]["optim"] == {"lr": 1e-3}
  assert record["version"].startswith("0.1.0")


def test_open_workdir_continues_the_same_config(tmp_path):
  loop.open_workdir(_job_config(), tmp_path, "finetune")
  _with_checkpoint(tmp_path)
  loop.open_workdir(_job_config(), tmp_path, "finetune")
  # How often to log, how many loader workers, or how many steps per call does not change
  # what is computed.
  changed = _job_config(log_every=1, steps_per_call=4)
  changed.data.worker_count = 8
  loop.open_workdir(changed, tmp_path, "finetune")


def test_open_workdir_refuses_another_config_naming_the_fields(tmp_path):
  loop.open_workdir(_job_config(), tmp_path, "finetune")
  _with_checkpoint(tmp_path)
  other = _job_config(seed=3)
  other.optim.lr = 0.5
  with pytest.raises(FileExistsError, match=r"another config \(optim.lr: 0.001 -> 0.5, seed: 0 -> 3\)"):
    loop.open_workdir(other, tmp_path, "finetune")
  # A field another version of the code added or removed is not a change of this run's.
  newer = _job_config()
  newer.added_later = 1
  loop.open_workdir(newer, tmp_path, "finetune")
  record = json.loads((tmp_path / "job.json").read_text())
  record["config"]["removed_since"] = "x"
  (tmp_path / "job.json").write_text(json.dumps(record))
  loop.open_workdir(_job_config(), tmp_path, "finetune")


def test_open_workdir_without_resume_refuses_a_used_workdir(tmp_path):
  loop.open_workdir(_job_config(), tmp_path, "temporal VA")
  loop.open_workdir(_job_config(resume=False), tmp_path, "temporal VA")  # nothing saved yet
  _with_checkpoint(tmp_path)
  with pytest.raises(FileExistsError, match="config.resume=False: use a new --workdir"):
    loop.open_workdir(_job_config(resume=False), tmp_path, "temporal VA")


def test_open_workdir_refuses_a_workdir_of_another_job(tmp_path):
  loop.open_workdir(_job_config(), tmp_path, "pretrain")
  with pytest.raises(FileExistsError, match="holds a pretrain run, not temporal VA: use a new"):
    loop.open_workdir(_job_config(), tmp_path, "temporal VA")


def test_profile_steps_trace_into_the_workdir(tmp_path):
  mesh, state, step, batches = _setup()
  loop.run(config=ml_collections.ConfigDict({"profile_steps": 2}), workdir=str(tmp_path),
           state=state, step_fn=step, data_iter=batches, num_steps=5, mesh=mesh,
           items_per_step=2, checkpoint_every=5)
  traces = list((tmp_path / loop.PROFILE_DIR).rglob("*.xplane.pb"))
  assert len(traces) == 1 and traces[0].stat().st_size > 0


def test_logged_steps_report_model_tflops_per_device(tmp_path):
  mesh, state, step, batches = _setup()
  _, history = loop.run(
      config=ml_collections.ConfigDict(), workdir=str(tmp_path), state=state, step_fn=step,
      data_iter=batches, num_steps=2, mesh=mesh, items_per_step=2, log_every=1,
      flops_per_item=3e9)
  for h in history:  # no peak rate for a CPU: no MFU
    assert h["tflops_per_device"] == pytest.approx(h["img_per_sec"] * 3e9 / jax.device_count() / 1e12)
    assert "mfu" not in h


def test_throughput_and_its_log_line(monkeypatch):
  assert loop.throughput(100.0, 0.0) == {}
  speed = {"img_per_sec": 100.0, **loop.throughput(100.0, 8e12)}
  assert speed["tflops_per_device"] == pytest.approx(800 / jax.device_count())
  monkeypatch.setattr(flops, "peak_flops", lambda device: 1e15)  # a device of known peak
  assert loop.throughput(100.0, 8e12)["mfu"] == pytest.approx(0.8 / jax.device_count())
  assert loop.format_speed({"img_per_sec": 707.06}, "img") == "707.1 img/s"
  assert (loop.format_speed({"img_per_sec": 707.06, "tflops_per_device": 0.9234, "mfu": 0.4123},
                            "img") == "707.1 img/s, 0.923 TFLOP/s per device, MFU 41.2%")


# ---- Several steps per call ----


def test_steps_this_call_stops_at_every_mark():
  assert loop.steps_this_call(0, 4, [100, 50]) == 4
  assert loop.steps_this_call(46, 4, [100, 50]) == 4   # 47..50 end on the mark
  assert loop.steps_this_call(47, 4, [100, 50]) == 1   # 48..51 would pass it
  assert loop.steps_this_call(49, 4, [100, 50, 49]) == 1
  assert loop.steps_this_call(0, 1, [3]) == 1
  assert loop.steps_this_call(5, 3, []) == 3


def _toy_train_step(mesh, config):
  """The toy problem's step as a loop.TrainStep; records how many steps each call ran."""
  def step(state, batch):
    grads = {"w": -jnp.mean(batch["x"], axis=0)}
    return state.apply_gradients(grads=grads), {"loss": jnp.sum(state.params["w"] ** 2)}

  state = loop.TrainState.create(apply_fn=None, params={"w": jnp.zeros(3)}, tx=optax.adam(0.1))
  shardings = jax.tree.map(lambda _: sharding.replicated(mesh), state)
  train_step = loop.jit_step(step, config, mesh, shardings, {"x": sharding.batch_sharding(mesh, 2)})
  calls, many = [], train_step.calls
  train_step.calls = lambda n: calls.append(n) or many(n)
  return state, train_step, calls


def test_steps_per_call_trains_the_same_steps_in_fewer_calls(tmp_path):
  mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  results = {}
  for per_call in (1, 3):
    config = ml_collections.ConfigDict({"axis_rules": sharding.DEFAULT_RULES,
                                        "steps_per_call": per_call})
    state, step, calls = _toy_train_step(mesh, config)
    batches = ({"x": np.full((2, 3), float(i % 5))} for i in itertools.count())
    seen = []
    final, history = loop.run(
        config=config, workdir=str(tmp_path / str(per_call)), state=state, step_fn=step,
        data_iter=batches, num_steps=10, mesh=mesh, items_per_step=2, log_every=3,
        checkpoint_every=6, eval_fn=lambda st: seen.append(int(st.step)) or {"s": 0.0},
        eval_every=6)
    saved = sorted(int(p.name) for p in (tmp_path / str(per_call) / "checkpoints").iterdir())
    results[per_call] = (final, history, seen, saved, calls)
  (one, h1, seen1, saved1, _), (three, h3, seen3, saved3, calls3) = results[1], results[3]
  # 3 steps per call up to step 9, then the last step alone (a mark: the end).
  assert calls3 == [3, 3, 3]
  assert [h["step"] for h in h3] == [h["step"] for h in h1] == [3, 6, 9, 10]
  np.testing.assert_allclose([h["loss"] for h in h3], [h["loss"] for h in h1], rtol=1e-6)
  assert seen3 == seen1 == [6, 10] and saved3 == saved1 == [6, 10]
  assert int(three.step) == 10
  np.testing.assert_allclose(np.asarray(three.params["w"]), np.asarray(one.params["w"]), rtol=1e-6)


def test_steps_per_call_keeps_early_stopping_exact(tmp_path):
  mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  by_step = {2: 0.5, 4: 0.9, 6: 0.8, 8: 0.95}
  finals = {}
  for per_call in (1, 2):
    config = ml_collections.ConfigDict({"axis_rules": sharding.DEFAULT_RULES,
                                        "steps_per_call": per_call})
    state, step, calls = _toy_train_step(mesh, config)
    batches = ({"x": np.ones((2, 3))} for _ in itertools.count())
    final, _ = loop.run(config=config, workdir=str(tmp_path / str(per_call)), state=state,
                        step_fn=step, data_iter=batches, num_steps=12, mesh=mesh,
                        items_per_step=2, log_every=2, checkpoint_every=100,
                        eval_fn=lambda st: {"f1": by_step[int(st.step)]}, eval_every=2,
                        best_metric="f1", early_stop_steps=3)
    finals[per_call] = int(final.step)
    if per_call == 2:  # two steps a call, the one up to the stop at 4 + 3 alone
      assert calls == [2, 2, 2]
  assert finals == {1: 7, 2: 7}


def test_steps_per_call_needs_a_train_step(tmp_path):
  mesh, state, step, batches = _setup()
  with pytest.raises(ValueError, match="steps_per_call=2 needs a loop.TrainStep"):
    loop.run(config=ml_collections.ConfigDict({"steps_per_call": 2}), workdir=str(tmp_path),
             state=state, step_fn=step, data_iter=batches, num_steps=4, mesh=mesh,
             items_per_step=2)
