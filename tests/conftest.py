"""Suite-wide pytest hooks."""

from __future__ import annotations

from typing import Any

#: Test modules holding the suite's longest tests (each 30–100 s on the 2-core CPU). They
#: are collected first, so that `make test`'s two workers start on them and no long test
#: is left for the end of the run, when the other worker would be idle. Whole modules
#: move, so their module-scoped fixtures are still built once per worker.
LONG_MODULES = (
  "test_run_integrity.py",
  "test_sharded_train.py",
  "test_transformer_stacked.py",
  "test_analysis_api.py",
  "test_diagnose_benchmark.py",
)


def pytest_collection_modifyitems(config: Any, items: list[Any]) -> None:
  del config
  rank = {name: i for i, name in enumerate(LONG_MODULES)}

  def key(item: Any) -> int:
    return rank.get(item.path.name, len(LONG_MODULES))

  items.sort(key=key)  # Stable: the order within a module and among the others is kept.
