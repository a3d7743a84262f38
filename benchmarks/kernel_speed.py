"""The kernel levers on the ConvNet alone: today's path, each lever alone, all together.

The levers a network alone runs (``kit.NETWORK_LEVERS``: pool, norm, casts, layout; compile and
graphs belong to the loop and are timed by ``distill_speed.py --ablations kernels``). Two timings
per variant, as the distillation runs the extractor: forward + backward for the images' gradient
with frozen weights (the synthetic side) and a forward in inference mode (the real side). Shapes:
digits (16x16, 1 channel, ConvNet-2) and CIFAR (32x32, 3 channels, ConvNet-3), width 128, the
same random weights for every variant (``ncfm_core.kernels`` switches the layers in place; with
casts=once the convolution and linear weights are held in the autocast dtype, a no-op in fp32;
with layout=nhwc weights and inputs are channels_last). All variants of a shape run in one process in interleaved
rounds, the order rotated each round, after one discarded warm-up each; medians; the speed
column is the first row's median over the variant's (above 1: faster than today's path). The
last row repeats the first: the spread between them is the noise. Prints a Markdown table.

    uv run python benchmarks/kernel_speed.py                          # CPU, a few minutes
    uv run python benchmarks/kernel_speed.py --device cuda --precision bf16
"""

from __future__ import annotations

import copy
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import kit  # noqa: E402

import torch  # noqa: E402

from ncfm_core.forward import autocast_dtype  # noqa: E402
from ncfm_core.kernels import KernelLevers, apply_levers, cast_weights_once, parse_kernels, parse_levers  # noqa: E402
from ncfm_core.models import create_network  # noqa: E402

SCRIPT = "benchmarks/kernel_speed.py"
SHAPES = {"digits": (1, 16, 2), "cifar": (3, 32, 3)}  # channels, image side, depth
PASSES = ("forward+backward", "no-grad forward")


def network_variants() -> dict[str, KernelLevers]:
    """The ablation's rows a network alone can run: today's path, each network lever alone (the
    kernels preset's rows that name only ``kit.NETWORK_LEVERS``), all of them together, today's
    path again."""
    rows = {}
    for name, (option, autotune) in kit.KERNEL_VARIANTS.items():
        auto, chosen = parse_kernels(option)
        if not auto and not autotune and set(chosen) <= set(kit.NETWORK_LEVERS):
            rows[name] = KernelLevers(**chosen)
    together = {lever: choice for lever, choice in parse_levers(kit.ALL_KERNEL_LEVERS).to_dict().items()
                if lever in kit.NETWORK_LEVERS}
    last = list(rows)[-1]  # today's path again stays last
    return {**{n: v for n, v in rows.items() if n != last}, "network levers together": KernelLevers(**together),
            last: rows[last]}


def variant_networks(channels: int, size: int, depth: int, device: torch.device,
                     dtype: torch.dtype | None) -> dict[str, tuple[torch.nn.Module, KernelLevers]]:
    """Today's ConvNet and a switched copy per variant, all with the same weights, frozen and in
    eval mode as the distiller's extractor is."""
    torch.manual_seed(0)
    today = create_network("convnet", in_channels=channels, num_classes=10, image_size=size, depth=depth)
    today = today.to(device).requires_grad_(False).eval()
    nets = {}
    for name, levers in network_variants().items():
        net = apply_levers(copy.deepcopy(today), levers)
        if levers.layout == "nhwc":
            net = net.to(memory_format=torch.channels_last)
        if levers.casts == "once" and dtype is not None:
            cast_weights_once(net, dtype)
        nets[name] = (net, levers)
    return nets


def passes(net: torch.nn.Module, levers: KernelLevers, images: torch.Tensor, real: torch.Tensor,
           upstream: torch.Tensor, autocast: Any) -> dict[str, Any]:
    """The two timed calls of one network: the synthetic side and the real side (the inputs in
    the network's memory format, as the loop gives them)."""
    if levers.layout == "nhwc":
        images, real = (t.contiguous(memory_format=torch.channels_last) for t in (images, real))

    def synthetic() -> None:
        x = images.detach().requires_grad_(True)
        with autocast():
            features = net.features(x)
        (features.float() * upstream).sum().backward()

    def real_side() -> None:
        with torch.inference_mode(), autocast():
            net.features(real)

    return {"forward+backward": synthetic, "no-grad forward": real_side}


def measure(shape: str, args: Any, device: torch.device) -> dict[str, dict[str, list[float]]]:
    """Seconds per round of every variant's two passes at ``shape``: {variant: {pass: [s, ...]}}."""
    channels, size, depth = SHAPES[shape]
    dtype = autocast_dtype(args.precision)
    nets = variant_networks(channels, size, depth, device, dtype)
    gen = torch.Generator().manual_seed(1)
    images = torch.rand(args.batch, channels, size, size, generator=gen).to(device)
    real = torch.rand(args.real_batch, channels, size, size, generator=gen).to(device)
    feature_dim = next(iter(nets.values()))[0].feature_dim
    upstream = torch.randn(args.batch, feature_dim, generator=gen).to(device)

    def autocast() -> Any:
        return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)

    calls = {name: passes(net, levers, images, real, upstream, autocast) for name, (net, levers) in nets.items()}
    seconds: dict[str, dict[str, list[float]]] = {name: {p: [] for p in PASSES} for name in calls}
    for name in calls:  # one discarded warm-up each (allocator, cuDNN autotuning)
        for p in PASSES:
            kit.timed(calls[name][p], device)
    names = list(calls)
    for round_index in range(args.rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            for p in PASSES:
                seconds[name][p].append(kit.timed(calls[name][p], device).wall)
        kit.log(f"{shape}: round {round_index + 1}/{args.rounds}")
    return seconds


def table(shape: str, seconds: dict[str, dict[str, list[float]]]) -> list[str]:
    first = next(iter(seconds.values()))
    first_medians = {p: statistics.median(first[p]) for p in PASSES}
    lines = [
        f"| {shape} | levers | forward+backward s (median) | speed vs first row | no-grad forward s (median) "
        "| speed vs first row |",
        "|---|---|---|---|---|---|",
    ]
    for name, per_pass in seconds.items():
        medians = {p: statistics.median(per_pass[p]) for p in PASSES}
        cells = [f"{medians[p]:.4f} | {kit.ratio(first_medians[p], medians[p])}" for p in PASSES]
        lines.append(f"| {name} | {network_variants()[name].describe()} | {' | '.join(cells)} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = kit.parser(__doc__, kit.device_option(), kit.threads_option())
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=list(SHAPES))
    parser.add_argument("--batch", type=int, default=256, help="images per forward+backward (default 256)")
    parser.add_argument("--real-batch", type=int, default=1024, help="images per no-grad forward (default 1024)")
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds (default 7)")
    parser.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32",
                        help="fp32, or autocast to bf16/fp16 (default fp32)")
    parser.add_argument("--json-out", type=Path, help="also write the seconds of every round here")
    args = parser.parse_args(argv)
    kit.set_threads(args.threads)
    device = torch.device(args.device)

    started = time.perf_counter()
    results = {shape: measure(shape, args, device) for shape in args.shapes}
    lines = [
        f"Command: `{kit.command_line(SCRIPT, argv)}` ({(time.perf_counter() - started) / 60:.1f} min, "
        f"{time.strftime('%Y-%m-%d')}).",
        f"Machine: {kit.describe_machine(device).summary()}. Precision: {args.precision}; "
        f"forward+backward on {args.batch} images, no-grad forward on {args.real_batch}; {args.rounds} rounds.",
        "",
    ]
    for shape, seconds in results.items():
        lines += [*table(shape, seconds), ""]
    print("\n".join(lines))
    if args.json_out is not None:
        kit.write_json(args.json_out, {"device": str(device), "precision": args.precision, "seconds": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
