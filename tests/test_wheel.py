"""jaxscope installs into an environment of its own, away from the checkout (issue 20).

The wheel is built offline from a clean copy of the checkout (a stale ``build/lib`` left by
an older layout would otherwise be packed too), its file list is checked against the
source tree, and it is installed into a fresh virtual environment. The dependencies come
from the environment running the tests through a ``.pth`` line naming its site-packages (a
plain path, so that environment's editable install of jaxscope is not processed): nothing
is downloaded, and ``import jaxscope`` can only find the installed wheel. There, from a
directory outside the checkout, the README's quickstart runs (with a small model and three
batches of the digits), and so do ``jaxscope --help`` and a three-step ``jaxscope train``
read back with ``jaxscope.load_run``.
"""

from __future__ import annotations

import email.parser
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DATA = ["jaxscope/py.typed", "jaxscope/data/corpus/shakespeare.txt.gz"]
PACKAGE_DATA += ["jaxscope/data/corpus/NOTICE.md"]
# What a checkout holds besides the sources: never copied, never packed.
NOT_SOURCES = [".git", ".venv", "build", "dist", "runs", ".cache", "*.egg-info", "__pycache__"]
NOT_SOURCES += [".pytest_cache", ".ruff_cache", "*.pyc"]


def _env() -> dict[str, str]:
  """The environment of the subprocesses: no PYTHONPATH, no pip configuration."""
  env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "PIP_"))}
  env.update(PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1")
  env.update(MPLBACKEND="Agg", JAX_PLATFORMS="cpu")
  return env


def _run(cmd: list[str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
  r = subprocess.run(
    [str(c) for c in cmd], cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout
  )
  assert r.returncode == 0, f"{cmd}\nstdout:\n{r.stdout}\nstderr:\n{r.stderr}"
  return r


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
  """The wheel built offline (no index, no build isolation) from a copy of the checkout."""
  tmp = tmp_path_factory.mktemp("wheel")
  src = tmp / "src"
  shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(*NOT_SOURCES))
  pip = [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-index"]
  _run([*pip, "--no-build-isolation", "-w", tmp / "dist", src], cwd=tmp)
  (path,) = (tmp / "dist").glob("jaxscope-*.whl")
  return path


def test_wheel_holds_the_package_and_its_data_only(wheel):
  with zipfile.ZipFile(wheel) as z:
    names = set(z.namelist())
    dist_info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
    metadata = email.parser.Parser().parsestr(z.read(f"{dist_info}/METADATA").decode())
    entry_points = z.read(f"{dist_info}/entry_points.txt").decode()
    corpus = z.read("jaxscope/data/corpus/shakespeare.txt.gz")
  assert {n.split("/")[0] for n in names} == {"jaxscope", dist_info}  # no tests/, examples/
  assert set(PACKAGE_DATA) <= names
  assert corpus == (ROOT / "jaxscope/data/corpus/shakespeare.txt.gz").read_bytes()
  # Every module of the source tree, and nothing else (no stale module of an older layout).
  sources = {p.relative_to(ROOT).as_posix() for p in (ROOT / "jaxscope").rglob("*.py")}
  assert {n for n in names if n.endswith(".py")} == sources
  assert re.search(r"^jaxscope = jaxscope\.cli:main$", entry_points, re.M)
  requires = [re.split(r"[ ;<>=!\[]", r, maxsplit=1)[0] for r in metadata.get_all("Requires-Dist")]
  for name in ("jax", "flax", "optax", "orbax-checkpoint", "matplotlib", "scikit-learn", "scipy"):
    assert name in requires
  assert {"tensorboard", "examples"} <= set(metadata.get_all("Provides-Extra"))
  assert 'tensorboardX>=2.6; extra == "tensorboard"' in metadata.get_all("Requires-Dist")


def _readme_quickstart() -> str:
  """The first python block of the README (the quickstart above "## Why")."""
  text = (ROOT / "README.md").read_text(encoding="utf-8").split("\n## ", 1)[0]
  match = re.search(r"```python\n(.*?)```", text, re.S)
  assert match, "README: the introduction needs the quickstart's python block"
  return match[1]


# What the README's quickstart takes as given: a model, its params and some batches.
QUICKSTART_PRELUDE = """
import itertools

import flax.linen as nn
import jax

from jaxscope.data import batches as _batches
from jaxscope.data import load_digits

_data = load_digits()
model = nn.Sequential([lambda x: x.reshape(x.shape[0], -1), nn.Dense(16), nn.relu, nn.Dense(10)])
params = model.init(jax.random.PRNGKey(0), _data.train_x[:1])["params"]
batches = itertools.islice(_batches(_data.train_x, _data.train_y, 32, seed=0), 3)
"""

QUICKSTART_CHECK = """
import json
from pathlib import Path

import jaxscope.data.text

print(json.dumps({
  "file": jaxscope.__file__,
  "steps": history.steps("loss").tolist(),
  "keys": history.keys(),
  "plots": sorted(p.name for p in Path("runs/my-run/plots").glob("*.png")),
  "corpus": len(jaxscope.data.text.read_corpus()),
}))
"""

LOAD_RUN = """
import json, sys
import jaxscope

with jaxscope.load_run(sys.argv[1]) as run:
  print(json.dumps({
    "model": run.config["model"],
    "steps": run.history.steps("loss").tolist(),
    "checkpoints": run.checkpoints.steps,
  }))
"""


@pytest.mark.slow
def test_wheel_installs_and_runs_in_a_fresh_environment(wheel, tmp_path):
  venv = tmp_path / "venv"
  _run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=tmp_path)
  python = venv / "bin" / "python"
  paths = json.loads(
    _run(
      [python, "-c", "import json, sysconfig; print(json.dumps(sysconfig.get_paths()))"],
      cwd=tmp_path,
    ).stdout
  )
  # The tests' environment, as a plain path: its packages (pip among them), not its .pth files.
  ours = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
  Path(paths["purelib"], "_jaxscope_test_deps.pth").write_text("\n".join(ours) + "\n")

  _run([python, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", wheel], cwd=tmp_path)
  _run([python, "-m", "pip", "check"], cwd=tmp_path)

  work = tmp_path / "work"  # outside the checkout: nothing there to import or read
  work.mkdir()
  script = QUICKSTART_PRELUDE + _readme_quickstart() + QUICKSTART_CHECK
  (work / "quickstart.py").write_text(script, encoding="utf-8")
  result = json.loads(_run([python, "quickstart.py"], cwd=work).stdout.splitlines()[-1])
  assert Path(result["file"]).is_relative_to(venv), result["file"]
  assert result["steps"] == [0, 1, 2]
  assert any(k.startswith("updates/ratio/") for k in result["keys"]), result["keys"]
  assert result["plots"] and result["corpus"] > 1_000_000

  jaxscope = venv / "bin" / "jaxscope"
  assert "train" in _run([jaxscope, "--help"], cwd=work).stdout
  assert "--steps" in _run([jaxscope, "train", "--help"], cwd=work).stdout
  argv = [jaxscope, "train", "--model", "mlp", "--dataset", "digits", "--steps", "3"]
  argv += ["--metrics", "none", "--checkpoint-every", "3", "--out", "run", "--quiet", "--no-plots"]
  _run(argv, cwd=work)
  (work / "load_run.py").write_text(textwrap.dedent(LOAD_RUN), encoding="utf-8")
  run = json.loads(_run([python, "load_run.py", "run"], cwd=work).stdout.splitlines()[-1])
  assert run == {"model": "mlp", "steps": [0, 1, 2], "checkpoints": [0, 3]}, run
