"""Options shared by several commands, declared once as ``Annotated`` aliases.

A command writes ``device: DeviceOption = "auto"``; the alias carries the flag name and help,
the default stays visible in the signature.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer


def folder_path(text: str) -> Path:
    """A folder option's value as a path; an empty one is a usage error (``Path("")`` would
    silently mean the current folder)."""
    if not str(text).strip():
        raise typer.BadParameter("is an empty path; give a folder")
    return Path(text)


# -- global options (the app callback) ------------------------------------------------------

StoreOption = Annotated[
    Optional[Path],
    typer.Option(
        "--store",
        help="Artifact store directory. Default: $NCFM_HOME, else the user data directory.",
        parser=folder_path,
        metavar="DIR",
        show_default=False,
    ),
]
LockTimeoutOption = Annotated[
    Optional[float],
    typer.Option(
        "--lock-timeout",
        metavar="SECONDS",
        help="How long to wait for an artifact's lock held by another ncfm process before giving up with exit "
        "code 6 (who holds it is said every 10 s). Default: $NCFM_LOCK_TIMEOUT, else 120.",
        show_default=False,
    ),
]
JsonOption = Annotated[
    bool,
    typer.Option("--json", help="Print exactly one JSON object on stdout; no progress bars."),
]
QuietOption = Annotated[
    bool,
    typer.Option("--quiet", "-q", help="Only results and errors: no progress and no log lines."),
]
VerboseOption = Annotated[
    bool,
    typer.Option("--verbose", "-v", help="More log lines on stderr (periodic progress when there is no terminal)."),
]

# -- shared by commands ---------------------------------------------------------------------

RefArgument = Annotated[
    str,
    typer.Argument(
        metavar="REF",
        help="An artifact: NAME (its latest complete version), NAME@vN, or a path to a version directory.",
        show_default=False,
    ),
]
ResumeRefArgument = Annotated[
    str,
    typer.Argument(
        metavar="REF",
        help="The run to continue: NAME (its newest version, whatever its status), NAME@vN, or a path to a "
        "version directory.",
        show_default=False,
    ),
]
DeviceOption = Annotated[
    str,
    typer.Option("--device", help="auto, cpu, cuda, cuda:N or mps. auto prefers CUDA, then MPS, then CPU."),
]
DataDirOption = Annotated[
    Optional[Path],
    typer.Option(
        "--data-dir",
        help="Where the dataset lives (default: $NCFM_DATA_DIR, else the user cache directory).",
        parser=folder_path,
        metavar="DIR",
        show_default=False,
    ),
]
GpuMemOption = Annotated[
    Optional[str],
    typer.Option(
        "--gpu-mem",
        metavar="SIZE",
        help="Memory budget: 2.5G or 800M (K, M, G, T are powers of 1024; KB, MB, GB of 1000) or a "
        "fraction of the device such as 0.3. Caps the CUDA allocator and plans the run to fit it; "
        "exit code 4 if even the smallest plan does not. Without it a GPU run takes the smallest plan "
        "within ~10% of the fastest estimated time; 'all' takes the fastest plan that fits the free memory.",
        show_default=False,
    ),
]
IterationsOption = Annotated[
    Optional[int],
    typer.Option("--iterations", min=0, help="Distillation iterations (default: the dataset's preset).",
                 show_default=False),
]

# evaluation protocol
EvalProtocolOption = Annotated[
    Optional[str],
    typer.Option("--protocol", help="Named protocol the options below start from: ncfm (the authors': AdamW, "
                 "CutMix, random resized crop, width 128, 300 epochs), dsa (DC/DSA/DM's SGD) or quick (ncfm's "
                 "AdamW without CutMix and crop, width 64, 100 epochs: seconds on a CPU). Default: the dataset's, "
                 "quick for digits and mnist5k, ncfm for the others.", show_default=False),
]
EvalRepeatsOption = Annotated[
    Optional[int],
    typer.Option("--repeats", min=1, help="Fresh networks to train (default 3).", show_default=False),
]
EvalEpochsOption = Annotated[
    Optional[int],
    typer.Option("--epochs", min=0, help="Training epochs per network (default: the protocol's, 300 for ncfm "
                 "and dsa, 100 for quick).", show_default=False),
]
EvalModelOption = Annotated[
    Optional[str],
    typer.Option("--model", help="Network to train, e.g. convnet, alexnet, vgg11 (default convnet).",
                 show_default=False),
]
EvalLrOption = Annotated[
    Optional[float],
    typer.Option("--lr", help="Learning rate of the evaluation networks (default: the protocol's, 0.001 for ncfm, "
                 "0.01 for dsa, 0.001 for quick).",
                 show_default=False),
]
EvalSeedOption = Annotated[
    Optional[int],
    typer.Option("--seed", help="Seed of the first evaluation network; repeat r uses seed + r (default 0).",
                 show_default=False),
]
MinAccOption = Annotated[
    Optional[float],
    typer.Option(
        "--min-acc",
        help="Exit with code 5 (after printing the result) when the mean accuracy, a fraction in "
        "[0, 1], is below this.",
        show_default=False,
    ),
]
CommandJsonOption = Annotated[
    bool,
    typer.Option("--json", help="Same as the global --json: print exactly one JSON object on stdout."),
]

# evaluation suite (ncfm eval): every protocol knob, baselines, soft labels
EvalModelsOption = Annotated[
    Optional[list[str]],
    typer.Option("--model", help="Network to train: convnet, alexnet, vgg11, resnet18, ... Repeat it for a "
                 "cross-architecture evaluation, one result per model (default convnet).", show_default=False),
]
EvalWidthOption = Annotated[
    Optional[int],
    typer.Option("--width", min=1, help="ConvNet width of the evaluation networks (default: the protocol's, 64 "
                 "for quick, else 128; smaller is faster). Other networks ignore it.", show_default=False),
]
EvalBatchSizeOption = Annotated[
    Optional[int],
    typer.Option("--batch-size", min=1, help="Training batch size (default: the protocol's, 128 or 256).",
                 show_default=False),
]
EvalOptimizerOption = Annotated[
    Optional[str],
    typer.Option("--optimizer", help="adamw or sgd (default: the protocol's).", show_default=False),
]
EvalWeightDecayOption = Annotated[
    Optional[float],
    typer.Option("--weight-decay", min=0.0, help="Weight decay (default: the protocol's, 0.01 or 5e-4).",
                 show_default=False),
]
EvalMomentumOption = Annotated[
    Optional[float],
    typer.Option("--momentum", min=0.0, help="SGD momentum / AdamW beta1 (default 0.9).", show_default=False),
]
EvalCutmixOption = Annotated[
    Optional[float],
    typer.Option("--cutmix-prob", min=0.0, max=1.0, help="Probability that a batch gets CutMix (ncfm 0.5, "
                 "dsa and quick 0).", show_default=False),
]
EvalRrcOption = Annotated[
    Optional[bool],
    typer.Option("--rrc/--no-rrc", help="Random resized crop before DSA (ncfm on, dsa and quick off).",
                 show_default=False),
]
EvalRepeatModeOption = Annotated[
    Optional[str],
    typer.Option("--repeat-mode", help="How repeats train: auto (batched on CUDA when the network allows), "
                 "batched (vmapped together) or sequential. Same numbers up to rounding.", show_default=False),
]
EvalBestOverEpochsOption = Annotated[
    bool,
    typer.Option("--best-over-epochs", help="Also record the best test accuracy over epochs: TEST-SET MODEL "
                 "SELECTION, shown apart; the reported accuracy stays the final epoch's."),
]
EvalSoftLabelsOption = Annotated[
    bool,
    typer.Option("--soft-labels", help="Train against a teacher (a trained member of the artifact's pool): "
                 "T^2 * KL(teacher/T || student/T). Applies to the baselines too."),
]
EvalTemperatureOption = Annotated[
    Optional[float],
    typer.Option("--temperature", help="Soft-label temperature T > 0 (default 1; needs --soft-labels).",
                 show_default=False),
]
EvalTeacherMemberOption = Annotated[
    Optional[int],
    typer.Option("--teacher-member", min=0, help="Which pool member is the teacher (default 0; needs "
                 "--soft-labels).", show_default=False),
]
EvalBaselineOption = Annotated[
    Optional[list[str]],
    typer.Option("--baseline", help="random (a seeded random real subset of the same stored IPC: gives IOR) "
                 "or full (the whole training set, cached in the store: gives HLR); repeat for both (LRS).",
                 show_default=False),
]
EvalBaselineSeedOption = Annotated[
    int,
    typer.Option("--baseline-seed", help="Seed that draws the random real subset of --baseline random."),
]
