"""jaxscope.xla: the scheduler flag and the compiler-memory release applied on import."""

import os
import subprocess
import sys

import jax
import jax.monitoring
import jax.numpy as jnp
import pytest

from jaxscope import xla

# A program whose eight tangent-independent 4 MB buffers the concurrency-optimised
# scheduler computes up front (all alive at once), the depth-first one each in its turn.
_PROGRAM = """
import os, sys, json
import jaxscope, jax, jax.numpy as jnp
from jax import lax
def f(x):
  for i in range(8):
    big = jnp.sin(jnp.arange(1 << 20, dtype=jnp.float32) * (i + 1))
    (x,) = lax.optimization_barrier((x,))
    x = x + jnp.cumsum(big)[::1024][: x.shape[0]] * x[0]
  return x
c = jax.jit(f).lower(jnp.ones(1024)).compile()
print(json.dumps({"temp": c.memory_analysis().temp_size_in_bytes,
  "flags": os.environ.get("XLA_FLAGS", ""), "defaults": jaxscope.xla.defaults()}))
"""


def _run(env_extra: dict[str, str]) -> dict:
  import json

  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", xla.ENV_OPT_OUT)}
  env.update(env_extra)
  out = subprocess.run(
    [sys.executable, "-c", _PROGRAM], env=env, capture_output=True, text=True, check=True
  )
  return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_import_sets_the_flag_and_the_scheduler_keeps_fewer_buffers_alive():
  on = _run({})
  off = _run({xla.ENV_OPT_OUT: "0"})
  assert xla.SCHEDULER_FLAG in on["flags"]
  assert on["defaults"]["scheduler_flag"]
  assert xla.SCHEDULER_FLAG not in off["flags"]
  assert off["defaults"] == {"scheduler_flag": False, "release_compiler_memory": False}
  # The eight 4 MB buffers: alive together without the flag, one or two at a time with it.
  assert off["temp"] - on["temp"] >= 8 * 2**20, (on["temp"], off["temp"])


def test_a_flag_the_user_set_is_left_alone():
  user = _run({"XLA_FLAGS": "--xla_cpu_enable_concurrency_optimized_scheduler=true"})
  assert user["flags"] == "--xla_cpu_enable_concurrency_optimized_scheduler=true"
  assert not user["defaults"]["scheduler_flag"]


def test_add_scheduler_flag_appends_to_other_flags(monkeypatch):
  monkeypatch.setattr(xla, "_backends_running", lambda: False)
  env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  assert xla._add_scheduler_flag(env)
  assert env["XLA_FLAGS"] == f"--xla_force_host_platform_device_count=8 {xla.SCHEDULER_FLAG}"
  assert not xla._add_scheduler_flag(env)  # Named now: not added twice.
  empty: dict[str, str] = {}
  assert xla._add_scheduler_flag(empty)
  assert empty["XLA_FLAGS"] == xla.SCHEDULER_FLAG


def test_no_flag_once_a_backend_runs():
  jax.devices()  # This process's backend is up.
  env: dict[str, str] = {}
  assert not xla._add_scheduler_flag(env)
  assert env == {}


def test_opt_out_changes_nothing(monkeypatch):
  monkeypatch.setattr(xla, "_applied", {"scheduler_flag": False, "release_compiler_memory": False})
  monkeypatch.setattr(xla, "_backends_running", lambda: False)
  env = {xla.ENV_OPT_OUT: "0"}
  assert xla.apply_defaults(env) == {"scheduler_flag": False, "release_compiler_memory": False}
  assert env == {xla.ENV_OPT_OUT: "0"}


def test_trim_runs_after_each_compilation_only():
  calls: list[int] = []
  listener = xla._install_trim(calls.append)
  try:
    jax.block_until_ready(jax.jit(lambda x: x * 3.25 + 1.5)(jnp.ones(7)))
    after_compile = len(calls)
    jax.monitoring.record_event_duration_secs("/jax/some/other_event", 0.1)
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert after_compile >= 1 and calls[0] == 0
  assert len(calls) == after_compile


def test_trim_choice_keeps_xla_scheduler(monkeypatch):
  monkeypatch.setattr(xla, "_applied", {"scheduler_flag": False, "release_compiler_memory": False})
  monkeypatch.setattr(xla, "_backends_running", lambda: False)
  monkeypatch.setattr(xla, "_install_trim", lambda: object())
  env = {xla.ENV_OPT_OUT: "trim"}
  assert xla.apply_defaults(env) == {"scheduler_flag": False, "release_compiler_memory": True}
  assert "XLA_FLAGS" not in env
  both: dict[str, str] = {}
  assert xla.apply_defaults(both) == {"scheduler_flag": True, "release_compiler_memory": True}
  assert both["XLA_FLAGS"] == xla.SCHEDULER_FLAG


def test_unknown_choice_is_an_error():
  with pytest.raises(ValueError, match="JAXSCOPE_XLA_DEFAULTS must be 1, trim or 0, got 'maybe'"):
    xla.apply_defaults({xla.ENV_OPT_OUT: "maybe"})


@pytest.mark.parametrize(
  ("version", "choice", "flag"),
  [
    ("0.10.2", "", True),  # The tested jaxlib: the flag by default.
    ("0.99.0", "", False),  # Not verified: XLA might abort on a flag it no longer knows.
    ("0.99.0", "1", True),  # Asked for explicitly: added under any version.
    ("not-a-version", "", False),
  ],
)
def test_the_flag_by_default_only_under_a_verified_jaxlib(monkeypatch, version, choice, flag):
  monkeypatch.setattr(xla, "_applied", {"scheduler_flag": False, "release_compiler_memory": False})
  monkeypatch.setattr(xla, "_backends_running", lambda: False)
  monkeypatch.setattr(xla, "_install_trim", lambda: object())
  monkeypatch.setattr(xla.importlib.metadata, "version", lambda name: version)
  env = {xla.ENV_OPT_OUT: choice} if choice else {}
  assert xla.apply_defaults(env) == {"scheduler_flag": flag, "release_compiler_memory": True}
  assert (env.get("XLA_FLAGS") == xla.SCHEDULER_FLAG) is flag


def test_the_installed_jaxlib_is_verified():
  """The pinned set (constraints.txt) is what the flag was checked with; a new pin needs
  the check again (``VERIFIED_JAXLIB``)."""
  assert xla._jaxlib_verified()
