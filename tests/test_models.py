"""Registry, RobustBench compatibility of our WideResNets, channels_last, and the export."""

import pytest
import torch

from advgkl.checkpoint import model_checkpoint
from advgkl.models import (CIFAR10_MEAN, CIFAR10_STD, CIFAR100_MEAN, CIFAR100_STD, create_model,
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


# The students and LBGAT's natural model, against networks written out here from their
# description: post-activation BasicBlocks (conv-BN-ReLU-conv-BN, + shortcut, ReLU; a 1x1 conv +
# BN shortcut when the shape changes), stem 3x3/64 at stride 1, 2 blocks per stage at 64/128/256/
# 512, then a fixed average pool (4 for the kuangliu layout, 8 for LBGAT's ResNet18_cifar whose
# stages run at strides 1/1/2/2); MobileNetV2 (expand-depthwise-project blocks, residual at stride
# 1 only, (1,16,1,1) (6,24,2,1) (6,32,3,2) (6,64,4,2) (6,96,3,1) (6,160,3,2) (6,320,1,1), stem and
# head 1x1 to 1280, pool 4).

class DescribedBlock(torch.nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        nn = torch.nn
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                          nn.BatchNorm2d(cout))

    def forward(self, x):
        relu = torch.nn.functional.relu
        return relu(self.bn2(self.conv2(relu(self.bn1(self.conv1(x))))) + self.shortcut(x))


class DescribedResNet18(torch.nn.Module):
    def __init__(self, classes, strides, pool):
        super().__init__()
        nn = torch.nn
        self.pool = pool
        self.conv1, self.bn1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64)
        widths = [64, 64, 128, 256, 512]
        for i, stride in enumerate(strides):
            setattr(self, f"layer{i + 1}", nn.Sequential(
                DescribedBlock(widths[i], widths[i + 1], stride),
                DescribedBlock(widths[i + 1], widths[i + 1], 1)))
        self.linear = nn.Linear(512, classes)

    def forward(self, x):
        out = torch.nn.functional.relu(self.bn1(self.conv1(x)))
        for i in range(1, 5):
            out = getattr(self, f"layer{i}")(out)
        return self.linear(torch.nn.functional.avg_pool2d(out, self.pool).view(len(x), -1))


class DescribedMobileBlock(torch.nn.Module):
    def __init__(self, cin, cout, expansion, stride):
        super().__init__()
        nn, mid = torch.nn, expansion * cin
        self.stride = stride
        self.conv1, self.bn1 = nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3, self.bn3 = nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride == 1 and cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        relu = torch.nn.functional.relu
        out = self.bn3(self.conv3(relu(self.bn2(self.conv2(relu(self.bn1(self.conv1(x))))))))
        return out + self.shortcut(x) if self.stride == 1 else out


class DescribedMobileNetV2(torch.nn.Module):
    def __init__(self, classes):
        super().__init__()
        nn = torch.nn
        self.conv1, self.bn1 = nn.Conv2d(3, 32, 3, 1, 1, bias=False), nn.BatchNorm2d(32)
        blocks, cin = [], 32
        for expansion, cout, n, stride in ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2),
                                           (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                                           (6, 320, 1, 1)):
            for stride_i in [stride] + [1] * (n - 1):
                blocks.append(DescribedMobileBlock(cin, cout, expansion, stride_i))
                cin = cout
        self.layers = nn.Sequential(*blocks)
        self.conv2, self.bn2 = nn.Conv2d(320, 1280, 1, bias=False), nn.BatchNorm2d(1280)
        self.linear = nn.Linear(1280, classes)

    def forward(self, x):
        relu = torch.nn.functional.relu
        out = relu(self.bn2(self.conv2(self.layers(relu(self.bn1(self.conv1(x)))))))
        return self.linear(torch.nn.functional.avg_pool2d(out, 4).view(len(x), -1))


@pytest.mark.parametrize("name, described", [
    ("resnet-18", lambda c: DescribedResNet18(c, (1, 2, 2, 2), 4)),
    ("resnet-18-lbgat", lambda c: DescribedResNet18(c, (1, 1, 2, 2), 8)),
    ("mobilenet-v2", DescribedMobileNetV2),
])
@pytest.mark.parametrize("classes", [10, 100])
def test_students_and_lbgats_natural_model_equal_their_description(name, described, classes):
    ours, theirs = create_model(name, classes), described(classes)
    shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert shapes == {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    randomize(ours)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    theirs.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(images()), theirs(images()), rtol=1e-5, atol=1e-6)
    assert ours(images(2, 16)).shape == (2, classes)   # any input size (the digits: 16x16)
