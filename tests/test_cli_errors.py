"""Bad ``jaxscope train`` arguments: one line naming the argument, exit status 2, no traceback.

Each case runs in-process through :func:`jaxscope.cli.main` on a tiny run (``mlp`` on
``sine``, one step, no metrics, no plots). The library raises a ``ValueError`` naming the
argument; ``main`` prints it as ``jaxscope train: error: …``. The argument checks of the
optimizers, model builders and dataset loaders are also tested through their Python API.
"""

from __future__ import annotations

import inspect
import warnings

import pytest

from jaxscope import data, models
from jaxscope.cli import main
from jaxscope.models.keywords import OptionError, keyword_parameters, unknown_keywords, wrong_kind
from jaxscope.train import TrainConfig, make_optimizer, train

BASE = ["train", "-m", "mlp", "-d", "sine", "--steps", "1", "-b", "32", "--metrics", "none"]
BASE += ["--no-plots", "-q"]


def _run(tmp_path, args: list[str], capsys) -> tuple[int, str]:
  """``main`` on the tiny run with ``args``: its exit status and stderr."""
  try:
    code = main([*BASE, "--out", str(tmp_path / "run"), *args])
  except SystemExit as e:
    code = e.code
  return code, capsys.readouterr().err


# Refused while training is set up: the library's ValueError, printed by main as one line.
RUN_ERRORS = [
  # --opt-args: a text where the optimizer takes a number or a bool.
  (["-o", "adamw", "--opt-args", "weight_decay=abc"], ["weight_decay", "'abc'", "a number"]),
  (["-o", "adam", "--opt-args", "b1=abc"], ["b1", "'abc'", "a number"]),
  (["-o", "sgd", "--opt-args", "momentum=abc"], ["momentum", "'abc'", "a number or None"]),
  (["-o", "momentum", "--opt-args", "momentum=abc"], ["momentum", "'abc'", "default is 0.9"]),
  (["-o", "nesterov", "--opt-args", "nesterov=no"], ["nesterov", "'no'", "True or False"]),
  (["-o", "adaptive_sgd", "--opt-args", "initial_lr=abc"], ["initial_lr", "'abc'", "number"]),
  (["-o", "preconditioned_sgd", "--opt-args", "est_rank=abc"], ["est_rank", "an integer"]),
  # --opt-args: a keyword the optimizer does not take, with what it takes.
  (["-o", "adamw", "--opt-args", "weight_dcay=0.1"], ["'weight_dcay'", "'weight_decay'?", "b1"]),
  (["-o", "momentum", "--opt-args", "beta=0.5"], ["'beta'", "takes momentum, nesterov"]),
  (["-o", "adaptive_sgd", "--opt-args", "lr0=0.1"], ["'lr0'", "initial_lr", "fixed_lr"]),
  (["--opt-args", "learning_rate=0.1"], ["learning_rate", "--lr"]),
  (["-o", "adaptive_sgd", "--opt-args", "learning_rate=0.1"], ["learning_rate", "initial_lr="]),
  (["-o", "nosuch"], ["unknown optimizer 'nosuch'", "adaptive_sgd"]),
  # --model-args: an option the model does not take, or a text where it takes a number.
  (["--model-args", "widht=3"], ["'widht'", "this model takes hidden_sizes", "model_args"]),
  (["--model-args", "hidden_size=3"], ["'hidden_size'", "did you mean 'hidden_sizes'?"]),
  (["--model-args", "dtype=bfloat16"], ["'dtype'", "hidden_sizes"]),
  (["--model-args", "hidden_sizes=3"], ["hidden_sizes", "sequence of positive integers"]),
  (["--dtype", "bfloat16"], ["dtype='bfloat16'", "does not", "Leave dtype unset"]),
  (["-m", "mpl"], ["Unknown model name 'mpl'", "did you mean 'mlp'?"]),
  # --data-args and --dataset.
  (["--data-args", "noise_level=0.1"], ["data_args", "'noise_level'", "'noise_std'?"]),
  (["--data-args", "num_train=abc"], ["data_args num_train", "an integer", "'abc'"]),
  (["-d", "sin"], ["Unknown dataset 'sin'", "did you mean 'sine'?"]),
  # Values the parsers take but no run can.
  (["--lr", "-1"], ["lr", "positive", "-1.0"]),
  (["--schedule", "bogus"], ["unknown schedule 'bogus'", "cosine"]),
  (["--schedule", "exponential:2"], ["exponential:2", "(0, 1]"]),
  (["--metrics", "bogus"], ["unknown metric 'bogus'"]),
  (["--layers", "("], ["layers '('", "not a valid regex"]),
  (["--capacity", "chunks=x"], ["--capacity", "chunks", "'x'"]),
  (["-b", "5000"], ["batch_size 5000", "training examples"]),
]


@pytest.mark.parametrize("args, expected", RUN_ERRORS, ids=lambda v: " ".join(v)[:40])
def test_bad_argument_is_one_line_and_exit_status_2(tmp_path, capsys, args, expected):
  code, err = _run(tmp_path, args, capsys)
  assert code == 2, err
  assert "Traceback" not in err
  lines = [line for line in err.splitlines() if line.strip()]
  assert len(lines) == 1, err
  assert lines[0].startswith("jaxscope train: error: ")
  for text in expected:
    assert text in lines[0]
  assert not (tmp_path / "run").exists()  # Refused before the run directory is written.


# Refused by the argument parser: its usage, then one line naming the flag.
PARSE_ERRORS = [
  (["--seed", "-1"], "argument --seed: expected an integer >= 0, got -1"),
  (["--seed", "x"], "argument --seed: expected an integer >= 0, got 'x'"),
  (["-b", "0"], "argument -b/--batch-size: expected a positive integer, got 0"),
  (["--lr", "abc"], "argument -l/--lr/--learning-rate:"),
  (["--mesh", "data=0"], "argument --mesh: mesh: the size of axis 'data' must be a positive"),
  (["--every", "0"], "argument --every: expected a positive integer, got 0"),
  (["--opt-args", "momentum"], "argument --opt-args: expected key=value pairs, got 'momentum'"),
  (["--kind", "weights"], "argument --kind: invalid choice: 'weights'"),
]


@pytest.mark.parametrize("args, expected", PARSE_ERRORS, ids=lambda v: " ".join(v)[:40])
def test_bad_flag_value_is_refused_by_the_parser(tmp_path, capsys, args, expected):
  code, err = _run(tmp_path, args, capsys)
  assert code == 2
  assert "Traceback" not in err
  last = err.strip().splitlines()[-1]
  assert last.startswith("jaxscope train: error: ") and expected in last


def test_negative_seed_is_refused_by_the_python_api(tmp_path):
  with pytest.raises(ValueError, match="seed must be a non-negative int, got -1"):
    train(TrainConfig(model="mlp", dataset="sine", steps=1, seed=-1, out=str(tmp_path)))
  assert not any(tmp_path.iterdir())


# ------------------------------------------------------------------ the checks themselves


@pytest.mark.parametrize(
  "name, kwargs, match",
  [
    ("adamw", {"weight_decay": "1e-4"}, r"weight_decay must be a number .*got '1e-4'"),
    ("rmsprop", {"centered": "yes"}, "centered must be True or False"),
    ("lion", {"wd": 0.1}, r"\['wd'\].*lion takes b1, b2, mu_dtype, weight_decay, mask"),
    ("nesterov", {"momentum": "0.9"}, "momentum must be a number"),
    ("only_adaptive_sgd", {"fixed_lr": "x"}, "fixed_lr must be a number or None"),
  ],
)
def test_make_optimizer_refuses_bad_arguments(name, kwargs, match):
  with pytest.raises(ValueError, match=match):
    make_optimizer(name, 0.1, **kwargs)


@pytest.mark.parametrize(
  "name, kwargs",
  [
    ("adamw", {"mask": "x", "mu_dtype": "bfloat16", "weight_decay": lambda step: 0.1}),
    ("adafactor", {"dtype_momentum": "bfloat16"}),
    ("sgd", {"momentum": None, "nesterov": True}),
    ("momentum", {"momentum": 0.5, "accumulator_dtype": "float32"}),
    ("adaptive_sgd", {"initial_lr": 0.1, "labels": None, "momentum": 0.9}),
  ],
)
def test_make_optimizer_keeps_taking_strings_callables_and_none_where_they_belong(name, kwargs):
  make_optimizer(name, 0.1, **kwargs)


def test_momentum_and_nesterov_show_their_defaults_in_their_signature():
  from jaxscope.transforms import aliases

  assert inspect.signature(aliases.momentum).parameters["momentum"].default == 0.9
  assert inspect.signature(aliases.nesterov).parameters["nesterov"].default is True


def test_model_options_raise_option_error_a_value_error_and_a_type_error():
  with pytest.raises(OptionError, match=r"did you mean 'widths'\?"):
    models.build("resnet", (8, 8, 1), 10, width=(8, 8, 8))
  with pytest.raises(ValueError, match="model_args depth must be an integer"):
    models.build("resnet", (8, 8, 1), 10, depth="deep")
  with pytest.raises(TypeError, match="scan must be True or False"):
    models.build("transformer_lm", (8,), 16, scan="yes")
  with pytest.raises(ValueError, match=r"compression must be in \(0, 1\], got \[0.5\]"):
    models.build("densenet_bc", (8, 8, 1), 10, compression=[0.5])
  with pytest.raises(ValueError, match=r"dropout_rate must be in \[0, 1\), got None"):
    models.build("nnx_cnn", (8, 8, 1), 10, dropout_rate=None)


def test_data_options_and_the_unused_data_dir_warning(tmp_path, monkeypatch):
  with pytest.raises(OptionError, match=r"\['test_frac'\] \(did you mean 'test_fraction'\?\)"):
    data.load("digits", test_frac=0.5)
  with pytest.raises(ValueError, match="data_args seed must be an integer"):
    data.load("sine", seed="one")
  monkeypatch.delenv("JAXSCOPE_DATA", raising=False)
  with pytest.warns(UserWarning, match=r"data_dir '.*' is not used: sine is embedded") as got:
    data.load("sine", tmp_path, num_train=4, num_test=2)
  assert len(got) == 1
  monkeypatch.setenv("JAXSCOPE_DATA", str(tmp_path))  # The command line's default: quiet.
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    data.load("sine", str(tmp_path), num_train=4, num_test=2)
    data.load("sine", None, num_train=4, num_test=2)


def test_keyword_helpers():
  def f(a, *, depth: int = 20, rate: float | None = None, name: str | None = None, **kw): ...

  params, var_keyword = keyword_parameters(f, skip=1)
  assert list(params) == ["depth", "rate", "name"] and var_keyword
  assert unknown_keywords(["depth"], params) is None
  assert unknown_keywords(["dpth", "zzz"], params) == "['dpth', 'zzz'] (did you mean 'depth'?)"
  assert wrong_kind(params, {"depth": 3, "name": "x", "rate": None}) is None
  assert wrong_kind(params, {"rate": "fast"}) == ("rate", "fast", "a number or None")


@pytest.mark.slow  # Two one-step runs, about 6 s.
def test_train_warns_once_that_data_dir_is_unused_unless_it_is_jaxscope_data(
  tmp_path, capsys, monkeypatch
):
  monkeypatch.delenv("JAXSCOPE_DATA", raising=False)
  with pytest.warns(UserWarning, match="is not used: sine is embedded") as got:
    assert main([*BASE, "--out", str(tmp_path / "a"), "--data-dir", str(tmp_path)]) == 0
  assert len([w for w in got if "is not used" in str(w.message)]) == 1
  monkeypatch.setenv("JAXSCOPE_DATA", str(tmp_path))  # --data-dir's default: no warning.
  with warnings.catch_warnings(record=True) as got:
    warnings.simplefilter("always")
    assert main([*BASE, "--out", str(tmp_path / "b")]) == 0
  assert not [w for w in got if "is not used" in str(w.message)]


@pytest.mark.parametrize(
  ("text", "expected"),
  [
    ("a=1,b=0.9,c=true,d=none,name=x", {"a": 1, "b": 0.9, "c": True, "d": None, "name": "x"}),
    ("hidden_sizes=(64,32),dropout=0.1", {"hidden_sizes": (64, 32), "dropout": 0.1}),
    ("l=[1,[2,3]],m={'k':1,'j':2}", {"l": [1, [2, 3]], "m": {"k": 1, "j": 2}}),
    ("name='a,b',n=2", {"name": "a,b", "n": 2}),
  ],
)
def test_kv_pairs_keeps_commas_inside_brackets_and_quotes(text, expected):
  """--model-args hidden_sizes=(64,32) split the tuple at its comma ("expected key=value
  pairs, got '32)'")."""
  from jaxscope.run.config import kv_pairs

  assert kv_pairs(text) == expected


def test_out_that_cannot_be_created_is_exit_74(tmp_path, capsys):
  """--out below a file (or under /proc) cannot be created: the output is unwritable (74),
  not a missing input (2)."""
  (tmp_path / "file").write_text("x")
  out = tmp_path / "file" / "run"
  with pytest.raises(SystemExit) as e:
    main(["train", "--steps", "1", "--out", str(out), "--quiet", "--no-plots"])
  assert e.value.code == 74
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and f"cannot write {out}" in err[0] and "cannot be created" in err[0]
