"""Dataset files: the official names and published md5 checksums, where to look for them,
verification, and download with a progress bar.

Resolution order for dataset ``name``: ``data_dir`` (the ``--data-dir`` option), then
``$CREDITLAB_DATA/<name>/``, then the user cache ``$XDG_CACHE_HOME/creditlab/<name>/``
(default ``~/.cache/creditlab/<name>/``). Missing files are downloaded into the cache, their
md5 verified before use; a file with the wrong checksum is never read.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from creditlab.errors import DataError


@dataclass(frozen=True)
class FileSpec:
    name: str
    md5: str
    size: int | None = None


MNIST_FILES = (
    FileSpec("train-images-idx3-ubyte.gz", "f68b3c2dcbeaaa9fbdd348bbdeb94873", 9912422),
    FileSpec("train-labels-idx1-ubyte.gz", "d53e105ee54ea40749a09fcbcd1e9432", 28881),
    FileSpec("t10k-images-idx3-ubyte.gz", "9fb629c4189551a2d022fa330f9573f3", 1648877),
    FileSpec("t10k-labels-idx1-ubyte.gz", "ec29112dd5afa0611ce80d1b7f02629c", 4542),
)
FASHION_FILES = (
    FileSpec("train-images-idx3-ubyte.gz", "8d4fb7e6c68d591d4c3dfef9ec88bf0d", 26421880),
    FileSpec("train-labels-idx1-ubyte.gz", "25c81989df183df01b3e8a0aad5dffbe", 29515),
    FileSpec("t10k-images-idx3-ubyte.gz", "bef4ecab320f06d8554ea6380940ec79", 4422102),
    FileSpec("t10k-labels-idx1-ubyte.gz", "bb300cfdad3c16e7a12a480ee83cd310", 5148),
)
CIFAR10_TARBALL = FileSpec("cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a", 170498071)
CIFAR100_TARBALL = FileSpec("cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85", 169001437)

MIRRORS: dict[str, tuple[str, ...]] = {
    "mnist": (
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "https://storage.googleapis.com/cvdf-datasets/mnist/",
    ),
    "fashion-mnist": ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
    "cifar10": ("https://www.cs.toronto.edu/~kriz/",),
    "cifar100": ("https://www.cs.toronto.edu/~kriz/",),
}


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "creditlab"


def candidate_dirs(name: str, data_dir: str | os.PathLike | None) -> list[Path]:
    """Folders searched for dataset ``name``, in order."""
    dirs: list[Path] = []
    if data_dir:
        d = Path(data_dir)
        dirs += [d / name, d] if (d / name).is_dir() else [d]
    env = os.environ.get("CREDITLAB_DATA")
    if env:
        dirs.append(Path(env) / name)
    dirs.append(cache_root() / name)
    return dirs


def md5sum(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def verify(path: Path, spec: FileSpec) -> None:
    """Raise DataError unless ``path`` has the published md5."""
    got = md5sum(path)
    if got != spec.md5:
        size = path.stat().st_size
        hint = f" (expected {spec.size} bytes: truncated?)" if spec.size and size != spec.size else ""
        raise DataError(
            f"{path}: md5 {got} does not match the published {spec.md5}{hint}. The file is corrupted, "
            f"truncated or not the official {spec.name}; delete it and download it again."
        )


def find_file(name: str, spec: FileSpec, data_dir) -> Path | None:
    for d in candidate_dirs(name, data_dir):
        p = d / spec.name
        if p.is_file():
            return p
    return None


def download(url: str, dest: Path, spec: FileSpec, timeout: float = 30.0) -> Path:
    """Fetch ``url`` to ``dest`` atomically with a tqdm progress bar, verify the md5."""
    from tqdm import tqdm

    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{spec.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
            total = int(resp.headers.get("Content-Length") or 0) or spec.size
            with tqdm(total=total, unit="B", unit_scale=True, desc=spec.name, leave=False) as bar:
                while True:
                    block = resp.read(1 << 16)
                    if not block:
                        break
                    out.write(block)
                    bar.update(len(block))
        verify(Path(tmp), spec)
        os.replace(tmp, dest)
        return dest
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def ensure_files(name: str, specs: tuple[FileSpec, ...], data_dir=None, allow_download: bool = True) -> list[Path]:
    """Locate (or download into the cache) and verify every file of dataset ``name``."""
    paths: list[Path] = []
    missing: list[FileSpec] = []
    for spec in specs:
        p = find_file(name, spec, data_dir)
        if p is None:
            missing.append(spec)
        paths.append(p)  # type: ignore[arg-type]
    if missing:
        target = cache_root() / name
        errors: list[str] = []
        if allow_download:
            for spec in missing:
                for mirror in MIRRORS.get(name, ()):
                    try:
                        download(mirror + spec.name, target / spec.name, spec)
                        break
                    except (urllib.error.URLError, OSError, TimeoutError) as e:
                        errors.append(f"{mirror}{spec.name}: {e}")
                    except DataError as e:
                        errors.append(str(e))
        still = [s for s in missing if not (target / s.name).is_file()]
        if still:
            searched = ", ".join(str(d) for d in candidate_dirs(name, data_dir))
            listing = "\n".join(f"  {s.name}  md5 {s.md5}" for s in still)
            why = ("\ndownload failed:\n  " + "\n  ".join(errors[-4:])) if errors else ""
            raise DataError(
                f"dataset {name!r}: missing file(s)\n{listing}\nsearched: {searched}{why}\n"
                f"Put the official files in {target} (or in a folder given by --data-dir or "
                f"$CREDITLAB_DATA/{name}/)."
            )
        paths = [p if p is not None else target / s.name for p, s in zip(paths, specs)]
    for p, spec in zip(paths, specs):
        verify(p, spec)
    return paths
