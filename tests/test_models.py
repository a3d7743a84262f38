"""Network registry: every registered net gets a tiny forward/backward on CPU; ConvNet is
checked against a hand-written functional forward; vmap over stacked copies."""

from __future__ import annotations

import copy
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from ncfm_core.errors import ConfigError
from ncfm_core.models import create_network, default_depth, network_names, network_options, supported_options


def min_image_size(name: str) -> int:
    """Smallest image side a registered net accepts (fixed-depth ConvNets halve per block)."""
    match = re.fullmatch(r"convnet(\d)", name)
    return 2 ** int(match.group(1)) if match else 8


def has_batch_norm(net: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())


def images(batch: int, channels: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, channels, size, size, generator=torch.Generator().manual_seed(seed))


def test_registry_lists_the_expected_networks():
    expected = {"convnet", "convnet2", "convnet3", "convnet4", "convnet5", "convnet_bn",
                "alexnet", "vgg11", "vgg11_bn", "resnet18", "resnet18_bn"}
    assert expected <= set(network_names())
    assert network_names() == sorted(network_names())


@pytest.mark.parametrize("name", network_names())
# Both channel counts and both sizes, without the full product (the big nets are slow on CPU).
@pytest.mark.parametrize("channels,size", [(1, 16), (3, 32)])
def test_forward_backward_shapes_and_finite_grads(name, channels, size):
    if size < min_image_size(name):
        with pytest.raises(ConfigError, match="image"):
            create_network(name, in_channels=channels, num_classes=7, image_size=size)
        return
    net = create_network(name, in_channels=channels, num_classes=7, image_size=size)
    x = images(2, channels, size).requires_grad_(True)
    logits = net(x)
    assert logits.shape == (2, 7)
    feats = net.features(x)
    assert isinstance(net.feature_dim, int)
    assert feats.shape == (2, net.feature_dim)
    # The classifier is applied to exactly the features.
    torch.testing.assert_close(net.classifier(feats), logits)
    (logits.square().sum() + feats.sum()).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    for pname, param in net.named_parameters():
        assert param.grad is not None, f"{name}: {pname} got no gradient"
        assert torch.isfinite(param.grad).all(), f"{name}: {pname} has non-finite gradient"


def test_convnet3_on_cifar_has_2048_features():
    net = create_network("convnet", in_channels=3, num_classes=10, image_size=32)
    assert net.depth == 3 and net.feature_dim == 128 * 4 * 4 == 2048
    assert create_network("convnet3", in_channels=3, num_classes=10, image_size=32).feature_dim == 2048
    # Instance norm is GroupNorm with one group per channel, affine.
    norms = [m for m in net.modules() if isinstance(m, nn.GroupNorm)]
    assert len(norms) == 3 and all(m.num_groups == m.num_channels == 128 and m.affine for m in norms)
    assert not has_batch_norm(net)
    assert has_batch_norm(create_network("convnet_bn", in_channels=3, num_classes=10, image_size=32))


@pytest.mark.parametrize("size,depth", [(4, 1), (8, 1), (16, 2), (28, 2), (32, 3), (64, 4), (128, 5)])
def test_default_depth(size, depth):
    assert default_depth(size) == depth


def test_convnet_options():
    net = create_network("convnet", in_channels=1, num_classes=3, image_size=32, depth=2, width=16, pooling="max")
    assert net.feature_dim == 16 * 8 * 8
    net = create_network("convnet", in_channels=1, num_classes=3, image_size=8, depth=2, width=4, pooling="none")
    assert net.feature_dim == 4 * 8 * 8
    assert net(images(2, 1, 8)).shape == (2, 3)
    with pytest.raises(ConfigError, match="norm"):
        create_network("convnet", in_channels=1, num_classes=3, image_size=16, norm="layer")
    with pytest.raises(ConfigError, match="at least 32"):
        create_network("convnet", in_channels=1, num_classes=3, image_size=16, depth=5)


def test_unknown_network_suggests_a_name():
    with pytest.raises(ConfigError) as info:
        create_network("convnt", in_channels=3, num_classes=10, image_size=32)
    message = str(info.value)
    assert "did you mean 'convnet'" in message
    for name in network_names():
        assert name in message
    assert "\n" not in message


def test_bad_options_are_config_errors():
    with pytest.raises(ConfigError, match="depht"):
        create_network("convnet", in_channels=3, num_classes=10, image_size=32, depht=3)
    with pytest.raises(ConfigError, match="depth"):  # fixed-depth variants take no depth
        create_network("convnet3", in_channels=3, num_classes=10, image_size=32, depth=2)
    with pytest.raises(ConfigError, match="channel"):
        create_network("convnet", in_channels=3, num_classes=10, image_size=32, mean=[0.5])
    with pytest.raises(ConfigError, match="std"):
        create_network("convnet", in_channels=1, num_classes=10, image_size=32, std=[0.0])
    # Names are case-insensitive.
    assert create_network("ConvNet", in_channels=1, num_classes=2, image_size=16).feature_dim == 2048


def test_default_normalisation_and_buffers():
    net = create_network("convnet", in_channels=3, num_classes=2, image_size=16)
    assert net.mean.shape == net.std.shape == (1, 3, 1, 1)
    assert torch.equal(net.mean, torch.full((1, 3, 1, 1), 0.5))
    assert torch.equal(net.std, torch.full((1, 3, 1, 1), 0.5))
    assert {"mean", "std"} <= set(net.state_dict())


MEAN = [0.4914, 0.4822, 0.4465]
STD = [0.2470, 0.2435, 0.2616]


def test_convnet_matches_hand_written_forward_on_normalised_input():
    """Reference: the ConvNet forward written out with torch.nn.functional on
    (x - mean) / std computed by hand."""
    net = create_network("convnet", in_channels=3, num_classes=5, image_size=16, width=8, mean=MEAN, std=STD)
    x = images(3, 3, 16, seed=1)
    h = (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    for block in net.blocks:
        h = F.conv2d(h, block.conv.weight, block.conv.bias, padding=1)
        h = F.group_norm(h, 8, block.norm.weight, block.norm.bias, eps=1e-5)
        h = F.avg_pool2d(F.relu(h), 2)
    feats = h.reshape(3, -1)
    logits = feats @ net.classifier.weight.T + net.classifier.bias
    torch.testing.assert_close(net.features(x), feats, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(net(x), logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", network_names())
def test_normalisation_happens_inside(name):
    """net(x) equals the same weights with identity normalisation applied to (x-mean)/std."""
    size = max(16, min_image_size(name))
    net = create_network(name, in_channels=3, num_classes=4, image_size=size, mean=MEAN, std=STD)
    plain = create_network(name, in_channels=3, num_classes=4, image_size=size, mean=[0.0] * 3, std=[1.0] * 3)
    state = {k: v for k, v in net.state_dict().items() if k not in ("mean", "std")}
    plain.load_state_dict(state, strict=False)
    net.eval()
    plain.eval()
    x = images(2, 3, size, seed=2)
    by_hand = (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    torch.testing.assert_close(net(x), plain(by_hand), rtol=1e-5, atol=1e-5)
    # And normalisation matters: feeding raw x to the plain net differs.
    assert not torch.allclose(net.features(x), plain.features(x), rtol=1e-3, atol=1e-6)


def _vmap_matches_loop(name: str, size: int, channels: int) -> None:
    nets = [create_network(name, in_channels=channels, num_classes=3, image_size=size) for _ in range(3)]
    params, buffers = stack_module_state(nets)
    skeleton = copy.deepcopy(nets[0]).to("meta")
    x = images(2, channels, size, seed=3)

    def run(p, b):
        return functional_call(skeleton, (p, b), (x,))

    stacked = vmap(run)(params, buffers)  # (3, 2, 3)
    expected = torch.stack([net(x) for net in nets])
    assert stacked.shape == (3, 2, 3)
    torch.testing.assert_close(stacked, expected, rtol=1e-5, atol=1e-5)
    # The three copies really differ, so the test would catch a broadcast of one copy.
    assert not torch.allclose(expected[0], expected[1])


def test_vmap_three_stacked_convnets():
    _vmap_matches_loop("convnet", size=32, channels=3)


@pytest.mark.parametrize("name", [n for n in network_names() if not n.endswith("_bn")])
def test_vmap_every_norm_free_network(name):
    net = create_network(name, in_channels=1, num_classes=3, image_size=16 if min_image_size(name) <= 16 else 32)
    assert not has_batch_norm(net)
    _vmap_matches_loop(name, size=16 if min_image_size(name) <= 16 else 32, channels=1)


@pytest.mark.parametrize("size", [12, 24, 48])
def test_cross_architecture_nets_handle_other_sizes(size):
    for name, dim in (("alexnet", 192 * (size // 8) ** 2), ("vgg11", 512), ("resnet18", 512)):
        net = create_network(name, in_channels=3, num_classes=2, image_size=size)
        assert net.feature_dim == dim
        assert net.features(images(2, 3, size)).shape == (2, dim)


def test_instance_norm_never_sees_a_1x1_map():
    """GroupNorm(c, c) of a 1x1 map outputs its bias whatever the input, so the nets keep
    every normalised map at least 2x2: two different images give different features."""
    for name, size in (("vgg11", 16), ("vgg11", 12), ("resnet18", 9), ("convnet4", 16)):
        net = create_network(name, in_channels=1, num_classes=2, image_size=size)
        shapes = []
        hooks = [
            m.register_forward_hook(lambda mod, inp, out: shapes.append(inp[0].shape[-2:]))
            for m in net.modules()
            if isinstance(m, nn.GroupNorm)
        ]
        feats = net.features(images(2, 1, size, seed=4))
        for hook in hooks:
            hook.remove()
        assert shapes and all(h * w >= 4 for h, w in shapes), (name, size, shapes)
        assert not torch.allclose(feats[0], feats[1], rtol=1e-3, atol=1e-6)
    with pytest.raises(ConfigError, match="at least 9"):
        create_network("resnet18", in_channels=1, num_classes=2, image_size=8)


def test_network_options_come_from_each_factory_signature():
    assert network_options("convnet") == {"depth", "width", "norm", "pooling"}
    assert network_options("ConvNet3") == {"width", "norm", "pooling"}  # depth is in the name
    assert network_options("convnet_bn") == {"depth", "width", "pooling"}  # norm is fixed to batch
    assert network_options("alexnet") == frozenset()
    assert network_options("no-such-net") == frozenset()
    assert supported_options("convnet3", depth=4, width=8, norm="none") == {"width": 8, "norm": "none"}
    assert supported_options("alexnet", depth=4, width=8) == {}


@pytest.mark.parametrize("name, fixed", [("vgg11_bn", "norm"), ("resnet18_bn", "norm"), ("convnet_bn", "norm"),
                                          ("convnet3", "depth")])
def test_variants_fix_their_option_and_refuse_an_override(name, fixed):
    shape = dict(in_channels=3, num_classes=4, image_size=16)
    net = create_network(name, **shape)
    if fixed == "norm":
        assert any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())
    else:
        assert sum(isinstance(m, torch.nn.Conv2d) for m in net.modules()) == 3
    with pytest.raises(ConfigError, match=f"no option.*{fixed}"):
        create_network(name, **shape, **{fixed: "instance" if fixed == "norm" else 2})


def test_levers_are_not_a_network_option_and_the_default_is_todays_modules():
    """create_network(levers=) picks kernels, not a network's shape: the registry's options stay
    as they are, and the default levers build exactly the modules built without any."""
    from ncfm_core.kernels import KernelLevers

    shape = dict(in_channels=3, num_classes=10, image_size=32)
    assert "levers" not in network_options("convnet")
    plain, default = create_network("convnet", **shape), create_network("convnet", **shape, levers=KernelLevers())
    assert [type(m) for m in plain.modules()] == [type(m) for m in default.modules()]
    assert sum(isinstance(m, nn.AvgPool2d) for m in default.modules()) == 3
    assert plain.state_dict().keys() == default.state_dict().keys()
