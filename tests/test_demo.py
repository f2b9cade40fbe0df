from affect_jax import demo


def test_demo_micro_runs_and_reuses_finished_stages(tmp_path):
  lines = []
  first = demo.run(str(tmp_path), "micro", log=lines.append)
  assert "written" in lines[0]
  assert "| VA | Train_Set |" in first["table"]
  lines.clear()
  second = demo.run(str(tmp_path), "micro", log=lines.append)
  assert "reused" in lines[0]
  assert second["summary"] == first["summary"]
