"""Readers for the dataset file formats, with checks that refuse anything malformed.

* IDX (MNIST, Fashion-MNIST): gzip'ed big-endian header, magic 0x00000803 (images) or
  0x00000801 (labels), then the counts; the payload must have exactly the declared size.
* CIFAR-10 python pickles (``data_batch_1..5``, ``test_batch``; in the official tarball or an
  extracted ``cifar-10-batches-py/``): ``data`` (10000, 3072) uint8 in CHW row order, ``labels``.
* CIFAR-10 ``cifar10.npz``: uint8 ``x_train`` (N,32,32,3) HWC, ``y_train``, ``x_test``, ``y_test``.
"""

from __future__ import annotations

import gzip
import io
import pickle
import struct
import tarfile
import zipfile
import zlib
from pathlib import Path

import numpy as np

from creditlab.errors import DataError

IDX_IMAGES, IDX_LABELS = 2051, 2049
CIFAR_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_TEST_BATCH = "test_batch"


def read_idx(path: Path, magic: int, count: int | None = None) -> np.ndarray:
    """Images (N, rows, cols) or labels (N,) as uint8 from an IDX .gz file."""
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: cannot decompress ({e}); the file is truncated or corrupted, download it again") from None
    return parse_idx(raw, magic, count, str(path))


def parse_idx(raw: bytes, magic: int, count: int | None, where: str) -> np.ndarray:
    if len(raw) < 8:
        raise DataError(f"{where}: too short for an IDX header ({len(raw)} bytes)")
    got = struct.unpack(">I", raw[:4])[0]
    if got != magic:
        raise DataError(f"{where}: bad magic number {got:#010x}, expected {magic:#010x} "
                        f"({'images' if magic == IDX_IMAGES else 'labels'} IDX file)")
    ndim = raw[3]
    dims = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    if count is not None and dims[0] != count:
        raise DataError(f"{where}: holds {dims[0]} items, expected {count}")
    size = int(np.prod(dims))
    payload = raw[4 + 4 * ndim:]
    if len(payload) != size:
        raise DataError(f"{where}: payload has {len(payload)} bytes, header declares {size} (truncated?)")
    return np.frombuffer(payload, dtype=np.uint8).reshape(dims)


def _unpickle(data: bytes, where: str) -> dict:
    try:
        d = pickle.loads(data, encoding="bytes")
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a bad file
        raise DataError(f"{where}: not a CIFAR-10 python batch ({e})") from None
    d = {(k.decode() if isinstance(k, bytes) else k): v for k, v in d.items()}
    if "data" not in d or "labels" not in d:
        raise DataError(f"{where}: CIFAR-10 batch without 'data'/'labels' keys")
    x = np.asarray(d["data"], dtype=np.uint8)
    y = np.asarray(d["labels"], dtype=np.int64)
    if x.ndim != 2 or x.shape[1] != 3072 or len(y) != x.shape[0]:
        raise DataError(f"{where}: data of shape {x.shape} with {len(y)} labels; expected (N, 3072) and N labels")
    if y.size and (y.min() < 0 or y.max() > 9):
        raise DataError(f"{where}: labels outside 0..9")
    return {"x": x.reshape(-1, 3, 32, 32), "y": y}


def read_cifar_batches(source: Path) -> dict[str, np.ndarray]:
    """From the official tarball or an extracted ``cifar-10-batches-py`` folder: NCHW uint8."""
    blobs: dict[str, bytes] = {}
    wanted = CIFAR_TRAIN_BATCHES + (CIFAR_TEST_BATCH,)
    if source.is_dir():
        for name in wanted:
            p = source / name
            if not p.is_file():
                raise DataError(f"{source}: missing {name}; expected the extracted cifar-10-batches-py folder")
            blobs[name] = p.read_bytes()
    else:
        try:
            with tarfile.open(source, "r:gz") as tar:
                for member in tar.getmembers():
                    base = member.name.rsplit("/", 1)[-1]
                    if base in wanted and member.isfile():
                        blobs[base] = tar.extractfile(member).read()  # type: ignore[union-attr]
        except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
            raise DataError(f"{source}: cannot read the tarball ({e}); download it again") from None
        lost = [n for n in wanted if n not in blobs]
        if lost:
            raise DataError(f"{source}: tarball lacks {', '.join(lost)}")
    train = [_unpickle(blobs[n], f"{source}:{n}") for n in CIFAR_TRAIN_BATCHES]
    test = _unpickle(blobs[CIFAR_TEST_BATCH], f"{source}:{CIFAR_TEST_BATCH}")
    return {
        "x_train": np.concatenate([b["x"] for b in train]), "y_train": np.concatenate([b["y"] for b in train]),
        "x_test": test["x"], "y_test": test["y"],
    }


def read_cifar_npz(path: Path, expect_train: int | None = 50000, expect_test: int | None = 10000) -> dict[str, np.ndarray]:
    """``cifar10.npz`` (HWC uint8) -> NCHW uint8 arrays, with shape/dtype/count checks."""
    try:
        with np.load(path) as z:
            arrays = {k: z[k] for k in ("x_train", "y_train", "x_test", "y_test")}
    except KeyError as e:
        raise DataError(f"{path}: missing array {e}; expected x_train, y_train, x_test, y_test") from None
    except (OSError, ValueError, zlib.error, EOFError, zipfile.BadZipFile, pickle.UnpicklingError) as e:
        raise DataError(f"{path}: cannot read ({e}); the file is truncated or corrupted") from None
    for split, n in (("train", expect_train), ("test", expect_test)):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.dtype != np.uint8 or x.ndim != 4 or x.shape[1:] != (32, 32, 3):
            raise DataError(f"{path}: x_{split} is {x.dtype} {x.shape}; expected uint8 (N, 32, 32, 3)")
        if y.shape != (x.shape[0],):
            raise DataError(f"{path}: y_{split} has shape {y.shape}, expected ({x.shape[0]},)")
        if n is not None and x.shape[0] != n:
            raise DataError(f"{path}: x_{split} holds {x.shape[0]} images, expected {n}")
        if y.size and (int(y.min()) < 0 or int(y.max()) > 9):
            raise DataError(f"{path}: y_{split} has labels outside 0..9")
        arrays[f"x_{split}"] = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
        arrays[f"y_{split}"] = y.astype(np.int64)
    return arrays


def write_cifar_batch(path: Path, x_nchw: np.ndarray, y: np.ndarray) -> None:
    """Write one batch in the official python-pickle layout (used by tests and tools)."""
    d = {b"batch_label": b"creditlab", b"labels": [int(v) for v in y],
         b"data": x_nchw.reshape(len(x_nchw), -1).astype(np.uint8), b"filenames": [b"x.png"] * len(y)}
    path.write_bytes(pickle.dumps(d, protocol=2))


def write_idx_gz(path: Path, arr: np.ndarray, magic: int) -> None:
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in arr.shape)
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0) as g:
        g.write(header + arr.astype(np.uint8).tobytes())
    path.write_bytes(buf.getvalue())
