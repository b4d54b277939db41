"""Test-session setup: threads per pytest-xdist worker, a cold compile cache of the session's
own, shared fixtures."""

import atexit
import os
import shutil
import tempfile
from pathlib import Path

# Workers x threads = cores: each of pytest-xdist's workers (and every process a test starts,
# which inherits the variable) computes on its share of the cores; oversubscribed OpenMP threads
# spin and slow everything down.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
THREADS = max(1, (os.cpu_count() or 1) // _WORKERS)
os.environ["OMP_NUM_THREADS"] = str(THREADS)
# Every session compiles from a cold cache of its own: a warm cache left on the machine by
# earlier runs must not hide what a first compile does (issue 29's false dynamic-defense flag).
_CACHE = tempfile.mkdtemp(prefix="advgkl-inductor-")
os.environ["TORCHINDUCTOR_CACHE_DIR"] = _CACHE
atexit.register(shutil.rmtree, _CACHE, True)

import pytest  # noqa: E402  (after the environment above, which torch reads at import)
import torch  # noqa: E402

torch.set_num_threads(THREADS)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def float64():
    """Run the test with float64 as the default dtype."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(before)


@pytest.fixture(scope="session")
def tree(tmp_path_factory):
    """An ImageNet-format tree of generated JPEGs (tests/trees.py), shared by the session."""
    from trees import imagenet_tree

    root = tmp_path_factory.mktemp("imagenet")
    imagenet_tree(root, n_val=8)
    return root


def shared_folder(tmp_path_factory, name: str, build) -> Path:
    """A folder `build(path)` fills once per test session, shared by every pytest-xdist worker
    (the first to ask builds it under a file lock, the others wait for it or find it done);
    tests only read it."""
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent                      # the session's folder, above each worker's
    path = root / "shared" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{path}.lock"):
        if not (path / ".done").exists():
            shutil.rmtree(path, ignore_errors=True)
            build(path)
            (path / ".done").touch()
    return path


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """The demo (GKL on the digits, configs/demo/digits_gkl.yaml) trained once per session,
    shared by the tests that need a robust model."""
    from advgkl.config import load_config
    from advgkl.training.loop import train

    demo = Path(__file__).parent.parent / "configs" / "demo" / "digits_gkl.yaml"
    return shared_folder(tmp_path_factory, "demo",
                         lambda path: train(load_config(demo), path / "gkl", echo=False)) / "gkl"
