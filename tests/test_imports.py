"""The package's import graph (read from the source with ast, imports inside functions
included) has no cycles: every arrow points one way."""

import ast
import pathlib

REPO = pathlib.Path(__file__).resolve().parents[1]


def _graph() -> dict[str, set[str]]:
  files = {".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"): p
           for p in [*REPO.glob("affect_jax/**/*.py"), *REPO.glob("configs/*.py")]}
  graph = {}
  for name, path in files.items():
    targets = set()
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.ImportFrom) and node.module:
        targets |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in files else node.module
                    for a in node.names}
      elif isinstance(node, ast.Import):
        targets |= {a.name for a in node.names}
    graph[name] = {t for t in targets if t in files and t != name}
  return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """One import cycle, or None (depth-first search with a colour per module)."""
  colour, path = {}, []

  def visit(m):
    colour[m] = "grey"
    path.append(m)
    for n in sorted(graph[m]):
      if colour.get(n) == "grey":
        return path[path.index(n):] + [n]
      if n not in colour and (found := visit(n)):
        return found
    colour[m] = "black"
    path.pop()
    return None

  for m in sorted(graph):
    if m not in colour and (found := visit(m)):
      return found
  return None


def test_the_cycle_finder_finds_one():
  assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
  assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles():
  graph = _graph()
  assert "affect_jax.tasks" in graph["affect_jax.data.affwild2.formats"]
  assert _cycle(graph) is None, " -> ".join(_cycle(graph))


# Layers, top to bottom: an import may point within a layer (no cycles, above) or down.
# configs/ are data: they may import the package's constants, never the reverse.
LAYERS = (
    ("configs",),
    ("affect_jax.demo", "affect_jax.analyze", "affect_jax.accelerator"),  # applications
    ("affect_jax.report", "affect_jax.predict", "affect_jax.pixel_baseline", "affect_jax.bench"),
    ("affect_jax.train",),
    ("affect_jax",),  # models, data, metrics, losses, tasks, sharding, checkpoint, ...
)


def _layer(module: str) -> int:
  """Index in LAYERS of the first (most specific) prefix that names `module`."""
  matches = [(len(p), i) for i, prefixes in enumerate(LAYERS) for p in prefixes
             if module == p or module.startswith(p + ".")]
  return max(matches)[1]


def test_the_layer_of_a_module_is_its_most_specific_prefix():
  assert _layer("configs.demo") == 0 and _layer("affect_jax.demo") == 1
  assert _layer("affect_jax.train.loop") == 3 and _layer("affect_jax.models.vit") == 4


def test_every_import_points_down_or_within_its_layer():
  up = [f"{a} -> {b}" for a, targets in _graph().items() for b in targets if _layer(b) < _layer(a)]
  assert not up, up


def test_the_package_imports_without_its_optional_readers():
  """Every module but the TFDS builders imports with TensorFlow Datasets, PyAV and OpenCV
  left out: a GPU host with no package index runs the training stages and
  check_accelerator.py with only the core packages carried there. Run in a fresh interpreter
  that refuses those imports."""
  import subprocess
  import sys
  modules = sorted(".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
                   for p in REPO.glob("affect_jax/**/*.py"))
  modules.remove("affect_jax.data.tfds_builders")
  script = ("import importlib, sys\n"
            "for name in ('tensorflow_datasets', 'tensorflow', 'av', 'cv2'):\n"
            "  sys.modules[name] = None  # importing it raises ImportError\n"
            f"for module in {modules!r}:\n"
            "  importlib.import_module(module)\n")
  done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True)
  assert done.returncode == 0, done.stderr[-2000:]
