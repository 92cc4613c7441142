"""jaxscope.xla: the scheduler flag, the compiler-memory release and the resident heap applied
on import."""

import os
import subprocess
import sys

import jax
import jax.monitoring
import jax.numpy as jnp
import numpy as np
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
  assert off["defaults"] == dict.fromkeys(xla.DEFAULT_NAMES, False)
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
  monkeypatch.setattr(xla, "_applied", dict.fromkeys(xla.DEFAULT_NAMES, False))
  monkeypatch.setattr(xla, "_backends_running", lambda: False)
  env = {xla.ENV_OPT_OUT: "0"}
  assert xla.apply_defaults(env) == dict.fromkeys(xla.DEFAULT_NAMES, False)
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


@pytest.fixture
def fresh_defaults(monkeypatch):
  """Nothing applied yet, no backend running, and the trim listener and the resident heap
  stubbed to succeed: :func:`xla.apply_defaults` decides from the environment alone."""
  monkeypatch.setattr(xla, "_applied", dict.fromkeys(xla.DEFAULT_NAMES, False))
  monkeypatch.setattr(xla, "_backends_running", lambda: False)
  monkeypatch.setattr(xla, "_install_trim", lambda: object())
  monkeypatch.setattr(xla, "_keep_heap_resident", lambda environ: True)


def test_trim_choice_keeps_xla_scheduler(fresh_defaults):
  env = {xla.ENV_OPT_OUT: "trim"}
  off = {"scheduler_flag": False, "release_compiler_memory": True, "resident_heap": False}
  assert xla.apply_defaults(env) == off
  assert "XLA_FLAGS" not in env
  both: dict[str, str] = {}
  assert xla.apply_defaults(both) == dict.fromkeys(xla.DEFAULT_NAMES, True)
  assert both["XLA_FLAGS"] == xla.SCHEDULER_FLAG


def test_names_choose_the_defaults(fresh_defaults):
  env = {xla.ENV_OPT_OUT: " scheduler_flag, release_compiler_memory "}
  want = {"scheduler_flag": True, "release_compiler_memory": True, "resident_heap": False}
  assert xla.apply_defaults(env) == want
  assert env["XLA_FLAGS"] == xla.SCHEDULER_FLAG


def test_unknown_choice_is_an_error():
  with pytest.raises(ValueError, match=r"JAXSCOPE_XLA_DEFAULTS must be 1, trim, 0 or names from"):
    xla.apply_defaults({xla.ENV_OPT_OUT: "maybe"})
  with pytest.raises(ValueError, match=r"scheduler_flag, .*got 'scheduler_flag,heap'"):
    xla.apply_defaults({xla.ENV_OPT_OUT: "scheduler_flag,heap"})


@pytest.mark.parametrize(
  ("version", "choice", "flag"),
  [
    ("0.10.2", "", True),  # The tested jaxlib: the flag by default.
    ("0.99.0", "", False),  # Not verified: XLA might abort on a flag it no longer knows.
    ("0.99.0", "1", True),  # Asked for explicitly: added under any version.
    ("not-a-version", "", False),
  ],
)
def test_the_flag_by_default_only_under_a_verified_jaxlib(
  fresh_defaults, monkeypatch, version, choice, flag
):
  monkeypatch.setattr(xla.importlib.metadata, "version", lambda name: version)
  env = {xla.ENV_OPT_OUT: choice} if choice else {}
  want = {"scheduler_flag": flag, "release_compiler_memory": True, "resident_heap": True}
  assert xla.apply_defaults(env) == want
  assert (env.get("XLA_FLAGS") == xla.SCHEDULER_FLAG) is flag


def test_resident_heap_sets_glibc_trim_threshold_then_mmap_max():
  calls: list[tuple[int, int]] = []

  def mallopt(param, value):
    calls.append((param, value))
    return 1

  assert xla._keep_heap_resident({}, mallopt)
  assert calls == [(-1, 2**31 - 1), (-4, 0)]  # M_TRIM_THRESHOLD, M_MMAP_MAX (malloc.h).
  calls.clear()
  assert not xla._keep_heap_resident({"MALLOC_MMAP_MAX_": "65536"}, mallopt)
  assert not xla._keep_heap_resident({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=0"}, mallopt)
  assert calls == []  # The user's own malloc settings are left alone.
  assert not xla._keep_heap_resident({}, lambda param, value: 0)  # mallopt refused.


# A program with 49 MB of XLA temporaries (the product's output), above glibc's 32 MiB mmap
# threshold; the page faults of each of 15 calls after warming up.
_FAULTS = """
import json, resource
import jaxscope, jax, jax.numpy as jnp
c = jax.jit(lambda x: jnp.sum(jnp.sin(x @ x.T))).lower(jnp.ones((3500, 64))).compile()
x = jnp.ones((3500, 64)) / 64
faults = []
for i in range(18):
  r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  c(x).block_until_ready()
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0)
print(json.dumps({"temp": c.memory_analysis().temp_size_in_bytes, "faults": faults[3:],
  "defaults": jaxscope.xla.defaults()}))
"""


def _thp_always() -> bool:
  try:
    with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
      return "[always]" in f.read()
  except OSError:
    return False


@pytest.mark.skipif(xla._libc() is None or not hasattr(xla._libc(), "mallopt"), reason="glibc")
def test_resident_heap_stops_the_per_call_page_faults_of_large_temporaries():
  """The cause the default removes: without it, every call maps the 49 MB block fresh and
  faults in each of its pages; with it, the calls reuse the same heap pages."""
  import json

  def run(env_extra):
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", xla.ENV_OPT_OUT)}
    env.update(env_extra)
    out = subprocess.run(
      [sys.executable, "-c", _FAULTS], env=env, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])

  kept = run({})
  system = run({xla.ENV_OPT_OUT: "scheduler_flag,release_compiler_memory"})
  pages = kept["temp"] // os.sysconf("SC_PAGE_SIZE")
  assert kept["temp"] > 32 * 2**20
  assert kept["defaults"]["resident_heap"] and not system["defaults"]["resident_heap"]
  # The median call: a call now and then runs on a thread whose malloc arena does not hold
  # the block (seen on a loaded machine: 2-5 calls in 30), and maps it once more.
  assert np.median(kept["faults"]) < pages / 10, (kept, pages)
  if not _thp_always():  # With transparent huge pages always on, 2 MB pages fault instead.
    assert np.median(system["faults"]) > pages / 2, (system, pages)


def test_the_installed_jaxlib_is_verified():
  """The pinned set (constraints.txt) is what the flag was checked with; a new pin needs
  the check again (``VERIFIED_JAXLIB``)."""
  assert xla._jaxlib_verified()


def _instrumented_step(options: dict | None, preset: str = "business"):
  """A donated SGD step of a 256-128-10 MLP with the instruments of ``preset``."""
  import flax.linen as nn
  import optax

  from jaxscope.metrics import instruments

  class Mlp(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.relu(nn.Dense(128)(x))
      return nn.Dense(10)(x)

  model = Mlp()
  x = jax.random.normal(jax.random.key(0), (32, 256))
  y = jax.random.randint(jax.random.key(1), (32,), 0, 10)
  params = model.init(jax.random.key(2), x)["params"]
  tx = optax.sgd(0.1)
  inst = instruments(preset=preset)

  def losses_fn(p, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": p}, x), y)

  def step(params, opt_state, istate, x, y):
    probe = inst.grad(istate, losses_fn, params, x, y)
    updates, opt_state = tx.update(probe.grads, opt_state, params)
    values, istate = inst.update(istate, probe, updates)
    return optax.apply_updates(params, updates), opt_state, istate, values

  state = (params, tx.init(params), inst.init(params))
  jitted = jax.jit(step, donate_argnums=(0, 1, 2), compiler_options=options)
  return jitted, state, (x, y)


def _fresh(tree):
  return jax.tree.map(lambda a: jnp.array(a, copy=True), tree)


@pytest.mark.parametrize("name", ["FEWER_COPIES", "LEAN_COMPILE"])
def test_per_program_options_change_no_result(name):
  """Two steps compiled with an option give the default program's values and state."""
  outs = []
  for options in (None, getattr(xla, name)):
    step, state, (x, y) = _instrumented_step(options)
    state = _fresh(state)
    for _ in range(2):
      *state, values = step(*state, x, y)
    outs.append((state, values))
  for a, b in zip(jax.tree.leaves(outs[0]), jax.tree.leaves(outs[1]), strict=True):
    assert jnp.asarray(a).dtype == jnp.asarray(b).dtype
    if jnp.issubdtype(jnp.asarray(a).dtype, jnp.floating):
      assert jnp.allclose(a, b, rtol=1e-5, atol=1e-6, equal_nan=True), name
    else:
      assert jnp.array_equal(a, b), name


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="an XLA:CPU option")
def test_fewer_copies_keeps_no_copy_of_the_donated_parameters():
  """With the instruments' per-turn branches, XLA:CPU's default copy insertion copies the
  donated kernels before the step reads them; region-based live ranges do not."""

  def kernel_copies(options: dict | None) -> int:
    step, state, (x, y) = _instrumented_step(options)
    hlo = step.lower(*state, x, y).compile().as_text()
    return sum(
      1
      for line in hlo.splitlines()
      if " copy(" in line and "f32[256,128]" in line.split("copy(")[0] and "params" in line
    )

  assert kernel_copies(None) >= 1  # The finding the option is for (jax 0.10's XLA:CPU).
  assert kernel_copies(xla.FEWER_COPIES) == 0


def test_compiler_options_by_name():
  assert xla.compiler_options(None) is None and xla.compiler_options([]) is None
  both = xla.compiler_options(["fewer_copies", "lean_compile"])
  assert both == {**xla.FEWER_COPIES, **xla.LEAN_COMPILE} and len(both) == 2
  assert xla.compiler_options("lean_compile") == xla.LEAN_COMPILE
  with pytest.raises(ValueError, match=r"unknown name 'fast'; expected some of \['fewer_copies'"):
    xla.compiler_options(["lean_compile", "fast"])


@pytest.mark.parametrize(
  ("model", "shape", "conv"),
  [("mnist_mlp", (28, 28, 1), False), ("3c3d", (32, 32, 3), True), ("resnet20", (32, 32, 3), True)],
)
def test_has_convolution_finds_the_zoo_convolutions(model, shape, conv):
  """Through flax's modules (and the ResNet's batch norm), from the traced ``init``."""
  from jaxscope.models import registry

  m = registry.build(model, input_shape=shape, num_classes=10)
  x = jax.ShapeDtypeStruct((1, *shape), jnp.float32)
  assert xla.has_convolution(m.init, jax.random.key(0), x) is conv


def test_has_convolution_looks_inside_sub_programs():
  """A convolution only inside ``scan``, ``cond`` or ``remat`` is found; one that is not
  there is not invented."""
  w = jnp.ones((1, 1, 3, 3))

  def conv(x):
    return jax.lax.conv(x, w, (1, 1), "SAME")

  x = jnp.ones((1, 1, 8, 8))
  in_scan = lambda x: jax.lax.scan(lambda c, _: (conv(c), None), x, None, length=2)[0]  # noqa: E731
  in_cond = lambda x: jax.lax.cond(x.sum() > 0, conv, lambda y: y, x)  # noqa: E731
  assert xla.has_convolution(in_scan, x)
  assert xla.has_convolution(in_cond, x)
  assert xla.has_convolution(jax.checkpoint(conv), x)
  assert not xla.has_convolution(lambda x: jax.lax.scan(lambda c, _: (c * 2, None), x, None, 2), x)


def test_step_options_follow_the_measurements():
  assert xla.step_options(convolutional=True, hessian_sums=True) == ["lean_compile"]
  assert xla.step_options(convolutional=True, hessian_sums=False) == ["lean_compile"]
  assert xla.step_options(convolutional=False, hessian_sums=True) == ["fewer_copies"]
  assert xla.step_options(convolutional=False, hessian_sums=False) == []
  assert xla.step_options(convolutional=True, hessian_sums=True, platform="gpu") == []
  assert xla.step_options(convolutional=False, hessian_sums=True, platform="tpu") == []
