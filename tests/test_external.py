"""Models and datasets of the user's own, named ``module:attribute`` (jaxscope.models.external)."""

from __future__ import annotations

import textwrap

import jax
import numpy as np
import pytest

from jaxscope import data, models
from jaxscope.cli import main as cli_main
from jaxscope.run import load_run
from jaxscope.train import train

USER_MODULE = textwrap.dedent(
  """
  import flax.linen as nn
  import jax.numpy as jnp
  import numpy as np
  from jaxscope.data import Dataset
  from jaxscope.models import build

  class Net(nn.Module):
    hidden: int
    classes: int

    @nn.compact
    def __call__(self, x, train=False):
      x = x.reshape((x.shape[0], -1))
      return nn.Dense(self.classes, name="out")(nn.relu(nn.Dense(self.hidden, name="fc")(x)))

  def make(input_shape, num_classes, hidden=8):
    return Net(hidden, num_classes)

  class TokenStack(nn.Module):
    vocab: int
    input_dtype = jnp.int32  # token ids

    @nn.compact
    def __call__(self, x, train=False):
      h = nn.Embed(self.vocab, 8, name="embed")(x)

      class Block(nn.Module):
        @nn.compact
        def __call__(self, h, _):
          init = nn.with_partitioning(nn.initializers.lecun_normal(), ("embed", "mlp"))
          return h + nn.Dense(8, kernel_init=init, name="fc")(h), None

      stack = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True},
                      length=2, metadata_params={nn.PARTITION_NAME: "layers"})
      h, _ = stack(name="blocks")(h, None)
      return nn.Dense(self.vocab, name="head")(h)

  def make_lm(input_shape, num_classes):
    return TokenStack(num_classes)

  def zoo_mlp(input_shape, num_classes):
    return build("mlp", input_shape, num_classes)

  def not_a_model(input_shape, num_classes):
    return 3

  def load(n_train=96, n_test=40, seed=0):
    r = np.random.default_rng(seed)
    w = r.normal(size=(4, 3))
    x = r.normal(size=(n_train + n_test, 4)).astype(np.float32)
    y = np.argmax(x @ w, 1).astype(np.int32)
    return Dataset(x[:n_train], y[:n_train], x[n_train:], y[n_train:], 3, "user-blobs")

  def load_bad():
    return {"x": 1}
  """
)


@pytest.fixture
def user_module(tmp_path, monkeypatch):
  (tmp_path / "my_jaxscope_user.py").write_text(USER_MODULE)
  monkeypatch.syspath_prepend(str(tmp_path))
  return "my_jaxscope_user"


def test_a_users_linen_module_builds_and_applies(user_module):
  m = models.build(f"{user_module}:make", (4,), 3, hidden=5)
  assert m.name == f"{user_module}:make" and not m.has_batch_stats
  x = np.random.default_rng(1).normal(size=(2, 4)).astype(np.float32)
  variables = m.init(jax.random.key(0), x)
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["params"])
  want = np.maximum(x @ p["fc"]["kernel"] + p["fc"]["bias"], 0) @ p["out"]["kernel"]
  want = want + p["out"]["bias"]
  out, state = m.apply(variables, x, train=True, rng=jax.random.key(1))
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)
  assert state == {} and p["fc"]["kernel"].shape == (4, 5)
  # A factory returning a ModelDef is used as it is.
  assert models.build(f"{user_module}:zoo_mlp", (4,), 3).name == "mlp"


def test_a_users_token_model_with_a_scanned_stack(user_module):
  from jaxscope.train.measure import stacked_of

  m = models.build(f"{user_module}:make_lm", (5,), 11)
  x = np.arange(10).reshape(2, 5) % 11
  variables = m.init(jax.random.key(0), x)
  out, _ = m.apply(variables, x, train=False)
  assert out.shape == (2, 5, 11) and variables["params"]["blocks"]["fc"]["kernel"].shape == (
    2,
    8,
    8,
  )
  assert stacked_of(m) == {"^blocks/fc/kernel$": 0}


def test_a_users_dataset_loads(user_module):
  ds = data.load(f"{user_module}:load", n_train=50, seed=3)
  assert ds.train_x.shape == (50, 4) and ds.test_x.shape == (40, 4) and ds.num_classes == 3


def test_bad_specs_say_what_is_wrong(user_module):
  with pytest.raises(ValueError, match="cannot import module 'no_such_module_xyz'"):
    models.build("no_such_module_xyz:make", (4,), 3)
  with pytest.raises(ValueError, match="has no attribute 'missing'"):
    models.build(f"{user_module}:missing", (4,), 3)
  with pytest.raises(ValueError, match="returned int; expected"):
    models.build(f"{user_module}:not_a_model", (4,), 3)
  with pytest.raises(ValueError, match="expected 'module:attribute'"):
    models.build(":make", (4,), 3)
  with pytest.raises(ValueError, match=r"without \['train_x'"):
    data.load(f"{user_module}:load_bad")
  with pytest.raises(TypeError):
    models.build(f"{user_module}:make", (4,), 3, depth=2)


def test_train_and_load_run_with_a_users_model_and_data(user_module, tmp_path):
  out = tmp_path / "run"
  r = train(
    model=f"{user_module}:make",
    dataset=f"{user_module}:load",
    model_args={"hidden": 6},
    steps=6,
    batch_size=16,
    optimizer="sgd",
    lr=0.1,
    metrics="economy",
    out=str(out),
    quiet=True,
  )
  assert r.steps == 6
  with load_run(out) as run:
    assert run.config["model"] == f"{user_module}:make" and run.config["input_shape"] == [4]
    assert run.dataset.name == "user-blobs"
    final = run.checkpoints.restore(6)
    x = run.dataset.test_x
    logits, _ = run.model.apply({"params": final.params}, x, train=False)
    loss = -np.mean(np.take_along_axis(jax.nn.log_softmax(logits), run.dataset.test_y[:, None], 1))
    np.testing.assert_allclose(loss, r.final_eval["test/loss"], rtol=1e-5)
    assert "cockpit/grad_norm/fc/kernel" in run.history.keys()  # the instruments' topic
  rc = cli_main(
    [
      "train",
      "--model",
      f"{user_module}:make",
      "--dataset",
      f"{user_module}:load",
      "--steps",
      "3",
      "--metrics",
      "none",
      "--out",
      str(tmp_path / "cli"),
      "--no-plots",
      "-q",
    ]
  )
  assert rc == 0 and (tmp_path / "cli" / "checkpoints").is_dir()
