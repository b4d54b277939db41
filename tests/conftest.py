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
