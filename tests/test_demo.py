"""The main job at micro size, end to end, as a person would run it (twice)."""

import json

from affect_jax import demo


def test_demo_micro_end_to_end_then_reuses_every_stage(tmp_path):
  lines = []
  first = demo.run(str(tmp_path), "micro", log=lines.append)
  stage_lines = [l for l in lines if l.startswith("[")]
  assert len(stage_lines) == 22 and all(" ran " in l for l in stage_lines)
  for task in ("VA", "EXPR", "AU"):
    assert set(first["results"][task]) == {v[0] for v in demo.VARIANTS}
  table = (tmp_path / "results.md").read_text()
  assert "oracle (clean latent vs labels)" in table and "TCN+Transformer, visual+audio" in table
  saved = json.loads((tmp_path / "results.json").read_text())
  assert saved["oracle"] == first["oracle"]
  for png in ("mae_reconstruction.png", "loss_curves.png", "va_prediction.png", "au_raster.png"):
    assert (tmp_path / "report" / png).stat().st_size > 2000, png
  lines.clear()
  second = demo.run(str(tmp_path), "micro", log=lines.append)
  assert all(" reused " in l for l in lines if l.startswith("["))
  assert second["table"] == first["table"]
