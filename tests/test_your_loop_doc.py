"""Every Python block of docs/your-loop.md runs as it stands (issue 20)."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import numpy as np
import pytest

DOC = Path(__file__).resolve().parents[1] / "docs" / "your-loop.md"
_BLOCK = re.compile(r"^## (?P<title>.+?)$|^```python\n(?P<code>.*?)^```$", re.M | re.S)


def _blocks() -> list[tuple[str, str]]:
  out, title = [], "?"
  for m in _BLOCK.finditer(DOC.read_text()):
    if m.group("title"):
      title = m.group("title")
    else:
      out.append((title, m.group("code")))
  return out


def test_the_page_has_one_block_per_set_up():
  titles = [t for t, _ in _blocks()]
  assert len(titles) == 7 and len(set(titles)) == 7, titles


@pytest.mark.slow
@pytest.mark.parametrize("title,code", _blocks(), ids=[t.split(" ")[0] for t, _ in _blocks()])
def test_block_runs(title, code, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    exec(compile(code, f"{DOC.name}: {title}", "exec"), {"__name__": "__doc_block__"})
  printed = out.getvalue()
  assert printed.strip(), f"{title}: the block prints what it shows"
  if "MultiSteps" in title:
    assert printed.strip().endswith("[ 3  7 11]")
  if "scan" in title:
    assert printed.strip() == str(np.arange(0, 30, 2))
  if "multi_transform" in title:
    body, head = printed.strip().split("] [")
    assert body == "[0 5" and head == "0 1 2 3 4 5 6 7 8 9]"
  if "inject_hyperparams" in title:
    assert printed.split()[-1] == "apply"
