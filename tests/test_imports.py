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
