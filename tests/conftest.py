from pathlib import Path

import pytest
import torch


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


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """The demo (GKL on the digits, configs/demo/digits_gkl.yaml) trained once, shared by the
    tests that need a robust model."""
    from advgkl.config import load_config
    from advgkl.train import train

    run = tmp_path_factory.mktemp("demo") / "gkl"
    train(load_config(Path(__file__).parent.parent / "configs" / "demo" / "digits_gkl.yaml"),
          run, echo=False)
    return run
