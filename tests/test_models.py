"""Registry, RobustBench compatibility of our WideResNets, channels_last, and the export."""

import pytest
import torch

from advgkl.checkpoint import model_checkpoint
from advgkl.models import (CIFAR100_MEAN, CIFAR100_STD, CIFAR10_MEAN, CIFAR10_STD, create_model,
                           list_models)
from advgkl.models.robustbench import (export_for_robustbench, robustbench_constructor,
                                       robustbench_model)

TINY = ["wrn-10-1", "wrn-10-1-swish", "small-cnn"]


def randomize(model, seed=0):
    """Random weights and BN statistics, so equal outputs mean equal computations."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.copy_(torch.rand(t.shape, generator=g) * 0.5 + 0.5 if t.dim() == 1
                        else torch.randn(t.shape, generator=g) * 0.1)
    return model.eval()


def images(n=4, size=32):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(1))


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="unknown model 'resnet-50'; valid: .*wrn-34-10"):
        create_model("resnet-50", 10)
    assert {"wrn-34-10", "wrn-28-10-swish", "preact-resnet-18", "wrn-10-1"} <= set(list_models())


@pytest.mark.parametrize("name, kwargs, message", [
    ("wrn-11-1", {}, "depth: 11 is not 6n \\+ 4"),
    ("wrn-10-1", {"dropout": 0.3}, "wrn-10-1: bad keyword arguments \\['dropout'\\]"),
    ("small-cnn", {}, None),
])
def test_bad_arguments(name, kwargs, message):
    if message is None:
        with pytest.raises(ValueError, match="num_classes: 1 must be >= 2"):
            create_model(name, 1)
        return
    with pytest.raises(ValueError, match=message):
        create_model(name, 10, **kwargs)


@pytest.mark.parametrize("name", TINY + ["preact-resnet-18"])
def test_forward_shapes(name):
    assert create_model(name, 7).eval()(images(2)).shape == (2, 7)


@pytest.mark.parametrize("depth, width", [(10, 1), (16, 2)])
@pytest.mark.parametrize("classes", [10, 100])
def test_wrn_matches_robustbench_wide_resnet(depth, width, classes):
    ours = randomize(create_model(f"wrn-{depth}-{width}", classes))
    theirs = robustbench_model(f"wrn-{depth}-{width}", classes).eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    with torch.no_grad():
        assert torch.equal(ours(images()), theirs(images()))


@pytest.mark.parametrize("classes, mean, std", [(10, CIFAR10_MEAN, CIFAR10_STD),
                                                (100, CIFAR100_MEAN, CIFAR100_STD)])
def test_swish_wrn_matches_robustbench_dm_wide_resnet(classes, mean, std):
    from robustbench.model_zoo.architectures.dm_wide_resnet import DMWideResNet

    ours = randomize(create_model("wrn-16-2-swish", classes))
    theirs = DMWideResNet(num_classes=classes, depth=16, width=2, activation_fn=torch.nn.SiLU,
                          mean=mean, std=std).eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    assert "mean" not in ours.state_dict() and "std" not in ours.state_dict()
    with torch.no_grad():
        assert torch.equal(ours(images()), theirs(images()))


def test_swish_normalization_is_overridable():
    model = create_model("wrn-10-1-swish", 10, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    assert torch.equal(model.mean.flatten(), torch.tensor([0.5, 0.5, 0.5]))


@pytest.mark.parametrize("arch, classes", [("wrn-34-10", 10), ("wrn-28-10-swish", 10),
                                           ("wrn-70-16-swish", 100)])
def test_full_size_keys_and_shapes(arch, classes):
    with torch.device("meta"):  # shapes only: no memory, no forward
        ours = create_model(arch, classes).state_dict()
        theirs = robustbench_model(arch, classes).state_dict()
    assert [(k, v.shape) for k, v in ours.items()] == [(k, v.shape) for k, v in theirs.items()]


@pytest.mark.parametrize("name", TINY + ["preact-resnet-18"])
def test_channels_last_forward_matches(name):
    model = randomize(create_model(name, 10))
    x = images()
    with torch.no_grad():
        ref = model(x)
        model = model.to(memory_format=torch.channels_last)
        out = model(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch, classes", [("wrn-10-1", 100), ("wrn-10-1-swish", 10)])
def test_export_loads_into_robustbench_strictly(arch, classes):
    model = randomize(create_model(arch, classes))
    state = export_for_robustbench(model_checkpoint(model.state_dict(), arch=arch,
                                                    num_classes=classes))
    theirs = robustbench_model(arch, classes).eval()
    theirs.load_state_dict(state, strict=True)
    with torch.no_grad():
        assert torch.equal(theirs(images()), model(images()))


def test_constructor_text():
    assert robustbench_constructor("wrn-34-10", 100) == (
        "WideResNet(depth=34, widen_factor=10, num_classes=100, sub_block1=False)")
    assert robustbench_constructor("wrn-28-10-swish", 10) == (
        "DMWideResNet(num_classes=10, depth=28, width=10, activation_fn=nn.SiLU, "
        "mean=CIFAR10_MEAN, std=CIFAR10_STD)")
    with pytest.raises(ValueError, match="no RobustBench architecture"):
        robustbench_constructor("preact-resnet-18", 10)
