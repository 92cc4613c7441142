"""The datasets (embedded, generated and file-based), the registry and the batch iterator."""

from __future__ import annotations

import gzip
import pickle
import struct

import numpy as np
import pytest
from sklearn.datasets import load_digits as sk_load_digits

from jaxscope.data import (
  batches,
  describe,
  embedded,
  load,
  load_cifar10,
  load_cifar100,
  load_digits,
  load_mnist,
  load_mnist1d,
  load_sine,
  names,
  read_idx,
)
from jaxscope.data.cifar import CIFAR10_FILES
from jaxscope.data.mnist1d import (
  corr_noise,
  interpolate,
  mnist1d_templates,
  pad,
  shear,
  translate,
)


def test_digits_split_is_stratified_deterministic_and_complete():
  d = load_digits(test_fraction=0.2, seed=3)
  assert d.train_x.shape[1:] == (8, 8, 1) and d.train_x.dtype == np.float32
  assert len(d.train_x) + len(d.test_x) == 1797
  assert 0.0 <= d.train_x.min() and d.train_x.max() <= 1.0
  # Every image appears exactly once across the split (compare with sklearn's raw data).
  raw = sk_load_digits()
  both = np.concatenate([d.train_x, d.test_x])[..., 0] * 16.0
  assert sorted(map(bytes, both.astype(np.uint8))) == sorted(
    map(bytes, raw.images.astype(np.uint8))
  )
  counts = np.bincount(d.test_y, minlength=10)
  np.testing.assert_allclose(counts / np.bincount(raw.target), 0.2, atol=0.01)
  d2 = load_digits(test_fraction=0.2, seed=3)
  np.testing.assert_array_equal(d.train_y, d2.train_y)
  with pytest.raises(ValueError, match="test_fraction"):
    load_digits(test_fraction=1.0)


def test_batches_cover_an_epoch():
  x = np.arange(10)[:, None].astype(np.float32)
  y = np.arange(10)
  got = list(batches(x, y, 3, seed=0))
  assert [len(b[1]) for b in got] == [3, 3, 3]
  assert len(set(np.concatenate([b[1] for b in got]))) == 9
  tail = list(batches(x, y, 3, seed=None, drop_last=False))
  assert [b[1].tolist() for b in tail] == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]
  with pytest.raises(ValueError, match="x has 10"):
    list(batches(x, y[:5], 2))


# --------------------------------------------------------------------------------------------
# Registry


def test_registry_names_describe_embedded_and_errors(tmp_path):
  assert names() == [
    "cifar10", "cifar100", "digits", "fashion_mnist", "mnist", "mnist1d", "shakespeare", "sine"
  ]  # fmt: skip
  for n in names():
    line = describe(n)
    assert line.endswith(".") and "\n" not in line and "x [n, " in line
  assert [n for n in names() if embedded(n)] == ["digits", "mnist1d", "shakespeare", "sine"]
  assert "train-images-idx3-ubyte" in describe("mnist") and "--data-dir" in describe("mnist")
  assert "cifar-10-batches-py" in describe("cifar10")
  assert "no files" in describe("MNIST1D")
  assert embedded("Fashion-MNIST") is False
  with pytest.raises(ValueError, match=r"Unknown dataset 'imagenet'.*cifar10.*sine"):
    load("imagenet")
  with pytest.raises(ValueError, match="Unknown dataset"):
    describe("nope")
  for n in ("mnist", "fashion_mnist", "cifar10", "cifar100"):
    with pytest.raises(ValueError, match="--data-dir"):
      load(n)
  with pytest.raises(ValueError, match="train-labels-idx1-ubyte"):
    load("mnist")
  with pytest.raises(TypeError, match="noise_level"):
    load("sine", noise_level=0.1)


def test_registry_dispatches_seed_and_kwargs():
  d = load("DIGITS", seed=3, test_fraction=0.2)
  ref = load_digits(test_fraction=0.2, seed=3)
  np.testing.assert_array_equal(d.train_y, ref.train_y)
  assert d.task == "classification"
  s = load("sine", seed=5, num_train=10, num_test=3)
  np.testing.assert_array_equal(s.train_x, load_sine(10, 3, seed=5).train_x)
  m = load("mnist1d", num_samples=100)  # seed None -> the benchmark's 42
  np.testing.assert_array_equal(m.train_x, load_mnist1d(num_samples=100, seed=42).train_x)


# --------------------------------------------------------------------------------------------
# Sine


def test_sine_is_exact_regression_data():
  d = load_sine(seed=1)
  assert d.train_x.shape == (4000, 1) and d.train_y.shape == (4000, 1)
  assert d.test_x.shape == (1000, 1) and d.test_y.shape == (1000, 1)
  assert d.task == "regression" and d.num_classes == 1 and d.name == "sine"
  for a in d[:4]:
    assert a.dtype == np.float32
  np.testing.assert_array_equal(d.train_y, np.sin(d.train_x))
  np.testing.assert_array_equal(d.test_y, np.sin(d.test_x))
  x = np.concatenate([d.train_x, d.test_x])
  bound = np.float32(2 * np.pi)
  assert -bound <= x.min() < -6.2 and 6.2 < x.max() <= bound
  np.testing.assert_array_equal(load_sine(seed=1).train_x, d.train_x)
  assert not np.array_equal(load_sine(seed=2).train_x, d.train_x)
  noisy = load_sine(seed=1, noise_std=0.1)
  resid = noisy.train_y - np.sin(noisy.train_x).astype(np.float64)
  assert 0.09 < resid.std() < 0.11
  np.testing.assert_array_equal(noisy.test_y, np.sin(noisy.test_x))
  with pytest.raises(ValueError, match="noise_std"):
    load_sine(noise_std=-1.0)


# --------------------------------------------------------------------------------------------
# MNIST-1D


def test_mnist1d_transform_steps_on_hand_computed_examples():
  np.testing.assert_array_equal(pad(np.array([1.0, 2.0]), 3), [1, 2, 0, 0, 0])
  np.testing.assert_array_equal(pad(np.ones((2, 1)), 1), [[1, 0], [1, 0]])
  # [0, 1, 0] on {0, .5, 1} read at {0, .25, .5, .75, 1}.
  np.testing.assert_allclose(interpolate(np.array([0.0, 1.0, 0.0]), 5), [0, 0.5, 1, 0.5, 0])
  # [0, 3] read at {0, 1/3, 2/3, 1} (downsampling 4 -> 3 and upsampling both work on rows).
  np.testing.assert_allclose(interpolate(np.array([[0.0, 3.0]]), 4), [[0, 1, 2, 3]])
  np.testing.assert_allclose(interpolate(np.array([0.0, 1.0, 4.0, 9.0]), 3), [0, 2.5, 9])
  rng = np.random.default_rng(0)
  rows = rng.normal(size=(3, 17))
  for r in rows:  # the same as numpy's 1-D interpolation, row by row
    np.testing.assert_array_equal(
      interpolate(r[None], 40)[0], np.interp(np.linspace(0, 1, 40), np.linspace(0, 1, 17), r)
    )
  np.testing.assert_array_equal(translate(np.array([1, 2, 3, 4]), 1), [4, 1, 2, 3])
  np.testing.assert_array_equal(translate(np.array([1, 2, 3, 4]), 0), [1, 2, 3, 4])
  np.testing.assert_array_equal(
    translate(np.array([[1, 2, 3], [1, 2, 3]]), np.array([2, 3])), [[2, 3, 1], [1, 2, 3]]
  )
  # shear subtracts coeff * linspace(-1/2, 1/2, L).
  np.testing.assert_allclose(shear(np.zeros((1, 3)), np.array([1.0])), [[0.5, 0, -0.5]])
  np.testing.assert_allclose(shear(np.array([1.0, 1.0, 1.0, 1.0, 1.0]), 2.0), [2, 1.5, 1, 0.5, 0])
  # A delta in the middle, smoothed with sigma 2, is the normalised Gaussian kernel
  # exp(-t²/8) truncated at |t| <= 4 sigma = 8.
  delta = np.zeros(41)
  delta[20] = 1.0
  t = np.arange(-8, 9)
  kernel = np.exp(-(t**2) / 8.0)
  expected = np.zeros(41)
  expected[12:29] = kernel / kernel.sum()
  np.testing.assert_allclose(corr_noise(delta), expected, atol=1e-15)


def test_mnist1d_templates():
  x, t = mnist1d_templates()
  assert x.shape == (10, 12) and t.shape == (12,)
  np.testing.assert_allclose(x[:, 0], 0.0)
  np.testing.assert_allclose(x.std(1), 1 / 6)
  np.testing.assert_allclose(t, np.linspace(-5, 5, 12) / 6)
  d0 = np.array([5, 6, 6.5, 6.75, 7, 7, 7, 7, 6.75, 6.5, 6, 5])
  z = (d0 - d0.mean()) / d0.std()
  np.testing.assert_allclose(x[0], (z - z[0]) / 6)


@pytest.fixture(scope="module")
def mnist1d_default():
  return load_mnist1d()


def test_mnist1d_matches_reference_generator(mnist1d_default):
  d = mnist1d_default
  assert d.train_x.shape == (4000, 40, 1) and d.test_x.shape == (1000, 40, 1)
  assert d.train_x.dtype == np.float32 and d.train_y.dtype == np.int32
  assert d.num_classes == 10 and d.name == "mnist1d" and d.task == "classification"
  # Values printed by the reference (pip package mnist1d 0.0.2.post1, make_dataset() with
  # its default arguments): the first and last labels and a few signal values.
  assert d.train_y[:20].tolist() == [2, 6, 4, 5, 6, 6, 6, 0, 3, 1, 6, 9, 4, 3, 4, 5, 1, 9, 0, 3]
  assert d.test_y[-10:].tolist() == [8, 3, 3, 6, 1, 2, 5, 9, 6, 4]
  np.testing.assert_allclose(
    d.train_x[0, :5, 0],
    [-0.33200566736939013, -0.4719103656557236, -0.778697076293495, -1.0097408265367045,
     -0.8823525654053073],
    rtol=1e-6,
  )  # fmt: skip
  np.testing.assert_allclose(
    d.test_x[-1, -5:, 0],
    [-0.09864609258520207, 0.4472328851428726, 0.6598756470890784, 0.8777343497528006,
     1.1931518368352758],
    rtol=1e-6,
  )  # fmt: skip
  assert np.bincount(d.train_y, minlength=10).tolist() == [
    398, 396, 411, 394, 394, 402, 401, 404, 402, 398
  ]  # fmt: skip
  both = np.concatenate([d.train_x, d.test_x])
  np.testing.assert_allclose([both.mean(), both.std()], [0.0, 1.0], atol=1e-5)


def test_mnist1d_determinism_and_seed(mnist1d_default):
  again = load_mnist1d()
  for a, b in zip(again[:4], mnist1d_default[:4], strict=True):
    np.testing.assert_array_equal(a, b)
  other = load_mnist1d(seed=0, num_samples=500)
  assert other.train_x.shape == (400, 40, 1) and other.test_x.shape == (100, 40, 1)
  assert not np.array_equal(other.train_x, load_mnist1d(seed=1, num_samples=500).train_x)
  labels = np.concatenate([other.train_y, other.test_y])
  assert np.bincount(labels).tolist() == [50] * 10  # num_samples // 10 per class
  raw = load_mnist1d(num_samples=100, standardize=False, final_seq_length=25, train_split=0.5)
  assert raw.train_x.shape == (50, 25, 1)
  with pytest.raises(ValueError, match="train_split"):
    load_mnist1d(train_split=1.0)


def test_mnist1d_against_installed_reference_when_available():
  ref = pytest.importorskip("mnist1d.data")
  args = ref.get_dataset_args()
  args.num_samples, args.seed = 300, 7
  r = ref.make_dataset(args)
  d = load_mnist1d(num_samples=300, seed=7)
  np.testing.assert_array_equal(d.train_y, r["y"])
  np.testing.assert_array_equal(d.train_x[..., 0], r["x"].astype(np.float32))
  np.testing.assert_array_equal(d.test_x[..., 0], r["x_test"].astype(np.float32))


# --------------------------------------------------------------------------------------------
# MNIST / Fashion-MNIST (IDX)


def _idx_bytes(array, magic):
  array = np.asarray(array, np.uint8)
  header = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape)
  return header + array.tobytes()


def _write(path, data, compress):
  path.parent.mkdir(parents=True, exist_ok=True)
  if compress:
    with gzip.open(path.with_name(path.name + ".gz"), "wb") as f:
      f.write(data)
  else:
    path.write_bytes(data)


def _write_idx_set(directory, *, compress, n_train=5, n_test=3, seed=0):
  rng = np.random.default_rng(seed)
  arrays = {
    "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
    "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
    "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
    "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
  }
  arrays["train-images-idx3-ubyte"][0, 0, :2] = [0, 255]
  for name, a in arrays.items():
    _write(directory / name, _idx_bytes(a, 0x803 if a.ndim == 3 else 0x801), compress)
  return arrays


@pytest.mark.parametrize("compress", [False, True])
def test_mnist_idx_files_load(tmp_path, compress):
  a = _write_idx_set(tmp_path, compress=compress)
  d = load("mnist", tmp_path)
  assert d.train_x.shape == (5, 28, 28, 1) and d.test_x.shape == (3, 28, 28, 1)
  assert d.train_x.dtype == np.float32 and d.train_y.dtype == np.int32
  np.testing.assert_allclose(d.train_x[..., 0], a["train-images-idx3-ubyte"] / 255.0, rtol=1e-6)
  np.testing.assert_allclose(d.test_x[..., 0], a["t10k-images-idx3-ubyte"] / 255.0, rtol=1e-6)
  assert d.train_x[0, 0, 0, 0] == 0.0 and d.train_x[0, 0, 1, 0] == 1.0
  np.testing.assert_array_equal(d.train_y, a["train-labels-idx1-ubyte"])
  np.testing.assert_array_equal(d.test_y, a["t10k-labels-idx1-ubyte"])
  assert d.num_classes == 10 and d.name == "mnist" and d.task == "classification"


def test_fashion_mnist_in_torchvision_layout(tmp_path):
  a = _write_idx_set(tmp_path / "FashionMNIST" / "raw", compress=True, seed=1)
  d = load("fashion_mnist", tmp_path)
  np.testing.assert_allclose(d.test_x[..., 0], a["t10k-images-idx3-ubyte"] / 255.0, rtol=1e-6)
  np.testing.assert_array_equal(d.train_y, a["train-labels-idx1-ubyte"])
  assert d.name == "fashion_mnist"
  # MNIST/raw is searched for mnist, but not FashionMNIST/raw.
  with pytest.raises(FileNotFoundError, match="MNIST"):
    load_mnist(tmp_path)
  b = _write_idx_set(tmp_path / "MNIST" / "raw", compress=False, seed=2)
  np.testing.assert_array_equal(load_mnist(tmp_path).train_y, b["train-labels-idx1-ubyte"])
  # The dataset's own directories come before data_dir itself (both use the same file names).
  _write_idx_set(tmp_path, compress=False, n_train=4, seed=3)
  assert len(load("fashion_mnist", tmp_path).train_y) == 5
  assert len(load("mnist", tmp_path).train_y) == 5
  assert len(load("mnist", tmp_path / "MNIST" / "raw").train_y) == 5


def test_read_idx_header_and_dtypes(tmp_path):
  p = tmp_path / "x.idx"
  p.write_bytes(
    struct.pack(">I", 0x00000C02) + struct.pack(">2I", 2, 3) + struct.pack(">6i", *range(-3, 3))
  )
  got = read_idx(p)
  assert got.shape == (2, 3) and got.dtype == np.int32
  np.testing.assert_array_equal(got, np.arange(-3, 3).reshape(2, 3))


def test_idx_errors_name_the_file(tmp_path):
  a = _write_idx_set(tmp_path, compress=False)
  images = tmp_path / "train-images-idx3-ubyte"
  good = images.read_bytes()
  # Truncated: the header promises 5*784 pixels.
  images.write_bytes(good[:-100])
  expected, actual = 16 + 5 * 784, 16 + 5 * 784 - 100
  with pytest.raises(ValueError, match=rf"train-images-idx3-ubyte.*{expected} bytes, got {actual}"):
    load("mnist", tmp_path)
  # Wrong magic (labels magic on an images file).
  images.write_bytes(struct.pack(">I", 0x801) + good[4:])
  with pytest.raises(ValueError, match=r"train-images-idx3-ubyte: wrong magic number 0x00000801"):
    load("mnist", tmp_path)
  images.write_bytes(b"\x12\x34" + good[2:])
  with pytest.raises(ValueError, match="train-images-idx3-ubyte: not an IDX file"):
    load("mnist", tmp_path)
  images.write_bytes(good)
  # Label/image count mismatch.
  (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(_idx_bytes(np.zeros(2, np.uint8), 0x801))
  with pytest.raises(ValueError, match=r"t10k-labels-idx1-ubyte: 2 labels but .* 3 images"):
    load("mnist", tmp_path)
  (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(_idx_bytes(a["t10k-labels-idx1-ubyte"], 0x801))
  # A truncated gzip stream is a ValueError naming the file too.
  (tmp_path / "train-labels-idx1-ubyte").unlink()
  gz = gzip.compress(_idx_bytes(a["train-labels-idx1-ubyte"], 0x801))
  (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(gz[:-10])
  with pytest.raises(ValueError, match=r"train-labels-idx1-ubyte\.gz"):
    load("mnist", tmp_path)


def test_idx_missing_files_say_where(tmp_path):
  with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte") as info:
    load("mnist", tmp_path)
  msg = str(info.value)
  for d in (tmp_path, tmp_path / "MNIST" / "raw", tmp_path / "mnist"):
    assert f"\n  {d}\n" in msg + "\n"
  _write_idx_set(tmp_path, compress=False)
  (tmp_path / "t10k-images-idx3-ubyte").unlink()
  with pytest.raises(FileNotFoundError, match=r"lacks \['t10k-images-idx3-ubyte'\]"):
    load("mnist", tmp_path)
  with pytest.raises(FileNotFoundError, match="FashionMNIST"):
    load("fashion_mnist", tmp_path / "does-not-exist")


# --------------------------------------------------------------------------------------------
# CIFAR


def _cifar_batch(n, label_keys, seed):
  rng = np.random.default_rng(seed)
  batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"batch_label": b"x"}
  for key, classes in label_keys.items():
    batch[key] = rng.integers(0, classes, n).tolist()
  return batch


def _dump(path, obj):
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, "wb") as f:
    pickle.dump(obj, f)


def test_cifar10_batches_to_nhwc(tmp_path):
  root = tmp_path / "cifar-10-batches-py"
  batches_ = [_cifar_batch(2, {b"labels": 10}, i) for i in range(6)]
  # Image 1 of batch 3 (training index 2*2 + 1 = 5): pixel (row 4, col 7) gets R,G,B = 10,20,30.
  data = batches_[2][b"data"]
  for ch, v in enumerate((10, 20, 30)):
    data[1, ch * 1024 + 4 * 32 + 7] = v
  for name, b in zip(CIFAR10_FILES, batches_, strict=True):
    _dump(root / name, b)
  d = load("cifar10", tmp_path)
  assert d.train_x.shape == (10, 32, 32, 3) and d.test_x.shape == (2, 32, 32, 3)
  assert d.train_x.dtype == np.float32 and d.train_y.dtype == np.int32
  np.testing.assert_allclose(d.train_x[5, 4, 7], np.array([10, 20, 30]) / 255.0, rtol=1e-6)
  assert d.train_y.tolist() == [y for b in batches_[:5] for y in b[b"labels"]]
  assert d.test_y.tolist() == batches_[5][b"labels"]
  # Every pixel: x[i, r, c, ch] == data[i, ch*1024 + r*32 + c] / 255.
  t = batches_[5][b"data"]
  i, r, c, ch = np.meshgrid(range(2), range(32), range(32), range(3), indexing="ij")
  np.testing.assert_allclose(d.test_x, t[i, ch * 1024 + r * 32 + c] / 255.0, rtol=1e-6)
  # The files may also sit directly in data_dir.
  np.testing.assert_array_equal(load_cifar10(root).test_y, d.test_y)


def test_cifar100_fine_and_coarse(tmp_path):
  root = tmp_path / "cifar-100-python"
  train = _cifar_batch(4, {b"fine_labels": 100, b"coarse_labels": 20}, 0)
  test = _cifar_batch(3, {b"fine_labels": 100, b"coarse_labels": 20}, 1)
  test[b"data"][2, [0, 1024, 2048]] = [255, 128, 1]  # pixel (0, 0) of test image 2
  _dump(root / "train", train)
  _dump(root / "test", test)
  fine = load("cifar100", tmp_path)
  assert fine.num_classes == 100 and fine.train_y.tolist() == train[b"fine_labels"]
  np.testing.assert_allclose(fine.test_x[2, 0, 0], np.array([255, 128, 1]) / 255.0, rtol=1e-6)
  coarse = load("cifar100", tmp_path, label_mode="coarse")
  assert coarse.num_classes == 20 and coarse.test_y.tolist() == test[b"coarse_labels"]
  with pytest.raises(ValueError, match="label_mode"):
    load_cifar100(tmp_path, label_mode="medium")


def test_cifar_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"(?s)cifar-10-batches-py.data_batch_1.*test_batch"):
    load("cifar10", tmp_path)
  with pytest.raises(FileNotFoundError, match=r"cifar-100-python.train"):
    load("cifar100", tmp_path)
  root = tmp_path / "cifar-100-python"
  good = _cifar_batch(3, {b"fine_labels": 100, b"coarse_labels": 20}, 0)
  _dump(root / "test", good)
  _dump(root / "train", {**good, b"data": good[b"data"][:, :3000]})
  with pytest.raises(ValueError, match=r"train: b'data' must be N×3072.*\(3, 3000\)"):
    load("cifar100", tmp_path)
  _dump(root / "train", {**good, b"fine_labels": good[b"fine_labels"][:2]})
  with pytest.raises(ValueError, match=r"train: b'fine_labels' must hold one label per image"):
    load("cifar100", tmp_path)
  _dump(root / "train", {b"data": good[b"data"]})
  with pytest.raises(ValueError, match=r"train: missing key b'fine_labels'"):
    load("cifar100", tmp_path)
  _dump(root / "train", [1, 2])
  with pytest.raises(ValueError, match="expected a pickled dict"):
    load("cifar100", tmp_path)
