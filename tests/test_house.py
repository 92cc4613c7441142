"""Guards of the house (issue 16): the rules of docs/architecture.md, checked on the code.

* every :class:`~jaxscope.run.TrainConfig` field is a ``jaxscope train`` flag with the
  config's default, and a row of ``docs/train_options.md`` (generated, checked here);
* imports only point down the layers;
* no module and no function outgrows the size goals;
* the README's Python API example prints what the README shows;
* docs/architecture.md names every top-level module and package of ``jaxscope/``.

``python tests/test_house.py`` rewrites the options table of ``docs/train_options.md``.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "jaxscope"
OPTIONS_DOC = ROOT / "docs" / "train_options.md"
ARCHITECTURE_DOC = ROOT / "docs" / "architecture.md"
README = ROOT / "README.md"
BEGIN, END = "<!-- options:begin -->\n", "<!-- options:end -->"

# ------------------------------------------------------------------------ config and flags

#: Fields whose command-line default the CLI computes (``runs/MODEL-DATASET-sSEED``,
#: ``$JAXSCOPE_DATA``) instead of taking the config's.
CLI_COMPUTED = {"out", "data_dir"}
#: ``jaxscope train`` options that are the command line's own, not config fields.
CLI_ONLY = {"help", "no_plots"}


def _train_parser() -> argparse.ArgumentParser:
  from jaxscope.cli import build_parser

  (sub,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
  return sub.choices["train"]


def _field_default(field: dataclasses.Field) -> object:
  if field.default is dataclasses.MISSING:
    return field.default_factory()  # type: ignore[misc]
  return field.default


def test_every_config_field_is_a_train_flag():
  from jaxscope.run import TrainConfig, cli_options

  options = cli_options()
  assert [o.field for o in options] == [f.name for f in dataclasses.fields(TrainConfig)]
  actions = {a.dest: a for a in _train_parser()._actions}
  for o in options:
    assert o.field in actions, f"TrainConfig.{o.field} has no `jaxscope train` flag"
    assert tuple(actions[o.field].option_strings) == o.flags, o.field


def test_train_flags_are_config_fields():
  from jaxscope.run import TrainConfig

  fields = {f.name for f in dataclasses.fields(TrainConfig)}
  dests = {a.dest for a in _train_parser()._actions}
  assert dests - fields == CLI_ONLY


def test_train_flag_defaults_are_the_config_defaults():
  from jaxscope.cli import build_parser
  from jaxscope.run import TrainConfig

  args = build_parser().parse_args(["train"])
  compared = []
  for f in dataclasses.fields(TrainConfig):
    if f.name in CLI_COMPUTED:
      continue
    want, got = _field_default(f), getattr(args, f.name)
    assert got == want and type(got) is type(want), f"{f.name}: flag {got!r}, config {want!r}"
    compared.append(f.name)
  assert len(compared) == len(dataclasses.fields(TrainConfig)) - len(CLI_COMPUTED)


def _options_table(text: str) -> str:
  assert text.count(BEGIN) == 1 and text.count(END) == 1, "one pair of options markers"
  return text.split(BEGIN, 1)[1].split(END, 1)[0]


def test_train_options_doc_is_the_generated_table():
  from jaxscope.run import cli_options, options_markdown

  table = _options_table(OPTIONS_DOC.read_text(encoding="utf-8"))
  for o in cli_options():
    assert f"| `{o.field}` |" in table, f"docs/train_options.md has no row for {o.field}"
  assert table == options_markdown(), "stale table: run `python tests/test_house.py`"


def write_options_table() -> None:
  """Rewrites the table of ``docs/train_options.md`` between the markers."""
  from jaxscope.run import options_markdown

  text = OPTIONS_DOC.read_text(encoding="utf-8")
  old = _options_table(text)
  OPTIONS_DOC.write_text(text.replace(BEGIN + old + END, BEGIN + options_markdown() + END))


# ------------------------------------------------------------------------------- layers

#: The layers of docs/architecture.md: a module may import its own rank and those below.
RANKS = {
  "tree": 0,
  "xla": 0,
  "packed": 0,
  "metrics": 1,
  "transforms": 1,
  "capture": 1,
  "record": 2,
  "checkpoint": 2,
  "analysis": 2,
  "diagnose": 2,
  "plot": 2,
  "models": 3,
  "data": 3,
  "run": 4,
  "train": 5,
  "cli": 6,
  "__main__": 6,
}

#: Known upward imports, ``(importing module, imported top-level name): why``. Empty: the
#: tree has none. An entry that is no longer needed fails the test too.
ALLOWED_UPWARD: dict[tuple[str, str], str] = {}


def _modules() -> Iterator[tuple[Path, str]]:
  """Every module of the package but its ``__init__`` (the public API, exempt)."""
  for path in sorted(PACKAGE.rglob("*.py")):
    rel = path.relative_to(PACKAGE).with_suffix("")
    if rel.parts == ("__init__",):
      continue
    yield path, ".".join(("jaxscope", *rel.parts))


def _imported(path: Path, module: str) -> Iterator[tuple[int, str]]:
  """``(line, dotted name)`` of every ``jaxscope`` import of a module, at any depth
  (module level, functions, ``TYPE_CHECKING`` blocks); relative imports resolved."""
  package = module if path.name == "__init__.py" else module.rpartition(".")[0]
  for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
    if isinstance(node, ast.Import):
      for alias in node.names:
        yield node.lineno, alias.name
    elif isinstance(node, ast.ImportFrom):
      if node.level:
        base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
        source = ".".join([*base, *([node.module] if node.module else [])])
      else:
        source = node.module or ""
      for alias in node.names:  # `from jaxscope import tree` imports jaxscope.tree.
        yield node.lineno, f"{source}.{alias.name}" if source == "jaxscope" else source


def _top(name: str) -> str | None:
  """The top-level module of ``jaxscope.X.…`` (``None`` for ``jaxscope`` itself and names
  of its public API such as ``jaxscope.__version__``)."""
  parts = name.split(".")
  if len(parts) < 2:
    return None
  is_module = (PACKAGE / parts[1]).is_dir() or (PACKAGE / f"{parts[1]}.py").is_file()
  return parts[1] if is_module else None


def _api_rank() -> int:
  """The rank of ``import jaxscope``: the highest layer its ``__init__`` re-exports."""
  tops = {_top(n) for _, n in _imported(PACKAGE / "__init__.py", "jaxscope")} - {None}
  return max(RANKS[t] for t in tops)


def test_every_top_level_module_has_a_layer():
  tops = {p.stem for p in PACKAGE.glob("*.py")} | {
    p.parent.name for p in PACKAGE.glob("*/__init__.py")
  }
  assert tops - {"__init__"} == set(RANKS), "give each jaxscope/ module a layer in RANKS"


def test_imports_point_down_the_layers():
  api = _api_rank()
  upward, used = [], set()
  for path, module in _modules():
    own_top = module.split(".")[1]
    assert own_top in RANKS, f"give jaxscope/{own_top} a layer in RANKS"
    rank = RANKS[own_top]
    for line, name in _imported(path, module):
      if name != "jaxscope" and not name.startswith("jaxscope."):
        continue
      top = _top(name)
      target = api if top is None else RANKS[top]
      if target <= rank:
        continue
      key = (module, top or "jaxscope")
      if key in ALLOWED_UPWARD:
        used.add(key)
        continue
      upward.append(
        f"{path.relative_to(ROOT)}:{line}: {module} (layer {rank}) imports {name} (layer {target})"
      )
  assert not upward, "imports pointing up the layers:\n" + "\n".join(upward)
  assert used == set(ALLOWED_UPWARD), f"stale allow-list entries: {set(ALLOWED_UPWARD) - used}"


# --------------------------------------------------------------------------------- sizes

MAX_MODULE_LINES = 650
MAX_FUNCTION_LINES = 130

#: Modules over the size goals, ``path: why``; an entry that is no longer needed fails.
ALLOWED_LONG: dict[str, str] = {}


def _too_long() -> dict[str, list[str]]:
  """``{module path: [what is too long]}``."""
  out: dict[str, list[str]] = {}
  for path, _ in [(PACKAGE / "__init__.py", "jaxscope"), *_modules()]:
    rel = path.relative_to(ROOT).as_posix()
    text = path.read_text(encoding="utf-8")
    found = []
    if len(text.splitlines()) > MAX_MODULE_LINES:
      found.append(f"{len(text.splitlines())} lines")
    for node in ast.walk(ast.parse(text, rel)):
      if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
        length = node.end_lineno - node.lineno + 1  # type: ignore[operator]
        if length > MAX_FUNCTION_LINES:
          found.append(f"{node.name}() at line {node.lineno}: {length} lines")
    if found:
      out[rel] = found
  return out


def test_modules_and_functions_stay_small():
  long = _too_long()
  new = {p: f for p, f in long.items() if p not in ALLOWED_LONG}
  assert not new, "over the size goals (split by concept):\n" + "\n".join(
    f"{p}: {', '.join(f)}" for p, f in sorted(new.items())
  )
  assert set(ALLOWED_LONG) <= set(long), f"stale: {set(ALLOWED_LONG) - set(long)}"


# ------------------------------------------------------------------------------ the docs


def _readme_api_example() -> tuple[str, str]:
  """The code and the printed output of the README's "Python API for a run" example."""
  text = README.read_text(encoding="utf-8")
  section = text.split("\n## Python API for a run\n", 1)[1].split("\n## ", 1)[0]
  match = re.search(r"```python\n(.*?)```.*?```text\n(.*?)```", section, re.S)
  assert match, "README: the Python API section needs a python block and a text block"
  return match[1], match[2]


def test_readme_python_api_example_prints_what_it_shows(tmp_path, monkeypatch, capsys):
  code, shown = _readme_api_example()
  run_dir = tmp_path / "run"
  run_dir.mkdir()
  monkeypatch.setattr(tempfile, "mkdtemp", lambda *a, **k: str(run_dir))
  exec(compile(code, str(README), "exec"), {"__name__": "readme_example"})
  assert capsys.readouterr().out == shown
  assert (run_dir / "analysis" / "path.json").is_file()


def test_architecture_doc_names_every_top_level_module():
  text = ARCHITECTURE_DOC.read_text(encoding="utf-8")
  for top in RANKS:
    spelled = f"jaxscope/{top}/" if (PACKAGE / top).is_dir() else f"jaxscope/{top}.py"
    assert spelled in text, f"docs/architecture.md does not name {spelled}"


if __name__ == "__main__":
  write_options_table()
  print(f"wrote the options table of {OPTIONS_DOC.relative_to(ROOT)}")
