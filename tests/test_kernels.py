"""Kernel levers (ncfm_core.kernels): each implementation computes what today's path computes.

Pools against a loop over the windows and against ``F.avg_pool2d`` (bit for bit where the maths
allows), instance norm against its closed form in float64 and against ``GroupNorm(C, C)`` with
measured tolerances, float64 gradchecks, vmap, the switch in place (same parameters, same state
dict, a state saved before the levers existed still loads), and a distiller run with them.
"""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from torch.func import grad, vmap

from ncfm_core.errors import ConfigError
from ncfm_core.kernels import (
    CUDA_DEFAULTS,
    NORM_KERNELS,
    POOL_KERNELS,
    BroadcastGradAvgPool2x2,
    InstanceNormViaBatchNorm,
    KernelLevers,
    ReshapeAvgPool2x2,
    apply_levers,
    avg_pool_2x2_broadcast_grad,
    avg_pool_2x2_reshape,
    cast_weights_once,
    decide_levers,
    decided_levers,
    default_levers,
    instance_norm_channels_last,
    levers_for_plan,
    levers_of,
    parse_levers,
)
from ncfm_core.models import create_network, network_names
from ncfm_core.train import StackedNetworks, can_stack

EVERY_LEVERS = [KernelLevers(pool=p, norm=n) for p in POOL_KERNELS for n in NORM_KERNELS]
POOLS = {"broadcast": avg_pool_2x2_broadcast_grad, "reshape": avg_pool_2x2_reshape}
# Measured fp32 differences (max |a - b| / max |b|, 5 seeds, maps 32x32 to 4x4, 128 channels):
# batch-norm path vs GroupNorm output 1.96e-6, input gradient 3.4e-6, weight gradient 4.8e-5,
# bias gradient 9.4e-7; each path is as far from the float64 result (GroupNorm: 2.0e-6, 3.2e-6,
# 5.4e-5, 9.9e-7). The tolerances below leave about 2x.
NORM_TOLERANCE = {"output": 5e-6, "input grad": 1e-5, "weight grad": 1e-4, "bias grad": 5e-6}


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    """max |value - reference| / max |reference|, in float64."""
    return float((value.double() - reference.double()).abs().max() / reference.double().abs().max())


# ----------------------------------------------------------------------------- the levers record


def test_levers_default_to_todays_path_and_round_trip_through_json():
    assert KernelLevers() == KernelLevers(pool="native", norm="groupnorm")
    for levers in EVERY_LEVERS:
        assert KernelLevers.from_dict(json.loads(json.dumps(levers.to_dict()))) == levers
        assert parse_levers(levers.describe()) == levers
    assert KernelLevers(pool="broadcast", norm="batchnorm").describe() == "pool=broadcast,norm=batchnorm"
    assert KernelLevers(norm="batchnorm").describe() == "norm=batchnorm" and KernelLevers().describe() == "default"
    assert KernelLevers.from_dict({}) == KernelLevers()  # a record written before a lever existed
    assert KernelLevers.from_dict({"norm": "batchnorm"}) == KernelLevers(norm="batchnorm")
    with pytest.raises(dataclasses.FrozenInstanceError):
        KernelLevers().pool = "reshape"  # type: ignore[misc]


@pytest.mark.parametrize("text, message", [
    ("pool=fast", r"unknown pool kernel 'fast'; choose one of: native, broadcast, reshape"),
    ("norm=layer", r"unknown norm kernel 'layer'; choose one of: groupnorm, batchnorm"),
    ("cast=once", r"unknown kernel lever 'cast'; the levers are: pool, norm, casts, layout, compile, graphs"),
    ("casts=twice", r"unknown casts kernel 'twice'; choose one of: autocast, once"),
    ("pool", r"'pool' is not LEVER=CHOICE"),
    ("pool=", r"'pool=' is not LEVER=CHOICE"),
    ("pool=reshape,pool=broadcast", r"'pool' is given twice"),
])
def test_parse_levers_errors_name_the_valid_choices(text, message):
    with pytest.raises(ConfigError, match=message):
        parse_levers(text)


def test_parse_levers_reads_any_order_and_spaces():
    assert parse_levers(" norm = batchnorm , pool=reshape ") == KernelLevers(pool="reshape", norm="batchnorm")
    assert parse_levers("") == parse_levers("default") == KernelLevers()


def test_levers_from_a_foreign_record_are_refused():
    with pytest.raises(ConfigError, match="unknown kernel lever.*fusion.*newer ncfm"):
        KernelLevers.from_dict({"pool": "native", "fusion": "on"})
    with pytest.raises(ConfigError, match="kernel lever 'compile' is True, expected one of: off, on"):
        KernelLevers.from_dict({"pool": "native", "compile": True})
    with pytest.raises(ConfigError, match="'pool' is 3"):
        KernelLevers.from_dict({"pool": 3})
    with pytest.raises(ConfigError, match="must be a mapping"):
        KernelLevers.from_dict(["pool", "native"])  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="unknown norm kernel"):
        KernelLevers(norm="instance")


def test_kernels_option_decides_per_device_with_overrides_and_the_older_shorthands():
    assert default_levers("cpu") == decide_levers("auto", "cpu") == KernelLevers()  # no lever helped on the CPU
    assert default_levers("mps") == KernelLevers()
    assert decide_levers("auto", "cuda") == CUDA_DEFAULTS == KernelLevers(pool="broadcast", norm="batchnorm",
                                                                          casts="once", compile="on")
    assert decide_levers("auto,compile=off", "cuda") == KernelLevers(pool="broadcast", norm="batchnorm", casts="once")
    assert decide_levers("norm=batchnorm", "cuda") == KernelLevers(norm="batchnorm")  # no auto: the rest is today's
    assert decide_levers("default", "cuda") == decide_levers("", "cuda") == KernelLevers()
    # --channels-last and --compile set their levers; contradicting the option is an error
    assert decide_levers("auto", "cpu", channels_last=True, compile_blocks=True) == KernelLevers(layout="nhwc",
                                                                                                 compile="on")
    assert decide_levers("auto", "cuda", channels_last=False).layout == "nchw"
    assert decide_levers("layout=nhwc", "cuda", channels_last=True).layout == "nhwc"
    with pytest.raises(ConfigError, match="channels_last=True and kernels 'layout=nchw' disagree"):
        decide_levers("layout=nchw", "cuda", channels_last=True)
    with pytest.raises(ConfigError, match="--compile and kernels 'compile=off' disagree"):
        decide_levers("auto,compile=off", "cuda", compile_blocks=True)
    # decided once: the spec names every lever, so deciding it again (a resume, another ncfm's
    # defaults) gives the same levers
    for levers in (KernelLevers(), CUDA_DEFAULTS, KernelLevers(layout="nhwc", graphs="on")):
        assert decide_levers(levers.spec(), "cuda") == decide_levers(levers.spec(), "cpu") == levers
        assert decided_levers(levers.spec(), "Distiller") == levers
    # a plan with checkpointing turned --compile's lever off: deciding its record again keeps that
    assert decide_levers(KernelLevers().spec(), "cuda", compile_blocks=True) == KernelLevers()
    with pytest.raises(ConfigError, match="Distiller was given kernels 'auto'; decide it first"):
        decided_levers("auto", "Distiller")
    with pytest.raises(ConfigError, match="asks for the device's defaults"):
        parse_levers("auto,pool=reshape")
    # activation checkpointing recomputes the blocks under autograd hooks: no compiled blocks, no graphs
    assert levers_for_plan(KernelLevers(compile="on", graphs="on", norm="batchnorm"), True) == KernelLevers(
        norm="batchnorm")
    assert levers_for_plan(CUDA_DEFAULTS, False) == CUDA_DEFAULTS


def test_a_config_validates_its_kernels_and_a_record_without_them_ran_todays_path():
    from ncfm_core.config import DistillConfig, make_config

    assert make_config("fake", 1).kernels == "auto"
    with pytest.raises(ConfigError, match="unknown kernel lever 'fusion'"):
        make_config("fake", 1, kernels="fusion=on")
    with pytest.raises(ConfigError, match="unknown layout kernel 'nchwc'"):
        make_config("fake", 1, kernels="auto,layout=nchwc")
    old = make_config("fake", 1).to_dict()
    del old["kernels"]  # a manifest written before the levers
    assert DistillConfig.from_dict(old).kernels == "default"


# ----------------------------------------------------------------------------- 2x2 average pool


def window_means(x: torch.Tensor) -> torch.Tensor:
    """The slow, obvious 2x2 mean: a loop over the windows, in float64, odd edges dropped."""
    rows, cols = x.shape[-2] // 2, x.shape[-1] // 2
    out = torch.empty(*x.shape[:-2], rows, cols, dtype=torch.float64)
    for i in range(rows):
        for j in range(cols):
            out[..., i, j] = x[..., 2 * i : 2 * i + 2, 2 * j : 2 * j + 2].double().sum(dim=(-2, -1)) / 4
    return out


@pytest.mark.parametrize("kernel", sorted(POOLS))
@pytest.mark.parametrize("size", [(8, 8), (7, 9), (5, 4), (2, 3)])
def test_pool_is_the_window_mean_and_its_gradient_is_the_spread_quarter(kernel, size):
    x = torch.randn(2, 3, *size, dtype=torch.float64, generator=torch.Generator().manual_seed(0), requires_grad=True)
    out = POOLS[kernel](x)
    torch.testing.assert_close(out, window_means(x.detach()), rtol=0, atol=1e-15)
    weights = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    (gradient,) = torch.autograd.grad((out * weights).sum(), x)
    expected = torch.zeros_like(x)  # closed form: weight / 4 on each window's pixels, 0 on a dropped edge
    rows, cols = out.shape[-2:]
    expected[..., : 2 * rows, : 2 * cols] = weights.repeat_interleave(2, -2).repeat_interleave(2, -1) / 4
    assert torch.equal(gradient, expected)
    assert torch.autograd.gradcheck(POOLS[kernel], (x,))
    assert torch.autograd.gradgradcheck(POOLS[kernel], (x,))


@pytest.mark.parametrize("size", [(32, 32), (16, 16), (7, 9)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_broadcast_pool_is_avg_pool2d_bit_for_bit_forward_and_backward(size, dtype, channels_last):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(4, 16, *size, generator=gen).to(dtype)
    upstream = torch.randn(4, 16, size[0] // 2, size[1] // 2, generator=gen).to(dtype)
    if channels_last:
        x, upstream = (t.contiguous(memory_format=torch.channels_last) for t in (x, upstream))
    x_native, x_lever = x.clone().requires_grad_(), x.clone().requires_grad_()
    native, lever = F.avg_pool2d(x_native, 2), avg_pool_2x2_broadcast_grad(x_lever)
    assert torch.equal(lever, native)
    native.backward(upstream)
    lever.backward(upstream)
    assert torch.equal(x_lever.grad, x_native.grad)
    if channels_last:  # the spread keeps a channels_last gradient channels_last
        assert x_lever.grad.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("size", [(32, 32), (16, 16), (7, 9)])
def test_reshape_pool_differs_from_avg_pool2d_by_at_most_one_ulp_in_fp32_and_not_in_bf16(size):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(8, 32, *size, generator=gen)
    reference = F.avg_pool2d(x, 2)
    out = avg_pool_2x2_reshape(x)
    # Another summation order: about 30% of the outputs differ, by rounding the partial sums
    # otherwise (measured: at most 1.5 eps x the window's mean |x|; bound 2 eps).
    window_magnitude = F.avg_pool2d(x.abs(), 2)
    assert ((out - reference).abs() <= 2 * torch.finfo(torch.float32).eps * window_magnitude).all()
    assert 0.1 < (out != reference).float().mean() < 0.5
    assert torch.equal(avg_pool_2x2_reshape(x.bfloat16()), F.avg_pool2d(x.bfloat16(), 2))  # both sum in fp32
    upstream = torch.randn(reference.shape, generator=gen)
    x_native, x_lever = x.clone().requires_grad_(), x.clone().requires_grad_()
    F.avg_pool2d(x_native, 2).backward(upstream)
    avg_pool_2x2_reshape(x_lever).backward(upstream)
    assert torch.equal(x_lever.grad, x_native.grad)  # the same quarter, spread


@pytest.mark.parametrize("size", [(32, 32), (7, 9)])
def test_reshape_pool_keeps_channels_last_and_its_numbers(size):
    """On an NHWC input the reshape pool pools the NHWC view: NHWC out (no NCHW copy), the same
    numbers as on the NCHW input bit for bit, and its gradient NHWC too."""
    x = torch.randn(4, 16, *size, generator=torch.Generator().manual_seed(20))
    nhwc = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    out = avg_pool_2x2_reshape(nhwc)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out, avg_pool_2x2_reshape(x))
    out.backward(torch.ones_like(out))
    assert nhwc.grad.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("kernel", sorted(POOLS))
def test_pools_run_under_vmap_forward_and_backward(kernel):
    xs = torch.randn(3, 2, 4, 6, 6, generator=torch.Generator().manual_seed(4))
    batched = vmap(POOLS[kernel])(xs)
    torch.testing.assert_close(batched, torch.stack([POOLS[kernel](x) for x in xs]), rtol=0, atol=0)
    grads = vmap(grad(lambda x: POOLS[kernel](x).square().sum()))(xs)
    for x, g in zip(xs, grads):
        x = x.clone().requires_grad_()
        (expected,) = torch.autograd.grad(POOLS[kernel](x).square().sum(), x)
        assert torch.equal(g, expected)


# ----------------------------------------------------------------------------- instance norm


def instance_norm_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """Closed form in float64: per sample and channel, (x - mean) / sqrt(biased var + eps), affine."""
    x = x.double()
    mean = x.mean(dim=(2, 3), keepdim=True)
    var = ((x - mean) ** 2).mean(dim=(2, 3), keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight.double().view(1, -1, 1, 1) + bias.double().view(1, -1, 1, 1)


def norm_pair(channels: int, eps: float = 1e-5, seed: int = 0) -> tuple[nn.GroupNorm, InstanceNormViaBatchNorm]:
    """Today's GroupNorm(C, C) with random affine parameters, and the lever holding the same ones."""
    group = nn.GroupNorm(channels, channels, eps=eps)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        group.weight.copy_(torch.randn(channels, generator=gen))
        group.bias.copy_(torch.randn(channels, generator=gen))
    lever = apply_levers(nn.Sequential(copy.deepcopy(group)), KernelLevers(norm="batchnorm"))[0]
    assert isinstance(lever, InstanceNormViaBatchNorm) and lever.eps == eps
    return group, lever


@pytest.mark.parametrize("shape", [(64, 128, 32, 32), (256, 128, 8, 8), (512, 128, 4, 4), (3, 5, 7, 3)])
def test_batchnorm_instance_norm_matches_group_norm_and_the_closed_form(shape):
    gen = torch.Generator().manual_seed(5)
    channels = shape[1]
    # per-channel offsets and scales, as a convolution's output has
    x = torch.randn(shape, generator=gen) * torch.rand(1, channels, 1, 1, generator=gen) * 4
    x = x + torch.randn(1, channels, 1, 1, generator=gen)
    upstream = torch.randn(shape, generator=gen)
    group, lever = norm_pair(channels)
    results = {}
    for name, module in (("groupnorm", group), ("batchnorm", lever)):
        xx = x.clone().requires_grad_()
        module.zero_grad()
        out = module(xx)
        out.backward(upstream)
        results[name] = {"output": out.detach(), "input grad": xx.grad, "weight grad": module.weight.grad.clone(),
                         "bias grad": module.bias.grad.clone()}
    x64 = x.double().requires_grad_()
    w64, b64 = (p.detach().double().requires_grad_() for p in (group.weight, group.bias))
    exact_out = instance_norm_reference(x64, w64, b64, 1e-5)
    exact = dict(zip(["input grad", "weight grad", "bias grad"],
                     torch.autograd.grad(exact_out, (x64, w64, b64), upstream.double())))
    exact["output"] = exact_out.detach()
    for what, tolerance in NORM_TOLERANCE.items():
        between = relative_error(results["batchnorm"][what], results["groupnorm"][what])
        assert between <= tolerance, (what, between)
        for name in results:
            error = relative_error(results[name][what], exact[what])
            assert error <= tolerance, (name, what, error)


def test_batchnorm_instance_norm_gradcheck_and_a_one_pixel_map():
    _, lever = norm_pair(3, eps=1e-3)
    lever = lever.double()
    x = torch.randn(2, 3, 3, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(6), requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: torch.instance_norm(x, w, b, None, None, True, 0.0, 1e-3, False),
                                   (x, lever.weight, lever.bias))
    torch.testing.assert_close(lever(x), instance_norm_reference(x, lever.weight, lever.bias, 1e-3), rtol=0, atol=1e-12)
    # A 1x1 map has zero variance: GroupNorm(C, C) returns the bias, and so does the lever
    # (F.instance_norm would refuse it). Both apply x * w / sqrt(eps) + (b - mean * w / sqrt(eps)),
    # which rounds at the scale of x * 316.
    group, lever = norm_pair(4)
    one_pixel = torch.randn(5, 4, 1, 1, generator=torch.Generator().manual_seed(17))
    bias = group.bias.detach().view(1, 4, 1, 1).expand(5, 4, 1, 1)
    for module in (group, lever):
        torch.testing.assert_close(module(one_pixel).detach(), bias, rtol=0, atol=2e-4)


@pytest.mark.parametrize("shape", [(64, 128, 32, 32), (256, 128, 8, 8), (512, 128, 4, 4), (3, 5, 7, 3)])
def test_channels_last_instance_norm_keeps_nhwc_and_matches_the_closed_form(shape):
    """The batch-norm path's instance norm on an NHWC input (the layout lever): NHWC output and
    input gradient, against the float64 closed form within the same tolerances as the NCHW
    kernels (measured worst of 5 seeds: output 1.8e-6, input gradient 5.3e-6, weight gradient
    4.5e-6, bias gradient 3.2e-7). The CPU's GroupNorm on NHWC is the one to avoid: 4e-3 off
    the closed form at (256, 128, 8, 8)."""
    gen = torch.Generator().manual_seed(21)
    channels = shape[1]
    x = torch.randn(shape, generator=gen) * torch.rand(1, channels, 1, 1, generator=gen) * 4
    x = x + torch.randn(1, channels, 1, 1, generator=gen)
    upstream = torch.randn(shape, generator=gen).contiguous(memory_format=torch.channels_last)
    _, lever = norm_pair(channels)
    nhwc = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    out = lever(nhwc)
    assert out.is_contiguous(memory_format=torch.channels_last) or shape[2] * shape[3] == 1
    out.backward(upstream)
    assert nhwc.grad.is_contiguous(memory_format=torch.channels_last)
    x64 = x.double().requires_grad_()
    w64, b64 = (p.detach().double().requires_grad_() for p in (lever.weight, lever.bias))
    exact_out = instance_norm_reference(x64, w64, b64, 1e-5)
    exact = torch.autograd.grad(exact_out, (x64, w64, b64), upstream.double())
    for what, value, reference in zip(NORM_TOLERANCE, (out.detach(), nhwc.grad, lever.weight.grad, lever.bias.grad),
                                      (exact_out.detach(), *exact)):
        assert relative_error(value, reference) <= NORM_TOLERANCE[what], what


def test_channels_last_instance_norm_gradcheck_in_float64():
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(22), requires_grad=True)
    w = torch.randn(3, dtype=torch.float64, generator=torch.Generator().manual_seed(23), requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, generator=torch.Generator().manual_seed(24), requires_grad=True)

    def nhwc(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        # gradcheck indexes inputs and outputs in NCHW order: the NHWC copy and back are inside
        return instance_norm_channels_last(x.contiguous(memory_format=torch.channels_last), w, b, 1e-3).contiguous()

    assert torch.autograd.gradcheck(nhwc, (x, w, b))
    torch.testing.assert_close(nhwc(x, w, b), instance_norm_reference(x, w, b, 1e-3), rtol=0, atol=1e-12)


@pytest.mark.parametrize("pool", POOL_KERNELS)
@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_a_block_keeps_nhwc_through_conv_norm_relu_and_pool(pool, dtype):
    """layout=nhwc with the batch-norm path: a ConvNet block's output, and the gradient of its
    input, stay channels_last through every layer, in fp32 and under bf16 autocast."""
    net = create_network("convnet", in_channels=3, num_classes=4, image_size=16, depth=2, width=8,
                         levers=KernelLevers(pool=pool, norm="batchnorm"))
    net = net.to(memory_format=torch.channels_last).requires_grad_(False)
    x = torch.rand(3, 8, 16, 16, generator=torch.Generator().manual_seed(25))
    x = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        block = net.blocks[1]
        seen = [block.conv(x)]
        for layer in (block.norm, F.relu, block.pool):  # ConvBlock.forward, layer by layer
            seen.append(layer(seen[-1]))
        assert torch.equal(seen[-1], block(x))
    assert all(t.is_contiguous(memory_format=torch.channels_last) for t in seen), [t.stride() for t in seen]
    seen[-1].float().sum().backward()
    assert x.grad.is_contiguous(memory_format=torch.channels_last)


def test_cpu_autocast_runs_both_norms_in_bf16():
    group, lever = norm_pair(8)
    conv = nn.Conv2d(3, 8, 3, padding=1)
    x = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(7))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = conv(x)
        assert h.dtype == torch.bfloat16
        assert group(h).dtype == lever(h).dtype == torch.bfloat16
    assert lever.weight.dtype == torch.float32  # the parameters stay fp32; only the activations are bf16


@pytest.mark.skipif(not hasattr(torch._C, "_dispatch_has_kernel_for_dispatch_key"), reason="no dispatcher query")
def test_cuda_autocast_policy_puts_group_norm_in_fp32_and_leaves_instance_norm_alone():
    """What the docs claim of CUDA autocast, read from this torch's dispatcher (no GPU needed):
    group_norm has an AutocastCUDA kernel (the fp32 policy: its bf16 input is cast up, its output
    is fp32), instance_norm and batch_norm have none (they run in their input's dtype)."""
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    assert has("aten::group_norm", "AutocastCUDA")
    assert not has("aten::instance_norm", "AutocastCUDA") and not has("aten::batch_norm", "AutocastCUDA")
    assert not has("aten::avg_pool2d", "AutocastCUDA")  # the pool runs in its input's dtype either way


def convnet_with_random_norms(channels: int, size: int, seed: int) -> nn.Module:
    """Today's ConvNet (width 128, depth by size) whose norms' affine parameters are random
    around (1, 0), as in a trained network, rather than exactly (1, 0)."""
    torch.manual_seed(seed)
    net = create_network("convnet", in_channels=channels, num_classes=10, image_size=size)
    with torch.no_grad():
        for name, param in net.named_parameters():
            if ".norm." in name:
                param.normal_(1.0 if name.endswith("weight") else 0.0, 0.3)
    return net


class GroupNormAsCudaAutocast(nn.GroupNorm):
    """GroupNorm as CUDA autocast runs it (fp32 policy): input cast up, fp32 output."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", enabled=False):
            return F.group_norm(x.float(), self.num_groups, self.weight, self.bias, self.eps)


@pytest.mark.parametrize("channels, size", [(1, 16), (3, 32)])
def test_bf16_features_of_the_batchnorm_path_against_todays_cuda_path(channels, size):
    """Under bf16 autocast the batch-norm path writes bf16 (its ReLU and pool then run in bf16),
    where today's CUDA path normalises in fp32. Measured feature error against fp32 (relative L2,
    worst sample of 256): digits 4.5e-3 vs 3.8e-3, CIFAR 5.7e-3 vs 4.7e-3, i.e. ~1.2x: the bf16
    convolutions make most of the error either way. Bound: 1.5x, and 1e-2 absolute."""
    net = convnet_with_random_norms(channels, size, seed=8)
    todays_cuda = copy.deepcopy(net)
    for block in todays_cuda.blocks:
        norm = GroupNormAsCudaAutocast(block.norm.num_groups, block.norm.num_channels)
        norm.weight, norm.bias = block.norm.weight, block.norm.bias
        block.norm = norm
    lever = apply_levers(copy.deepcopy(net), KernelLevers(pool="broadcast", norm="batchnorm"))
    x = torch.rand(256, channels, size, size, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        reference = net.features(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            today, levers = todays_cuda.features(x), lever.features(x)
    assert today.dtype == torch.float32 and levers.dtype == torch.bfloat16

    def worst(features: torch.Tensor) -> float:
        return float((torch.linalg.vector_norm(features.float() - reference, dim=1)
                      / torch.linalg.vector_norm(reference, dim=1)).max())

    assert worst(levers) <= min(1.5 * worst(today), 1e-2), (worst(levers), worst(today))


# ----------------------------------------------------------------------------- switching networks


def todays_modules(net: nn.Module) -> list[type]:
    return [type(m) for m in net.modules() if isinstance(m, (nn.AvgPool2d, nn.GroupNorm, BroadcastGradAvgPool2x2,
                                                            ReshapeAvgPool2x2, InstanceNormViaBatchNorm))]


@pytest.mark.parametrize("levers", EVERY_LEVERS, ids=lambda lv: lv.describe())
def test_switching_keeps_parameters_state_dict_and_switches_back(levers):
    net = create_network("convnet", in_channels=3, num_classes=10, image_size=32).eval()
    before = todays_modules(net)
    parameters = dict(net.named_parameters())
    state = net.state_dict()
    assert apply_levers(net, levers) is net
    assert levers_of(net) == levers
    assert net.state_dict().keys() == state.keys()
    for name, param in net.named_parameters():
        assert param is parameters[name], name  # the same objects: optimisers and the blend stay valid
    pools = [m for m in net.modules() if type(m) in (nn.AvgPool2d, BroadcastGradAvgPool2x2, ReshapeAvgPool2x2)]
    norms = [m for m in net.modules() if type(m) in (nn.GroupNorm, InstanceNormViaBatchNorm)]
    assert len(pools) == len(norms) == 3
    assert {type(m) for m in pools} == {{"native": nn.AvgPool2d, "broadcast": BroadcastGradAvgPool2x2,
                                         "reshape": ReshapeAvgPool2x2}[levers.pool]}
    assert {type(m) for m in norms} == {nn.GroupNorm if levers.norm == "groupnorm" else InstanceNormViaBatchNorm}
    assert not any(m.training for m in net.modules())  # the new layers keep the network's mode
    apply_levers(net, KernelLevers())
    assert todays_modules(net) == before and levers_of(net) == KernelLevers()
    assert all(m.num_groups == m.num_channels == 128 for m in net.modules() if isinstance(m, nn.GroupNorm))


def test_levers_touch_only_plain_average_pools_and_instance_norms():
    levers = KernelLevers(pool="broadcast", norm="batchnorm")
    shape = dict(in_channels=3, num_classes=4, image_size=32)
    others = (("convnet_bn", nn.BatchNorm2d), ("alexnet", nn.MaxPool2d), ("resnet18", nn.AdaptiveAvgPool2d))
    for name, untouched in others:
        net = create_network(name, **shape)
        count = sum(isinstance(m, untouched) for m in net.modules())
        apply_levers(net, levers)
        assert sum(isinstance(m, untouched) for m in net.modules()) == count > 0, name
    max_pooled = create_network("convnet", **shape, pooling="max", levers=levers)
    assert not any(isinstance(m, (BroadcastGradAvgPool2x2, nn.AvgPool2d)) for m in max_pooled.modules())
    # VGG's and ResNet's instance norms take the norm lever too
    assert levers_of(create_network("vgg11", **shape, levers=levers)) == KernelLevers(norm="batchnorm")
    # a pool with other settings is not a 2x2 mean
    odd_pool = nn.Sequential(nn.AvgPool2d(2, stride=1), nn.AvgPool2d(2, ceil_mode=True), nn.AvgPool2d(2, padding=1))
    assert todays_modules(apply_levers(odd_pool, levers)) == [nn.AvgPool2d] * 3
    mixed = nn.Sequential(nn.AvgPool2d(2), BroadcastGradAvgPool2x2())
    with pytest.raises(ConfigError, match="mixes pool kernels: broadcast, native"):
        levers_of(mixed)


@pytest.mark.parametrize("channels, size", [(1, 16), (3, 32)])
@pytest.mark.parametrize("levers", EVERY_LEVERS[1:], ids=lambda lv: lv.describe())
def test_convnet_with_levers_computes_todays_function(channels, size, levers):
    """Features and gradients (images and parameters) against today's path: bit for bit with the
    broadcast pool and group norm; otherwise features within 2e-6 of the largest in fp32
    (measured 4.6e-7), and in float64 everything within 1e-12. (fp32 gradients are compared in
    float64: a ReLU input that lands within rounding of zero flips its gradient in one of them.)"""
    today = convnet_with_random_norms(channels, size, seed=10)
    lever = apply_levers(copy.deepcopy(today), levers)
    x = torch.rand(16, channels, size, size, generator=torch.Generator().manual_seed(11))

    def run(net: nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
        images = images.clone().requires_grad_()
        net.zero_grad()
        features = net.features(images)
        features.sin().sum().backward()
        return [features.detach(), images.grad] + [p.grad for p in net.blocks.parameters()]

    fp32_today, fp32_lever = run(today, x), run(lever, x)
    if levers == KernelLevers(pool="broadcast"):
        for a, b in zip(fp32_lever, fp32_today):
            assert torch.equal(a, b)
    assert relative_error(fp32_lever[0], fp32_today[0]) <= 2e-6
    f64_today = run(copy.deepcopy(today).double(), x.double())
    f64_lever = run(copy.deepcopy(lever).double(), x.double())
    # (a convolution's bias before an instance norm has gradient 0 in exact arithmetic: rounding
    # noise, so the absolute tolerance is relative to the largest gradient, not to its own)
    scale = max(float(t.abs().max()) for t in f64_today)
    for a, b in zip(f64_lever, f64_today):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12 * scale)


def todays_convnet_replica(channels: int, width: int, classes: int) -> nn.Module:
    """A two-block ConvNet written out by hand as the code before the levers built it (module
    names and all), so the test does not depend on models.py to make the 'old' state."""

    def block(c_in: int) -> nn.Module:
        b = nn.Module()
        b.conv = nn.Conv2d(c_in, width, 3, padding=1)
        b.norm = nn.GroupNorm(width, width, affine=True)
        b.pool = nn.AvgPool2d(2, 2)
        return b

    net = nn.Module()
    net.register_buffer("mean", torch.full((1, channels, 1, 1), 0.5))
    net.register_buffer("std", torch.full((1, channels, 1, 1), 0.5))
    net.blocks = nn.Sequential(block(channels), block(width))
    net.classifier = nn.Linear(width * 4 * 4, classes)
    return net


def replica_logits(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    h = (x - net.mean) / net.std
    for b in net.blocks:
        h = b.pool(F.relu(b.norm(b.conv(h))))
    return net.classifier(h.flatten(1))


def test_a_state_saved_before_the_levers_loads_into_every_lever_network(tmp_path):
    torch.manual_seed(12)
    old = todays_convnet_replica(channels=1, width=8, classes=10)
    with torch.no_grad():
        for name, param in old.named_parameters():
            if ".norm." in name:
                param.normal_()
    path = tmp_path / "old.safetensors"
    save_file(old.state_dict(), str(path))
    x = torch.rand(4, 1, 16, 16, generator=torch.Generator().manual_seed(13))
    expected = replica_logits(old, x)
    for levers in EVERY_LEVERS:
        net = create_network("convnet", in_channels=1, num_classes=10, image_size=16, width=8, levers=levers)
        net.load_state_dict(load_file(str(path)), strict=True)
        torch.testing.assert_close(net(x), expected, rtol=0, atol=1e-5)
        # and what it saves loads into today's network
        fresh = create_network("convnet", in_channels=1, num_classes=10, image_size=16, width=8)
        fresh.load_state_dict(net.state_dict(), strict=True)
        torch.testing.assert_close(fresh(x), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", network_names())
def test_every_registered_network_runs_forward_and_backward_with_all_levers(name):
    levers = KernelLevers(pool="broadcast", norm="batchnorm")
    size = 32 if name != "convnet2" else 16
    net = create_network(name, in_channels=3, num_classes=5, image_size=size, levers=levers)
    x = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(14), requires_grad=True)
    net(x).square().sum().backward()
    assert torch.isfinite(x.grad).all()
    assert all(p.grad is not None for p in net.parameters())


@pytest.mark.parametrize("levers", EVERY_LEVERS[1:], ids=lambda lv: lv.describe())
def test_lever_networks_stack_under_vmap_as_evaluation_trains_them(levers):
    torch.manual_seed(15)
    nets = [create_network("convnet", in_channels=1, num_classes=4, image_size=16, width=8, levers=levers)
            for _ in range(3)]
    assert all(can_stack(net) for net in nets)
    stacked = StackedNetworks(nets)
    x = torch.rand(3, 5, 1, 16, 16, generator=torch.Generator().manual_seed(16))
    logits = stacked.logits(x)
    for r, net in enumerate(nets):
        torch.testing.assert_close(logits[r], net(x[r]), rtol=1e-5, atol=1e-6)
    logits.square().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in stacked.parameters())


def test_the_blend_rounds_into_low_precision_weights_as_autocast_casts_them():
    """casts=once holds convolution and linear weights in bf16 and the pool's blend writes them
    there: ``lerp`` into a bf16 ``out`` computes in fp32 and rounds once, bit for bit the fp32
    blend cast to bf16 (what autocast fed the convolutions). Every weight stays the same object."""
    from ncfm_core.pool import Pool

    torch.manual_seed(26)
    net = create_network("convnet", in_channels=3, num_classes=10, image_size=16, depth=2, width=8)
    init, trained = ({k: v.clone().normal_() for k, v in net.state_dict().items()} for _ in range(2))
    pool = Pool(spec=None, init_states=[init], trained_states=[trained])  # type: ignore[arg-type]
    low = cast_weights_once(copy.deepcopy(net), torch.bfloat16)
    parameters = dict(low.named_parameters())
    for beta in (0.0, 0.17, 0.5, 0.83, 1.0):
        pool.blend_into(net, 0, beta)
        pool.blend_into(low, 0, beta)
        for name, value in net.state_dict().items():
            mine = low.state_dict()[name]
            if ".conv." in name or name.startswith("classifier"):
                assert mine.dtype == torch.bfloat16 and torch.equal(mine, value.to(torch.bfloat16)), name
            else:
                assert torch.equal(mine, value), name
    assert all(p is parameters[n] for n, p in low.named_parameters())
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(27))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(low(x), net(x))  # the casts autocast made are the ones now held


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_blend_into_bf16_rounds_as_the_cast():
    a, b = (torch.randn(128, 128, 3, 3, device="cuda") for _ in range(2))
    for weight in (0.1, 0.5, 0.9):
        out = torch.empty(a.shape, dtype=torch.bfloat16, device="cuda")
        torch.lerp(a, b, weight, out=out)
        assert torch.equal(out, torch.lerp(a, b, weight).to(torch.bfloat16))


@pytest.mark.parametrize("levers", EVERY_LEVERS[1:], ids=lambda lv: lv.describe())
def test_levers_on_a_channels_last_network(levers):
    """The distiller's channels_last option puts weights and images in NHWC: every lever takes
    them and computes what today's path computes on them."""
    today = convnet_with_random_norms(3, 32, seed=18).to(memory_format=torch.channels_last)
    lever = apply_levers(copy.deepcopy(today), levers)
    x = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(19)).contiguous(
        memory_format=torch.channels_last)
    grads = []
    for net in (today, lever):
        images = x.clone().requires_grad_()
        features = net.features(images)
        features.sin().sum().backward()
        grads.append((features.detach(), images.grad))
    # measured: 0 (broadcast), 1.6e-6 (reshape), 3.1e-6 with the batch-norm path, whose
    # instance_norm makes an NCHW copy where the CPU's channels_last group norm sums in another order
    assert relative_error(grads[1][0], grads[0][0]) <= 1e-5
    assert relative_error(grads[1][1], grads[0][1]) <= 1e-4  # fp32; see the ReLU flip note above
    if levers.pool == "broadcast" and levers.norm == "groupnorm":
        assert torch.equal(grads[1][0], grads[0][0]) and torch.equal(grads[1][1], grads[0][1])
