"""Build src/creditlab/data/mnist_mini.npz from the official MNIST files: the first 10,000
training images and the first 2,000 test images, uint8, compressed. Prints its md5, which
goes into creditlab.data.MNIST_MINI_MD5.

    CREDITLAB_DATA=../shared/data python scripts/make_mnist_mini.py
"""

import hashlib
from pathlib import Path

import numpy as np

from creditlab.data import files
from creditlab.data.readers import IDX_IMAGES, IDX_LABELS, read_idx

p = files.ensure_files("mnist", files.MNIST_FILES, None, allow_download=True)
out = Path(__file__).resolve().parents[1] / "src" / "creditlab" / "data" / "mnist_mini.npz"
np.savez_compressed(
    out,
    x_train=read_idx(p[0], IDX_IMAGES, 60000)[:10000],
    y_train=read_idx(p[1], IDX_LABELS, 60000)[:10000],
    x_test=read_idx(p[2], IDX_IMAGES, 10000)[:2000],
    y_test=read_idx(p[3], IDX_LABELS, 10000)[:2000],
)
print(out, out.stat().st_size, hashlib.md5(out.read_bytes()).hexdigest())
