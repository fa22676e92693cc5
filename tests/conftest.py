import os
from pathlib import Path

import pytest

from tests.threads import one_thread


def shared_data() -> Path | None:
    """The real dataset folder ($CREDITLAB_DATA), or None."""
    env = os.environ.get("CREDITLAB_DATA")
    return Path(env) if env and Path(env).is_dir() else None


@pytest.fixture
def data_root() -> Path:
    """Tests on the real files need $CREDITLAB_DATA (CI sets it, and CREDITLAB_REQUIRE_DATA=1
    turns its absence into a failure there instead of a skip)."""
    root = shared_data()
    if root is None:
        if os.environ.get("CREDITLAB_REQUIRE_DATA"):
            pytest.fail("CREDITLAB_DATA is not set to the dataset folder")
        pytest.skip("set CREDITLAB_DATA to a folder with mnist/, fashion-mnist/, cifar10/ to run this test")
    return root


@pytest.fixture(autouse=True)
def _isolate(tmp_path, monkeypatch):
    """No test writes into the user's cache or downloads anything by accident; one torch thread
    (intra-op threading only adds contention for these small nets on 2 cores)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    with one_thread():
        yield
