"""Options shared by several commands, declared once as ``Annotated`` aliases.

A command writes ``device: DeviceOption = "auto"``; the alias carries the flag name and help,
the default stays visible in the signature.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

# -- global options (the app callback) ------------------------------------------------------

StoreOption = Annotated[
    Optional[Path],
    typer.Option(
        "--store",
        help="Artifact store directory. Default: $NCFM_HOME, else the user data directory.",
        file_okay=False,
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
DeviceOption = Annotated[
    str,
    typer.Option("--device", help="auto, cpu, cuda, cuda:N or mps. auto prefers CUDA, then MPS, then CPU."),
]
DataDirOption = Annotated[
    Optional[Path],
    typer.Option(
        "--data-dir",
        help="Where the dataset lives (default: $NCFM_DATA_DIR, else the user cache directory).",
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
                 "CutMix, random resized crop) or dsa (DC/DSA/DM's SGD). Default ncfm.", show_default=False),
]
EvalRepeatsOption = Annotated[
    Optional[int],
    typer.Option("--repeats", min=1, help="Fresh networks to train (default 3).", show_default=False),
]
EvalEpochsOption = Annotated[
    Optional[int],
    typer.Option("--epochs", min=0, help="Training epochs per network (default 300).", show_default=False),
]
EvalModelOption = Annotated[
    Optional[str],
    typer.Option("--model", help="Network to train, e.g. convnet, alexnet, vgg11 (default convnet).",
                 show_default=False),
]
EvalLrOption = Annotated[
    Optional[float],
    typer.Option("--lr", help="Learning rate of the evaluation networks (default 0.001).",
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
