"""Shared fixtures (the data-directory default lives in the root conftest.py)."""

import pytest


@pytest.fixture(scope="session")
def mnist_test():
    from microcnn.datasets import load_mnist

    return load_mnist("test", download=False)


@pytest.fixture(scope="session")
def mnist_train():
    from microcnn.datasets import load_mnist

    return load_mnist("train", download=False)


@pytest.fixture(scope="session")
def bundled():
    import microcnn

    return microcnn.lenet(weights="bundled")


@pytest.fixture()
def isolated_datasets(tmp_path, monkeypatch):
    """No real env var, cwd, cache or system folder leaks into a test; the decode cache starts empty."""
    from microcnn import datasets

    monkeypatch.delenv("MICROCNN_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    monkeypatch.setattr(datasets, "SYSTEM_DIRS", {"mnist": (), "fashion-mnist": ()})
    datasets.clear_cache()
    yield
    datasets.clear_cache()
