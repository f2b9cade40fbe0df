"""The real launchers as 2 processes x 2 CPU devices (gloo collectives on localhost) against
the same stages as 1 process x 4 devices: the same losses, features and scores, every shared
file written once; a killed process stops the other; a rerun resumes to the uninterrupted
result. A process joins through flags (--coordinator_address ...) or, for extraction, a
SLURM-style environment."""

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

from affect_jax import checkpoint
from affect_jax.data import tfds_builders
from affect_jax.data.features import FeatureStore
from affect_jax.data.synthetic import clip

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
IMAGE = 32
PRETRAIN_STEPS = 40  # long enough that the kill below lands mid-run
TIMEOUT = 300
HAVE_VIDEO = all(importlib.util.find_spec(m) for m in ("av", "cv2"))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _env(devices: int, **extra) -> dict:
  env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OMPI_", "JAX_"))}
  env.update(JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES=str(devices),
             JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo", PYTHONPATH=str(REPO), **extra)
  return env


def _start(script: str, args: list[str], procs: int, log_dir: Path, *, slurm: bool = False):
  """Starts the launcher as `procs` processes (4 devices in all); returns [(Popen, log)]."""
  log_dir.mkdir(parents=True, exist_ok=True)
  port, running = _free_port(), []
  for i in range(procs):
    extra, flags = {}, []
    if procs > 1 and slurm:  # jax finds the coordinator from SLURM's variables
      extra = dict(SLURM_JOB_ID=str(port % 4096 + 100000 - (100000 % 4096)), SLURM_NTASKS=str(procs),
                   SLURM_PROCID=str(i), SLURM_LOCALID=str(i), SLURM_STEP_NODELIST="localhost")
    elif procs > 1:
      flags = [f"--coordinator_address=localhost:{port}", f"--num_processes={procs}",
               f"--process_id={i}", "--heartbeat_timeout=10"]
    log = log_dir / f"{script}_{procs}p_{i}.log"
    with open(log, "w") as out:
      p = subprocess.Popen([sys.executable, str(REPO / "launch" / f"{script}.py"), *args, *flags],
                           cwd=REPO, env=_env(4 // procs, **extra), stdout=out,
                           stderr=subprocess.STDOUT)
    running.append((p, log))
  return running


def _wait(running, timeout=TIMEOUT) -> list[int]:
  deadline = time.monotonic() + timeout
  codes = []
  for p, _ in running:
    try:
      codes.append(p.wait(max(deadline - time.monotonic(), 1)))
    except subprocess.TimeoutExpired:
      for q, _ in running:
        q.kill()
      pytest.fail(f"launcher still running after {timeout}s: logs {[str(l) for _, l in running]}")
  return codes


def _run(script, args, procs, log_dir, **kw):
  running = _start(script, args, procs, log_dir, **kw)
  codes = _wait(running)
  for code, (_, log) in zip(codes, running):
    assert code == 0, f"{log} (exit {code}):\n" + log.read_text()[-3000:]
  return [log.read_text() for _, log in running]


def _pretrain_args(root, workdir, index):
  return ["--config=configs/mae_pretrain.py:tiny", f"--workdir={workdir}",
          f"--config.data.roots={root}/cropped_aligned", f"--config.data.image_size={IMAGE}",
          "--config.batch_size=8", f"--config.num_steps={PRETRAIN_STEPS}", "--config.log_every=1",
          "--config.checkpoint_every=4", f"--config.recon_every={PRETRAIN_STEPS}",
          f"--config.data.index_cache={index}"]


@pytest.fixture(scope="module")
def runs(synthetic_root, tmp_path_factory):
  """Every stage as 1 process x 4 devices ('1p') and as 2 x 2 ('2p'). The 2-process
  stages after pretraining read the 1-process stage before them, so each comparison
  isolates one stage (and reads a checkpoint written on another process layout)."""
  out = tmp_path_factory.mktemp("multiprocess")
  root, logs, index = synthetic_root, out / "logs", out / "index"
  w = {f"{s}{p}": out / f"{s}{p}" for s in ("mae", "ft", "x", "va", "pred", "video")
       for p in ("1p", "2p")}
  mp4 = clip.write_clip(out / "clip", clip.ClipConfig(num_frames=60)) if HAVE_VIDEO else None
  # The 2-process fine-tuning reads the ArrayRecord dataset, in a grain worker process each:
  # the same frames as the folders the 1-process run reads, so the same losses. Both crop
  # and flip on the devices (data.augment=device): each process's rows keep their boxes.
  frames = tfds_builders.build(tfds_builders.AFFWILD2_FRAMES, out / "tfds", manual_dir=root)
  ft_source = {"1p": [f"--config.data.root={root}"],
               "2p": ["--config.data.source=tfds", f"--config.data.tfds_dir={frames}",
                      "--config.data.worker_count=1"]}
  # The 2-process fine-tuning runs two steps per jitted call (config.steps_per_call).
  ft_per_call = {"1p": [], "2p": ["--config.steps_per_call=2"]}
  for p, procs in (("1p", 1), ("2p", 2)):
    _run("pretrain", _pretrain_args(root, w[f"mae{p}"], index), procs, logs)
    _run("finetune", [
        "--config=configs/expr_finetune.py:tiny", f"--workdir={w[f'ft{p}']}", *ft_source[p],
        f"--config.data.image_size={IMAGE}", "--config.data.augment=device",
        "--config.batch_size=8", "--config.eval_batch_size=12", "--config.num_steps=8", "--config.log_every=2",
        "--config.eval_every_epochs=100", f"--config.init.mae_workdir={w['mae1p']}",
        *ft_per_call[p]], procs, logs)
    _run("extract", [
        f"--workdir={w[f'x{p}']}", f"--config.data.root={root}", "--config.batch_size=24",
        f"--config.encoder_workdir={w['ft1p']}"], procs, logs, slurm=True)
    _run("train_temporal", [
        "--config=configs/va.py:tiny", f"--workdir={w[f'va{p}']}", f"--config.data.root={root}",
        f"--config.data.visual_features={w['x1p']}/visual",
        f"--config.data.audio_features={w['x1p']}/audio", "--config.model.modalities=visual,audio",
        "--config.data.segment_len=32", "--config.data.stride=24", "--config.data.predict_stride=24",
        "--config.num_steps=6", "--config.log_every=1", "--config.batch_size=4",
        "--config.eval_every_epochs=100", "--config.bootstrap_samples=20"], procs, logs)
    _run("predict", [f"--out_dir={w[f'pred{p}']}", f"--va={w['va1p']}", "--split=Train_Set"],
         procs, logs)
    if mp4:
      _run("analyze_video", [f"--video={mp4}", f"--out_dir={w[f'video{p}']}", f"--va={w['va1p']}"],
           procs, logs)
  return out, w


def _metrics(workdir):
  rows = [json.loads(l) for l in (workdir / "tb" / "metrics.jsonl").read_text().splitlines()]
  steps = [r["step"] for r in rows if "loss" in r]
  assert len(steps) == len(set(steps)), f"{workdir}: metrics written more than once"
  return rows


@pytest.mark.parametrize("stage", ["mae", "ft", "va"])
def test_training_losses_match_one_process(runs, stage):
  _, w = runs
  one, two = _metrics(w[f"{stage}1p"]), _metrics(w[f"{stage}2p"])
  losses = lambda rows: [r["loss"] for r in rows if "loss" in r]
  assert len(losses(one)) == len(losses(two)) > 0
  assert losses(one)[0] == pytest.approx(losses(two)[0], rel=1e-6)
  np.testing.assert_allclose(losses(two), losses(one), rtol=1e-4)


def test_finetune_validation_matches_one_process(runs):
  _, w = runs
  one, two = checkpoint.read_best(w["ft1p"]), checkpoint.read_best(w["ft2p"])
  assert one["step"] == two["step"] and one["value"] > 0  # a score that can differ
  for k, v in one["scores"].items():
    assert two["scores"][k] == pytest.approx(v, abs=1e-6), k


def test_extracted_features_match_one_process(runs):
  _, w = runs
  for kind in ("visual", "audio"):
    one, two = FeatureStore(w["x1p"] / kind), FeatureStore(w["x2p"] / kind)
    assert one.info == two.info and one.videos() == two.videos() and len(one.videos()) == 8
    for v in one.videos():
      assert one.meta(v) == two.meta(v)
      np.testing.assert_allclose(two.read(v).astype(np.float32), one.read(v).astype(np.float32),
                                 rtol=2 ** -10, atol=1e-3, err_msg=f"{kind} {v}")


def test_temporal_predictions_match_one_process(runs):
  """One trained model (1-process run) predicted by 2 processes: the same per-frame values."""
  from affect_jax.data import affwild2
  _, w = runs
  name = "VA_Estimation_Challenge_Train_Set.csv"
  one = affwild2.parse_predictions(w["pred1p"] / name, "VA")
  two = affwild2.parse_predictions(w["pred2p"] / name, "VA")
  assert sorted(one) == sorted(two) and len(one) >= 4
  for video in one:
    np.testing.assert_allclose(two[video], one[video], atol=1.01e-4, err_msg=video)  # 4 decimals


@pytest.mark.skipif(not HAVE_VIDEO, reason="the video extra: pip install 'affect-jax[video]'")
def test_video_analysis_matches_one_process(runs):
  """A video file through the 1-process run's VA model (visual + audio) by 2 processes: the
  same faces and the same per-frame values."""
  from affect_jax import analyze
  _, w = runs
  one, two = (analyze.read_csv(w[f"video{p}"] / "synthetic_clip.csv") for p in ("1p", "2p"))
  assert list(one) == list(two) and len(one["frame"]) == 60 and one["face_found"].sum() > 50
  for column in one:
    np.testing.assert_allclose(two[column], one[column], atol=1.01e-4, err_msg=column)


def test_temporal_training_and_evaluation_match_one_process(runs):
  """Scores of the two runs' own trained models: training matches to float rounding (see the
  losses), which the scores of a few-step model amplify a little."""
  _, w = runs
  one = json.loads((w["va1p"] / "results.json").read_text())
  two = json.loads((w["va2p"] / "results.json").read_text())
  assert one["best_step"] == two["best_step"]
  for split in ("val", "test"):
    for k, v in one[split].items():
      assert two[split][k] == pytest.approx(v, abs=5e-3), (split, k)


def test_shared_files_written_once_and_readable(runs):
  out, w = runs
  leftovers = [p for p in out.rglob("*") if ".tmp" in p.name]
  assert not leftovers, f"temporaries left behind: {leftovers[:5]}"
  one = np.asarray(Image.open(w["mae1p"] / "recon" / "latest.png"))
  two = np.asarray(Image.open(w["mae2p"] / "recon" / "latest.png"))
  assert one.shape == two.shape
  # The top row shows the originals: the same images on every process and layout.
  np.testing.assert_array_equal(two[:IMAGE], one[:IMAGE])
  assert json.loads((w["ft2p"] / "best.json").read_text())["metric"] == "eval/f1"
  assert json.loads((w["x2p"] / "visual" / "store.json").read_text())["kind"] == "visual"


def _wait_for_step(running, step: int, proc: int = 1):
  p, log = running[proc]
  deadline = time.monotonic() + TIMEOUT
  while f"step {step}/" not in log.read_text():
    assert p.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
    time.sleep(0.05)


def test_killed_or_preempted_processes_stop_and_a_rerun_resumes(runs, synthetic_root):
  """SIGKILL one process: the other exits at once. Rerun: it resumes; SIGTERM (a preemption
  notice) to one process: both save at the same step and exit. Rerun: it resumes from
  there and ends with the params of an uninterrupted run."""
  out, w = runs
  workdir = out / "mae_interrupted"
  args = _pretrain_args(synthetic_root, workdir, out / "index")
  running = _start("pretrain", args, 2, out / "logs_killed")
  _wait_for_step(running, 6)
  running[1][0].send_signal(signal.SIGKILL)
  killed = time.monotonic()
  code = _wait(running[:1], timeout=60)[0]
  running[1][0].wait()
  assert code != 0 and time.monotonic() - killed < 60
  assert f"step {PRETRAIN_STEPS}/" not in running[0][1].read_text()  # it stopped mid-run
  saved = checkpoint._item_dir(workdir, "latest")[1]
  assert 4 <= saved < PRETRAIN_STEPS

  running = _start("pretrain", args, 2, out / "logs_preempted")
  _wait_for_step(running, saved + 4)
  running[0][0].send_signal(signal.SIGTERM)
  codes = _wait(running, timeout=60)
  texts = [log.read_text() for _, log in running]
  assert all(f"resumed from step {saved}" in t for t in texts)
  preempted = checkpoint._item_dir(workdir, "latest")[1]
  assert codes == [1, 1] and all(f"preempted: saved step {preempted} in" in t for t in texts)
  assert saved + 4 <= preempted < PRETRAIN_STEPS

  texts = _run("pretrain", args, 2, out / "logs_resumed")
  assert all(f"resumed from step {preempted}" in t for t in texts)
  final = checkpoint.load_params(workdir, "latest")
  reference = checkpoint.load_params(w["mae2p"], "latest")
  for (k, a), (_, b) in zip(jax.tree_util.tree_leaves_with_path(final),
                            jax.tree_util.tree_leaves_with_path(reference)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=jax.tree_util.keystr(k))
