"""Data loaders: real files read correctly, anything corrupted, truncated or missing refused
with a message naming the file, downloads verified, the CIFAR-10 pickle layout read."""

import functools
import gzip
import http.server
import shutil
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from creditlab.data import augment_batch, batch_indices, files, load_dataset
from creditlab.data.readers import (IDX_IMAGES, IDX_LABELS, parse_idx, read_cifar_batches, read_cifar_npz,
                                    write_cifar_batch, write_idx_gz)
from creditlab.errors import ConfigError, DataError


# ---------------------------------------------------------------- real files
def test_mnist_reads_the_official_files_with_fixed_validation_split(data_root, monkeypatch):
    monkeypatch.delenv("CREDITLAB_DATA", raising=False)
    d = load_dataset("mnist", data_dir=data_root, allow_download=False)
    assert d.x_train.shape == (50000, 1, 28, 28) and d.x_val.shape == (10000, 1, 28, 28)
    assert d.x_test.shape == (10000, 1, 28, 28)
    assert d.y_train[:5].tolist() == [5, 0, 4, 1, 9] and d.y_test[:5].tolist() == [7, 2, 1, 0, 4]
    assert float(d.x_train.min()) == 0.0 and float(d.x_train.max()) == 1.0
    full = load_dataset("mnist", data_dir=data_root, val_size=0, allow_download=False)
    assert torch.equal(full.x_train[-10000:], d.x_val)  # the validation split is the tail


def test_fashion_mnist_reads_the_official_files(data_root):
    d = load_dataset("fashion-mnist", allow_download=False)
    assert d.x_train.shape == (50000, 1, 28, 28)
    assert d.y_train[:3].tolist() == [9, 0, 0]


def test_cifar10_npz_is_read_in_canonical_order(data_root):
    d = load_dataset("cifar10", allow_download=False)
    assert d.x_train.shape == (45000, 3, 32, 32) and d.x_val.shape == (5000, 3, 32, 32)
    assert d.x_test.shape == (10000, 3, 32, 32)
    assert d.y_train[:10].tolist() == [6, 9, 9, 4, 1, 1, 2, 7, 8, 3]
    assert d.y_test[:10].tolist() == [3, 8, 8, 0, 6, 6, 1, 6, 3, 1]
    means = d.x_train.mean(dim=(0, 2, 3))
    assert abs(float(means[0]) - 0.4914) < 0.005  # red channel first (RGB, CHW)


def test_mnist_mini_is_the_first_images_of_real_mnist(data_root):
    mini = load_dataset("mnist-mini")
    full = load_dataset("mnist", val_size=0, allow_download=False)
    assert mini.x_train.shape == (8000, 1, 28, 28) and mini.x_val.shape == (2000, 1, 28, 28)
    assert torch.equal(mini.x_train, full.x_train[:8000]) and torch.equal(mini.x_val, full.x_train[8000:10000])
    assert torch.equal(mini.x_test, full.x_test[:2000]) and torch.equal(mini.y_test, full.y_test[:2000])


# ---------------------------------------------------------------- corrupted input
def _copy_mnist(src: Path, dest: Path) -> Path:
    dest.mkdir(parents=True)
    for spec in files.MNIST_FILES:
        shutil.copy(src / "mnist" / spec.name, dest / spec.name)
    return dest


def test_truncated_file_is_refused_naming_it(data_root, tmp_path, monkeypatch):
    monkeypatch.delenv("CREDITLAB_DATA", raising=False)
    d = _copy_mnist(data_root, tmp_path / "mnist")
    bad = d / "train-labels-idx1-ubyte.gz"
    bad.write_bytes(bad.read_bytes()[:1000])
    with pytest.raises(DataError, match="train-labels-idx1-ubyte.gz.*md5.*truncated"):
        load_dataset("mnist", data_dir=tmp_path, allow_download=False)


def test_file_with_wrong_md5_is_refused(data_root, tmp_path, monkeypatch):
    monkeypatch.delenv("CREDITLAB_DATA", raising=False)
    d = _copy_mnist(data_root, tmp_path / "mnist")
    raw = bytearray((d / "t10k-labels-idx1-ubyte.gz").read_bytes())
    raw[-20] ^= 0xFF
    (d / "t10k-labels-idx1-ubyte.gz").write_bytes(bytes(raw))
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.gz: md5 .* does not match the published ec29112d"):
        load_dataset("mnist", data_dir=tmp_path, allow_download=False)


def test_idx_with_bad_magic_wrong_count_or_short_payload_is_refused():
    arr = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    header = lambda magic, dims: magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in dims)  # noqa: E731
    good = header(IDX_IMAGES, (2, 3, 3)) + arr.tobytes()
    assert np.array_equal(parse_idx(good, IDX_IMAGES, 2, "x"), arr)
    with pytest.raises(DataError, match="bad magic"):
        parse_idx(good, IDX_LABELS, 2, "x")
    with pytest.raises(DataError, match="holds 2 items, expected 60000"):
        parse_idx(good, IDX_IMAGES, 60000, "x")
    with pytest.raises(DataError, match="payload"):
        parse_idx(good[:-1], IDX_IMAGES, 2, "x")


def test_corrupted_cifar_npz_is_refused(tmp_path):
    p = tmp_path / "cifar10.npz"
    np.savez(p, x_train=np.zeros((4, 32, 32, 3), np.uint8), y_train=np.zeros(4, np.uint8),
             x_test=np.zeros((2, 32, 32), np.uint8), y_test=np.zeros(2, np.uint8))
    with pytest.raises(DataError, match="x_test is uint8 .* expected uint8 \\(N, 32, 32, 3\\)"):
        read_cifar_npz(p, None, None)
    p.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(DataError, match="cifar10.npz"):
        read_cifar_npz(p)


# ---------------------------------------------------------------- CIFAR-10 pickle layout
def _tiny_cifar(root: Path, n: int = 4) -> dict:
    rng = np.random.default_rng(0)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    xs, ys = [], []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        x = rng.integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)
        y = rng.integers(0, 10, size=n)
        write_cifar_batch(folder / name, x, y)
        xs.append(x)
        ys.append(y)
    return {"x_train": np.concatenate(xs[:5]), "y_train": np.concatenate(ys[:5]), "x_test": xs[5], "y_test": ys[5]}


def test_cifar_pickle_folder_and_tarball_read_the_official_layout(tmp_path):
    truth = _tiny_cifar(tmp_path)
    got = read_cifar_batches(tmp_path / "cifar-10-batches-py")
    for k in truth:
        assert np.array_equal(got[k], truth[k]), k
    tarball = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(tarball, "w:gz") as tar:
        tar.add(tmp_path / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    got = read_cifar_batches(tarball)
    assert np.array_equal(got["x_train"], truth["x_train"])
    # the npz layout (HWC) of the same images reads to the same tensors
    np.savez(tmp_path / "c.npz", x_train=truth["x_train"].transpose(0, 2, 3, 1), y_train=truth["y_train"],
             x_test=truth["x_test"].transpose(0, 2, 3, 1), y_test=truth["y_test"])
    assert np.array_equal(read_cifar_npz(tmp_path / "c.npz", None, None)["x_train"], truth["x_train"])


def test_cifar10_loads_from_an_extracted_folder(tmp_path, monkeypatch):
    monkeypatch.delenv("CREDITLAB_DATA", raising=False)
    truth = _tiny_cifar(tmp_path / "cifar10")
    d = load_dataset("cifar10", data_dir=tmp_path, val_size=5, allow_download=False)
    assert d.x_train.shape == (15, 3, 32, 32) and d.x_val.shape == (5, 3, 32, 32)
    assert torch.equal(d.x_test, torch.from_numpy(truth["x_test"]).float() / 255)


def test_truncated_cifar_batch_is_refused(tmp_path):
    _tiny_cifar(tmp_path)
    p = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    p.write_bytes(p.read_bytes()[:100])
    with pytest.raises(DataError, match="data_batch_3"):
        read_cifar_batches(tmp_path / "cifar-10-batches-py")


# ---------------------------------------------------------------- download
class _Server:
    def __init__(self, folder: Path):
        handler = functools.partial(_QuietHandler, directory=str(folder))
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_missing_files_are_downloaded_verified_and_cached(data_root, tmp_path, monkeypatch):
    monkeypatch.delenv("CREDITLAB_DATA", raising=False)
    server = _Server(data_root / "mnist")
    try:
        monkeypatch.setitem(files.MIRRORS, "mnist", (server.url,))
        d = load_dataset("mnist")
    finally:
        server.close()
    assert d.y_train[:3].tolist() == [5, 0, 4]
    cached = files.cache_root() / "mnist"
    assert sorted(p.name for p in cached.iterdir()) == sorted(s.name for s in files.MNIST_FILES)


def test_download_of_a_wrong_file_is_refused_and_not_kept(tmp_path, monkeypatch):
    monkeypatch.delenv("CREDITLAB_DATA", raising=False)
    fake = tmp_path / "served"
    fake.mkdir()
    for spec in files.MNIST_FILES:
        (fake / spec.name).write_bytes(gzip.compress(b"not mnist"))
    server = _Server(fake)
    try:
        monkeypatch.setitem(files.MIRRORS, "mnist", (server.url,))
        with pytest.raises(DataError, match="md5 .* does not match the published"):
            load_dataset("mnist")
    finally:
        server.close()
    assert not list((files.cache_root() / "mnist").glob("*idx*"))


def test_missing_data_without_network_names_files_md5s_and_folder(tmp_path, monkeypatch):
    monkeypatch.delenv("CREDITLAB_DATA", raising=False)
    monkeypatch.setitem(files.MIRRORS, "fashion-mnist", ("http://127.0.0.1:9/",))  # nothing listens there
    with pytest.raises(DataError) as e:
        load_dataset("fashion-mnist", data_dir=tmp_path / "empty")
    msg = str(e.value)
    for spec in files.FASHION_FILES:
        assert spec.name in msg and spec.md5 in msg
    assert str(files.cache_root() / "fashion-mnist") in msg and "download failed" in msg


def test_generated_idx_files_round_trip(tmp_path):
    x = np.arange(3 * 28 * 28, dtype=np.uint8).reshape(3, 28, 28)
    write_idx_gz(tmp_path / "a.gz", x, IDX_IMAGES)
    from creditlab.data.readers import read_idx

    assert np.array_equal(read_idx(tmp_path / "a.gz", IDX_IMAGES, 3), x)


# ---------------------------------------------------------------- batching
def test_batches_are_a_seeded_permutation_covering_every_sample():
    a = batch_indices(100, 32, seed=3, epoch=2)
    b = batch_indices(100, 32, seed=3, epoch=2)
    assert all(torch.equal(i, j) for i, j in zip(a, b))
    assert sorted(torch.cat(a).tolist()) == list(range(100)) and [len(i) for i in a] == [32, 32, 32, 4]
    assert not torch.equal(torch.cat(a), torch.cat(batch_indices(100, 32, seed=3, epoch=3)))


def test_augmentation_crops_and_flips_reproducibly():
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    assert torch.equal(augment_batch(x, 0, "none"), x)
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    a, b = augment_batch(x, 2, "vertical", g1), augment_batch(x, 2, "vertical", g2)
    assert torch.equal(a, b) and a.shape == x.shape
    # every output row is a (possibly shifted, zero-filled) input row or zeros
    flipped = augment_batch(x, 0, "vertical", torch.Generator().manual_seed(0))
    for i in range(2):
        assert torch.equal(flipped[i], x[i]) or torch.equal(flipped[i], x[i].flip(1))
    with pytest.raises(ConfigError, match="flip"):
        augment_batch(x, 0, "diagonal")


def test_unknown_dataset_is_refused_listing_the_valid_ones():
    with pytest.raises(ConfigError, match="mnist, fashion-mnist, cifar10"):
        load_dataset("imagenet")
