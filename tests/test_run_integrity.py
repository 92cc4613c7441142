"""A run directory that cannot be corrupted (issue 19): faults injected into real runs.

``jaxscope train`` runs in subprocesses (the digits MLP, a few steps) and is killed, stopped,
locked out, starved of disk space or resumed with other options; each time the run
directory must stay readable, say what happened in one line, and end with the parameters
and the metrics (one value per step) of an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import random
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from jaxscope.cli import main
from jaxscope.record import History
from jaxscope.record.rewind import drop_rewound, rewind_log
from jaxscope.run import RunLayout
from jaxscope.run.lock import RunLock, RunLockedError

ROOT = Path(__file__).resolve().parents[1]
#: A small run: 12 updates of the digits MLP, a checkpoint every 3, an evaluation every 4.
BASE = (
  "train",
  "-m",
  "mlp",
  "-d",
  "digits",
  "-b",
  "64",
  "--steps",
  "12",
  "--metrics",
  "norm,ratio",
  "--checkpoint-every",
  "3",
  "--eval-every",
  "4",
  "--no-live-diagnosis",
  "--no-plots",
  "-q",
)


def _env() -> dict[str, str]:
  return {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}


def _popen(*args: str, **kw: Any) -> subprocess.Popen:
  code = "import sys; from jaxscope.cli import main; sys.exit(main(sys.argv[1:]))"
  return subprocess.Popen(
    [sys.executable, "-c", code, *args],
    env=_env(),
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
    **kw,
  )


def _cli(*args: str, **kw: Any) -> tuple[int, str]:
  proc = _popen(*args, **kw)
  _, err = proc.communicate(timeout=300)
  return proc.returncode, err


def _in_process(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
  try:
    code = main(list(args))
  except SystemExit as e:
    code = int(e.code or 0)
  return code, capsys.readouterr().err


def _records(run: Path) -> list[tuple[int, tuple[str, ...]]]:
  """``(step, keys)`` of every line of the log (all lines must be complete records)."""
  out = []
  for line in (run / "metrics.jsonl").read_text().splitlines():
    record = json.loads(line)
    out.append((record["step"], tuple(sorted(record["values"]))))
  return out


def _assert_same_history(ref: Path, got: Path) -> None:
  a, b = History.load(ref), History.load(got)
  assert a.keys() == b.keys()
  for key in a.keys():
    np.testing.assert_array_equal(a.steps(key), b.steps(key), err_msg=key)
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)
  assert _records(ref) == _records(got)  # Line for line: no step recorded twice.


def _final_params(run: Path) -> list[np.ndarray]:
  from jaxscope.checkpoint import RunCheckpoints

  with RunCheckpoints(run) as ckpts:
    return [np.asarray(leaf) for _, leaf in ckpts.leaves(max(ckpts.steps))]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
  """The uninterrupted run."""
  run = tmp_path_factory.mktemp("reference") / "run"
  code, err = _cli(*BASE, "--out", str(run))
  assert code == 0, err
  return run


# --------------------------------------------------------------------------- hard faults


@pytest.mark.slow
def test_kill_9_at_random_moments_then_resume_is_the_uninterrupted_run(reference, tmp_path):
  """20 ``kill -9`` at random moments (starting, stepping, saving a checkpoint, flushing the
  log); each restart resumes; the finished run equals the uninterrupted one."""
  run = tmp_path / "run"
  rng = random.Random(19)
  kills = 0
  for _ in range(60):
    if kills == 20:
      break
    proc = _popen(*BASE, "--out", str(run), "--resume")
    size = (run / "metrics.jsonl").stat().st_size if (run / "metrics.jsonl").exists() else 0
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:  # Until it starts writing.
      log = run / "metrics.jsonl"
      if log.exists() and log.stat().st_size != size:
        break
      time.sleep(0.01)
    # A short window: with a warm compilation cache the 12 steps take ~0.2 s after the
    # first record, so a longer one let a restart finish the run after 4 kills (seen once).
    time.sleep(rng.uniform(0.0, 0.15))
    if proc.poll() is None:
      proc.send_signal(signal.SIGKILL)
      kills += 1
    proc.communicate(timeout=60)
    if proc.returncode == 0:  # Finished before the kill: start from a part of the run.
      break
  assert kills >= 5, kills  # The run was interrupted many times (timing varies).
  code, err = _cli(*BASE, "--out", str(run), "--resume")
  assert code == 0, err
  _assert_same_history(reference, run)
  for a, b in zip(_final_params(reference), _final_params(run), strict=True):
    np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_sigterm_stops_like_ctrl_c_with_exit_code_143(tmp_path, capsys):
  """A second run on the directory of a training run refuses at once; the first goes on,
  then SIGTERM stops it cleanly."""
  run = tmp_path / "run"
  proc = _popen(*BASE[:8], "1000", *BASE[9:], "--out", str(run))
  deadline = time.monotonic() + 120
  while time.monotonic() < deadline and len(_lines(run)) < 4:
    time.sleep(0.05)
  code, err = _in_process(capsys, *BASE[:8], "1000", *BASE[9:], "--out", str(run), "--resume")
  assert code == 75 and f"in use by pid {proc.pid}" in err, err
  assert proc.poll() is None  # The first run is still training...
  n = len(_lines(run))
  while time.monotonic() < deadline and len(_lines(run)) <= n + 2:
    time.sleep(0.05)  # ...and still writing its log.
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 143, err
  assert "SIGTERM: stopping after this step" in err
  steps = sorted(RunLayout(run).checkpoints.glob("[0-9]*"), key=lambda p: int(p.name))
  last = int(steps[-1].name)
  assert 0 < last < 1000
  trained = [step for step, keys in _records(run) if "loss" in keys]
  assert trained == list(range(last))  # Every step up to the final checkpoint, logged.


def _lines(run: Path) -> list[str]:
  log = run / "metrics.jsonl"
  return log.read_text().splitlines() if log.exists() else []


def _limit_file_size(limit: int) -> Any:
  def preexec() -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() then fails with EFBIG.
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

  return preexec


@pytest.mark.slow
def test_after_a_failed_write_only_its_oserror_is_kept_quiet_at_exit():
  import types

  from jaxscope.cli import _quiet_oserror

  seen = []
  hook = _quiet_oserror(seen.append)
  for exc in (OSError(27, "File too large"), ValueError("other")):
    hook(types.SimpleNamespace(exc_value=exc))
  assert [type(u.exc_value) for u in seen] == [ValueError]


def test_full_disk_is_one_line_and_loses_nothing_written(reference, tmp_path):
  run = tmp_path / "run"
  # Files may grow to 6 kB: the log fills after a few steps, mid-run.
  code, err = _cli(*BASE, "--out", str(run), preexec_fn=_limit_file_size(6000))
  assert code == 74, err
  lines = err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("jaxscope train: error: cannot write"), err
  assert "Traceback" not in err
  written = _records(run)  # Every line written is a complete record...
  steps = [s for s, _ in written]
  assert steps == sorted(steps) and steps[0] == 0
  code, err = _cli(*BASE, "--out", str(run), "--resume")  # ...and the run resumes from it.
  assert code == 0, err
  _assert_same_history(reference, run)


def _mount_read_only(path: Path) -> bool:
  """A read-only tmpfs at ``path`` holding a copy of its contents (needs root)."""
  if os.geteuid() != 0:
    return False
  import shutil

  copy = path.with_name(path.name + "-copy")
  shutil.copytree(path, copy)
  try:
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(path)], check=True, capture_output=True)
  except (OSError, subprocess.CalledProcessError):
    shutil.rmtree(copy)
    return False
  shutil.copytree(copy, path, dirs_exist_ok=True)
  subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True, capture_output=True)
  return True


@pytest.mark.slow
def test_read_only_run_directory_is_one_line(reference, tmp_path):
  import shutil

  run = tmp_path / "run"
  shutil.copytree(reference, run)
  if _mount_read_only(run):
    cleanup = ["umount", str(run)]
  elif os.geteuid() != 0:
    for p in [run, *run.rglob("*")]:
      p.chmod(p.stat().st_mode & ~0o222)
    cleanup = None
  else:
    pytest.skip("root without mount: no way to make a read-only directory here")
  before = (run / "metrics.jsonl").read_bytes()
  try:
    code, err = _cli(*BASE[:8], "14", *BASE[9:], "--out", str(run), "--resume")
    assert code == 74, err
    assert len(err.strip().splitlines()) == 1 and "cannot write" in err, err
    assert (run / "metrics.jsonl").read_bytes() == before
  finally:
    if cleanup:
      subprocess.run(cleanup, check=False)
    else:
      for p in [run, *run.rglob("*")]:
        p.chmod(p.stat().st_mode | 0o200)


# --------------------------------------------------------------------------- repairs


@pytest.mark.slow
def test_truncated_log_line_and_damaged_checkpoint_are_repaired_on_resume(reference, tmp_path):
  run = tmp_path / "run"
  code, err = _cli(*BASE[:8], "9", *BASE[9:], "--out", str(run))
  assert code == 0, err
  with open(run / "metrics.jsonl", "a") as f:
    f.write('{"step": 9, "values": {"loss": 0.1')  # A crash mid-line.
  damaged = RunLayout(run).checkpoints / "9"
  for item in damaged.glob("state/*"):  # A crash mid-save of the newest checkpoint.
    if item.is_file():
      item.write_bytes(b"")
  code, err = _cli(*BASE, "--out", str(run), "--resume")
  assert code == 0, err
  assert "checkpoints [9] could not be read" in err and "resuming from step 6" in err
  assert (RunLayout(run).damaged_checkpoints / "9").is_dir()  # Kept aside...
  _assert_same_history(reference, run)  # ...and written again; no garbage in the log.
  for a, b in zip(_final_params(reference), _final_params(run), strict=True):
    np.testing.assert_array_equal(a, b)
  assert not list(run.glob("metrics.jsonl.rewound-*"))  # The run is past the cut.


def test_rewind_keeps_the_checkpoints_evaluation_and_sets_the_tail_aside(tmp_path):
  lines = [
    {"step": 0, "values": {"test/loss": 2.0}},
    {"step": 0, "values": {"loss": 2.1}},
    {"step": 1, "values": {"loss": 1.9}},
    {"step": 2, "values": {"test/loss": 1.5}},
    {"step": 2, "values": {"loss": 1.4}},
    {"step": 3, "values": {"loss": 1.3}},
  ]
  text = "".join(json.dumps(r) + "\n" for r in lines) + '{"step": 4, "val'
  (tmp_path / "metrics.jsonl").write_text(text)
  aside = rewind_log(tmp_path, 2)
  kept = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert kept == lines[:4]  # Steps before 2 and the evaluation of 2.
  cut = aside.read_text().splitlines()
  assert [json.loads(x) for x in cut[:2]] == lines[4:] and cut[2] == '{"step": 4, "val'
  assert rewind_log(tmp_path, 2) is None  # Nothing more to cut.
  assert drop_rewound(tmp_path, 3) == [] and aside.exists()  # Not past step 4 yet.
  assert drop_rewound(tmp_path, 5) == [aside] and not aside.exists()


def test_history_keeps_the_last_value_of_a_repeated_step(tmp_path):
  lines = [{"step": 0, "values": {"loss": 1.0}}, {"step": 1, "values": {"loss": 2.0}}]
  lines += [{"step": 1, "values": {"loss": 3.0}}, {"step": 2, "values": {"loss": 4.0}}]
  (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
  h = History.load(tmp_path)
  assert h.steps("loss").tolist() == [0, 1, 2] and h["loss"].tolist() == [1.0, 3.0, 4.0]


# --------------------------------------------------------------------------- resume and config


@pytest.mark.slow
def test_resume_with_a_changed_lr_is_refused_then_recorded(reference, tmp_path, capsys):
  import shutil

  run = tmp_path / "run"
  shutil.copytree(reference, run)
  before = (run / "metrics.jsonl").read_bytes()
  code, err = _in_process(capsys, "train", "--out", str(run), "--resume", "--lr", "0.1")
  assert code == 2
  assert "lr: 0.05 -> 0.1" in err and "--allow-changes" in err
  assert (run / "metrics.jsonl").read_bytes() == before  # Untouched.
  # More steps are harmless; the options left out are the run's own (--metrics norm,ratio).
  args = ("train", "--out", str(run), "--resume", "--steps", "14", "--lr", "0.1")
  with pytest.warns(UserWarning) as caught:
    code, err = _in_process(capsys, *args, "--allow-changes")
  assert code == 0, err
  (warning,) = [str(w.message) for w in caught if "resum" in str(w.message)]
  assert "at step 12: changed steps 12 -> 14, lr 0.05 -> 0.1." in warning
  config = json.loads((run / "config.json").read_text())
  assert config["lr"] == 0.1 and config["steps"] == 14 and config["metrics"] == "norm,ratio"
  (entry,) = config["config_history"]
  assert entry["step"] == 12
  assert entry["changes"]["lr"] == {"from": 0.05, "to": 0.1, "kind": "training"}
  assert entry["changes"]["steps"] == {"from": 12, "to": 14, "kind": "other"}
  h = History.load(run)
  assert h.steps("loss").tolist() == list(range(14))


@pytest.mark.slow
def test_resume_with_other_metrics_is_one_warning(reference, tmp_path):
  import shutil

  run = tmp_path / "run"
  shutil.copytree(reference, run)
  # Cockpit's instruments join: the saved state has none (one restore error per checkpoint
  # was printed before, ~164 kB); it is read in its own structure and carried over.
  args = ("train", "--out", str(run), "--resume", "--steps", "13", "--metrics", "economy", "-q")
  code, err = _cli(*args)  # The command line's own warning format: one line.
  assert code == 0, err
  assert err.count("\n") == 1 and err.startswith("jaxscope: warning: train(resume=True)")
  assert "metrics norm,ratio -> economy" in err and "measurements' state starts afresh" in err
  h = History.load(run)
  assert h.steps("loss").tolist() == list(range(13))
  assert h.steps("norm_test").tolist() == [12]


def test_resume_of_a_missing_directory_says_so(tmp_path, capsys):
  with pytest.warns(UserWarning, match="nothing to resume in"):
    code, _ = _in_process(
      capsys, *BASE[:8], "1", *BASE[9:], "--out", str(tmp_path / "none"), "--resume"
    )
  assert code == 0


def _old_run(run: Path) -> None:
  """A directory that holds a run: a log, a config and a checkpoint folder (contents made up)."""
  (RunLayout(run).checkpoints / "7").mkdir(parents=True)
  (run / "metrics.jsonl").write_text('{"step": 0, "values": {"loss": 1.0}}\n')
  (run / "config.json").write_text('{"model": "mlp"}\n')


def test_existing_run_needs_resume_or_overwrite(tmp_path, capsys):
  run = tmp_path / "run"
  _old_run(run)
  (run / "notes.txt").write_text("mine")
  code, err = _in_process(capsys, *BASE[:8], "2", *BASE[9:], "--out", str(run))
  assert code == 2 and "--overwrite" in err
  code, err = _in_process(capsys, *BASE[:8], "2", *BASE[9:], "--out", str(run), "--overwrite")
  assert code == 0, err
  assert History.load(run).steps("loss").tolist() == [0, 1]
  assert (run / "notes.txt").read_text() == "mine"  # Not jaxscope's: left.
  steps = sorted(int(p.name) for p in RunLayout(run).checkpoints.glob("[0-9]*"))
  assert steps == [0, 2]


# --------------------------------------------------------------------------- the lock


def test_second_run_on_a_locked_directory_refuses_at_once(tmp_path, capsys):
  run = tmp_path / "run"
  _old_run(run)
  before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lock"}
  with RunLock(RunLayout(run).lock):  # The first run, still training.
    t0 = time.perf_counter()
    code, err = _in_process(capsys, "train", "--out", str(run), "--resume", "--steps", "20")
    assert time.perf_counter() - t0 < 30
  assert code == 75
  assert len(err.strip().splitlines()) == 1 and f"pid {os.getpid()}" in err, err
  after = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lock"}
  assert after == before


def test_lock_left_by_a_dead_process_is_taken_over_and_reported(tmp_path):
  path = tmp_path / ".lock"
  proc = subprocess.run(
    [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True
  )
  dead = int(proc.stdout)
  path.write_text(json.dumps({"pid": dead, "host": "h", "started": "t", "command": "c"}))
  with RunLock(path) as lock:
    assert lock.held and lock.stale["pid"] == dead
    with pytest.raises(RunLockedError, match=f"in use by pid {os.getpid()}"):
      RunLock(path).acquire()
  assert json.loads(path.read_text())["released"] is True
  with RunLock(path) as lock:
    assert lock.stale == {}  # Released cleanly: nothing to report.


# --------------------------------------------------------------------------- file modes


@pytest.mark.slow
def test_files_follow_the_umask(tmp_path):
  run = tmp_path / "run"
  old = os.umask(0o002)
  try:
    code, err = _cli(*BASE[:8], "1", *BASE[9:], "--out", str(run))
  finally:
    os.umask(old)
  assert code == 0, err
  files = [p for p in run.rglob("*") if p.is_file()]
  assert any(p.name == "config.json" for p in files) and len(files) > 5
  modes = {str(p.relative_to(run)): p.stat().st_mode & 0o777 for p in files}
  assert all(m & 0o060 == 0o060 for m in modes.values()), modes  # Group can read and write.
