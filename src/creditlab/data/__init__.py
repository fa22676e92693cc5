"""Datasets as in-memory tensors, with a fixed validation split, seeded batching and seeded
augmentation.

Names: ``mnist``, ``fashion-mnist`` (IDX gz files), ``cifar10`` (``cifar10.npz``, the
official ``cifar-10-python.tar.gz`` or its extracted ``cifar-10-batches-py/``), ``cifar100``
(``cifar-100-python.tar.gz`` or ``cifar-100-python/``, fine labels), ``mnist-mini``
(a real MNIST subset shipped in the package) and ``fake`` (small synthetic data for tests:
``fake:n=512,classes=10,shape=1x8x8``).

Validation split: the *last* ``val_size`` training images (default 10,000 for MNIST and
Fashion-MNIST, 5,000 for CIFAR-10, 2,000 for mnist-mini), fixed, never shuffled into training;
the test set is only ever evaluated, never used to select anything.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import Tensor

from creditlab.data import files
from creditlab.data.readers import (CIFAR_TEST_BATCH, CIFAR_TRAIN_BATCHES, IDX_IMAGES, IDX_LABELS, read_cifar100,
                                    read_cifar_batches, read_cifar_npz, read_idx)
from creditlab.errors import ConfigError, DataError
from creditlab.spec import check_options, parse_spec

DATASETS = ("mnist", "fashion-mnist", "cifar10", "cifar100", "mnist-mini", "fake")
DEFAULT_VAL = {"mnist": 10000, "fashion-mnist": 10000, "cifar10": 5000, "cifar100": 5000, "mnist-mini": 2000,
               "fake": 0.2}
MNIST_MINI_FILE = "mnist_mini.npz"
MNIST_MINI_MD5 = "8e832fdbc5feebaeaf0490e85765854b"  # md5 of the shipped file (scripts/make_mnist_mini.py)


@dataclass
class Dataset:
    """Float images in [0, 1] (N, C, H, W) and int64 labels, split into train/val/test.

    ``provenance``: the files the data was read from, file name -> md5 (hex) of its bytes, as
    verified against the published checksum (MNIST, Fashion-MNIST, the CIFAR tarballs) or the
    shipped one (``mnist_mini.npz``), or computed on reading where none is published
    (``cifar10.npz``, extracted folders: ``provenance_verified`` is then False); the fake
    dataset has ``{"generated": <its spec string>}`` (and ``provenance_verified`` None)."""

    name: str
    x_train: Tensor
    y_train: Tensor
    x_val: Tensor
    y_val: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int
    provenance: dict[str, str] = field(default_factory=dict)
    provenance_verified: bool | None = None

    @property
    def in_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    @property
    def in_features(self) -> int:
        return int(np.prod(self.in_shape))

    def split(self, which: str) -> tuple[Tensor, Tensor]:
        if which not in ("train", "val", "test"):
            raise ConfigError(f"unknown split {which!r}; valid: train, val, test")
        return getattr(self, f"x_{which}"), getattr(self, f"y_{which}")

    def to(self, device, dtype: torch.dtype | None = None) -> "Dataset":
        """Move every split to ``device`` (once, before training: batches are then cut on the
        device) and, with ``dtype``, convert the images."""
        for k in ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test"):
            t = getattr(self, k)
            setattr(self, k, t.to(device=device, dtype=dtype if dtype is not None and k.startswith("x") else t.dtype))
        return self


def _to_float(x: np.ndarray) -> Tensor:
    return torch.from_numpy(np.array(x, dtype=np.uint8)).float().div_(255.0)


def _make(name: str, x_tr: np.ndarray, y_tr: np.ndarray, x_te: np.ndarray, y_te: np.ndarray,
          val_size: int | float, num_classes: int) -> Dataset:
    n = len(x_tr)
    n_val = int(round(val_size * n)) if isinstance(val_size, float) and val_size < 1 else int(val_size)
    if not 0 <= n_val < n:
        raise ConfigError(f"val_size={val_size} must be between 0 and the {n} training images")
    xt, yt = _to_float(x_tr), torch.from_numpy(y_tr.astype(np.int64))
    cut = n - n_val
    return Dataset(name, xt[:cut], yt[:cut], xt[cut:], yt[cut:], _to_float(x_te),
                   torch.from_numpy(y_te.astype(np.int64)), num_classes)


def _load_idx_set(name: str, specs, data_dir, allow_download: bool):
    p = files.ensure_files(name, specs, data_dir, allow_download)
    x_tr = read_idx(p[0], IDX_IMAGES, 60000)[:, None]
    y_tr = read_idx(p[1], IDX_LABELS, 60000)
    x_te = read_idx(p[2], IDX_IMAGES, 10000)[:, None]
    y_te = read_idx(p[3], IDX_LABELS, 10000)
    return x_tr, y_tr, x_te, y_te


def _computed(paths: list[Path]) -> tuple[dict[str, str], bool]:
    """Provenance of files without a published checksum: the md5 of each, computed here."""
    return {p.name: files.md5sum(p) for p in paths}, False


def _published(specs) -> tuple[dict[str, str], bool]:
    """Provenance of files verified against their published md5 (ensure_files did)."""
    return {s.name: s.md5 for s in specs}, True


def _load_cifar10(data_dir, allow_download: bool):
    """The CIFAR-10 arrays and their provenance (see :class:`Dataset`)."""
    for d in files.candidate_dirs("cifar10", data_dir):
        if (d / "cifar10.npz").is_file():
            a = read_cifar_npz(d / "cifar10.npz")
            return (a["x_train"], a["y_train"], a["x_test"], a["y_test"]), _computed([d / "cifar10.npz"])
        if (d / "cifar-10-batches-py").is_dir():
            a = read_cifar_batches(d / "cifar-10-batches-py")
            names = (*CIFAR_TRAIN_BATCHES, CIFAR_TEST_BATCH)
            return (a["x_train"], a["y_train"], a["x_test"], a["y_test"]), \
                _computed([d / "cifar-10-batches-py" / n for n in names])
        if (d / files.CIFAR10_TARBALL.name).is_file():
            break
    (tarball,) = files.ensure_files("cifar10", (files.CIFAR10_TARBALL,), data_dir, allow_download)
    a = read_cifar_batches(tarball)
    return (a["x_train"], a["y_train"], a["x_test"], a["y_test"]), _published((files.CIFAR10_TARBALL,))


def _load_cifar100(data_dir, allow_download: bool):
    """The CIFAR-100 arrays and their provenance (see :class:`Dataset`)."""
    for d in files.candidate_dirs("cifar100", data_dir):
        if (d / "cifar-100-python").is_dir():
            a = read_cifar100(d / "cifar-100-python")
            return (a["x_train"], a["y_train"], a["x_test"], a["y_test"]), \
                _computed([d / "cifar-100-python" / n for n in ("train", "test")])
    (tarball,) = files.ensure_files("cifar100", (files.CIFAR100_TARBALL,), data_dir, allow_download)
    a = read_cifar100(tarball)
    return (a["x_train"], a["y_train"], a["x_test"], a["y_test"]), _published((files.CIFAR100_TARBALL,))


def mnist_mini_path() -> Path:
    return Path(str(resources.files("creditlab.data").joinpath(MNIST_MINI_FILE)))


def _load_mnist_mini():
    path = mnist_mini_path()
    if not path.is_file():
        raise DataError(f"{path}: the bundled mnist-mini file is missing; reinstall creditlab")
    digest = hashlib.md5(path.read_bytes()).hexdigest()
    if digest != MNIST_MINI_MD5:
        raise DataError(f"{path}: md5 {digest} does not match the shipped {MNIST_MINI_MD5}; reinstall creditlab")
    with np.load(path) as z:
        return z["x_train"][:, None], z["y_train"], z["x_test"][:, None], z["y_test"]


def _load_fake(options: dict):
    o = check_options("dataset", "fake", options, {"n": 512, "classes": 10, "shape": "1x8x8", "seed": 0, "test": 256})
    shape = tuple(int(s) for s in str(o["shape"]).split("x"))
    g = np.random.default_rng(o["seed"])
    protos = g.uniform(0, 255, size=(o["classes"],) + shape)

    def draw(n):
        y = g.integers(0, o["classes"], size=n)
        x = np.clip(protos[y] + g.normal(0, 40, size=(n,) + shape), 0, 255).astype(np.uint8)
        return x, y

    x_tr, y_tr = draw(o["n"])
    x_te, y_te = draw(o["test"])
    return x_tr, y_tr, x_te, y_te, o["classes"]


def load_dataset(name: str, data_dir=None, val_size: int | float | None = None,
                 allow_download: bool = True) -> Dataset:
    """Load ``name`` (see the module docstring) into memory; errors name the offending file."""
    base, opts = parse_spec(name)
    classes = 10
    provenance: tuple[dict[str, str], bool | None]
    if base == "mnist":
        arrays = _load_idx_set("mnist", files.MNIST_FILES, data_dir, allow_download)
        provenance = _published(files.MNIST_FILES)
    elif base == "fashion-mnist":
        arrays = _load_idx_set("fashion-mnist", files.FASHION_FILES, data_dir, allow_download)
        provenance = _published(files.FASHION_FILES)
    elif base == "cifar10":
        arrays, provenance = _load_cifar10(data_dir, allow_download)
    elif base == "cifar100":
        (arrays, provenance), classes = _load_cifar100(data_dir, allow_download), 100
    elif base == "mnist-mini":
        arrays = _load_mnist_mini()
        provenance = {MNIST_MINI_FILE: MNIST_MINI_MD5}, True
    elif base == "fake":
        *arrays, classes = _load_fake(opts)  # type: ignore[assignment]
        provenance = {"generated": name}, None
    else:
        raise ConfigError(f"unknown dataset {name!r}; valid: {', '.join(DATASETS)}")
    if opts and base != "fake":
        raise ConfigError(f"dataset {base!r} takes no options (got {opts})")
    val = DEFAULT_VAL[base] if val_size is None else val_size
    data = _make(base, *arrays, val_size=val, num_classes=classes)  # type: ignore[misc]
    data.provenance, data.provenance_verified = provenance
    return data


# ---------------------------------------------------------------------------------------
# batching and augmentation
# ---------------------------------------------------------------------------------------
def epoch_generator(seed: int, epoch: int, salt: int = 0, device="cpu") -> torch.Generator:
    """A generator determined by (seed, epoch, salt) alone, so a resumed run redraws the same."""
    g = torch.Generator(device=device)
    g.manual_seed((int(seed) * 1_000_003 + int(epoch) * 7919 + int(salt) * 104729) % (2**63 - 1))
    return g


def batch_indices(n: int, batch_size: int, seed: int, epoch: int, shuffle: bool = True,
                  device: torch.device | str = "cpu") -> list[Tensor]:
    """The epoch's minibatches as index tensors on ``device`` (the last one may be smaller). The
    order is drawn on the CPU generator, so it is the same on every device and every rank."""
    if batch_size <= 0:
        raise ConfigError(f"batch_size must be positive, got {batch_size}")
    order = torch.randperm(n, generator=epoch_generator(seed, epoch)) if shuffle else torch.arange(n)
    return list(order.to(device).split(batch_size))


def augment_batch(x: Tensor, crop_pad: int = 0, flip: str = "none", generator: torch.Generator | None = None) -> Tensor:
    """Random crops of the zero-padded images (``crop_pad`` pixels each side, crop back to the
    original size) and random flips (``vertical``: upside-down, ``horizontal``: mirror), each
    sample independently with probability 1/2 for the flip. A generator on the data's device
    (the training loop passes one) keeps every draw there."""
    if flip not in ("none", "vertical", "horizontal", "both"):
        raise ConfigError(f"augment flip={flip!r}; valid: none, vertical, horizontal, both")
    B, C, H, W = x.shape
    gdev = generator.device if generator is not None else x.device  # draws on the generator's device
    if crop_pad > 0:
        xp = torch.nn.functional.pad(x, (crop_pad,) * 4)
        oy = torch.randint(0, 2 * crop_pad + 1, (B,), generator=generator, device=gdev).to(x.device)
        ox = torch.randint(0, 2 * crop_pad + 1, (B,), generator=generator, device=gdev).to(x.device)
        rows = (oy[:, None] + torch.arange(H, device=x.device)[None]).view(B, 1, H, 1).expand(B, C, H, W + 2 * crop_pad)
        xp = xp.gather(2, rows)
        cols = (ox[:, None] + torch.arange(W, device=x.device)[None]).view(B, 1, 1, W).expand(B, C, H, W)
        x = xp.gather(3, cols)
    for kind, dim in (("vertical", 2), ("horizontal", 3)):
        if flip in (kind, "both"):
            mask = (torch.rand(B, generator=generator, device=gdev) < 0.5).to(x.device).view(B, 1, 1, 1)
            x = torch.where(mask, x.flip(dim), x)
    return x


def iterate(x: Tensor, y: Tensor, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
    for i in range(0, len(x), batch_size):
        yield x[i:i + batch_size], y[i:i + batch_size]


__all__ = ["Dataset", "DATASETS", "load_dataset", "batch_indices", "augment_batch", "epoch_generator", "iterate"]
