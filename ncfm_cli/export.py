"""``ncfm export``: write a synthetic set as images or arrays other tools read."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from ncfm_cli.options import CommandJsonOption, RefArgument
from ncfm_cli.output import command_errors, global_options, print_json, print_pairs
from ncfm_core.export import EXPORT_FORMATS
from ncfm_core.jobs import export_job

ExportFormat = Enum("ExportFormat", {fmt: fmt for fmt in EXPORT_FORMATS}, type=str)

EXPORT_EPILOG = (
    "Formats: png (one PNG per image in a folder per class), grid (one labelled grid.png), "
    "imagefolder (train/<index>_<class>/ for torchvision ImageFolder), pt (torch file with "
    "images, labels, class_names, factor), npz (NumPy archive, loads with allow_pickle=False). "
    "imagefolder, pt and npz write the decoded training images unless --stored; a README.txt and "
    "ncfm-export.json beside them say which. "
    "Exit codes: 0 ok; 1 failure (e.g. a corrupt synset.safetensors); 2 invalid option; 3 not found."
)


def export_command(
    ctx: typer.Context,
    ref: RefArgument,
    fmt: Annotated[ExportFormat, typer.Option("--format", help="Output format.", show_default=False)],
    out: Annotated[Path, typer.Option("--out", file_okay=False, show_default=False,
                                      help="Output directory (created; same-named files are replaced).")],
    decoded: Annotated[Optional[bool], typer.Option(
        "--decoded/--stored", show_default=False,
        help="--decoded: the training images (each stored image decoded into factor x factor images); "
        "--stored: the stored images, tiles side by side. Default: decoded for imagefolder, pt and npz, "
        "stored for png and grid.",
    )] = None,
    json_flag: CommandJsonOption = False,
) -> None:
    """Write the synthetic images of REF to a directory, as images or arrays.

    Example, per-class PNG folders a person can look through:

        ncfm export digits-ipc10 --format png --out synthetic/
    """
    opts = global_options(ctx, json_flag)
    with command_errors(opts):
        result = export_job(opts.open_store(), ref, ExportFormat(fmt).value, out, decoded=decoded)
    if opts.json:
        print_json(result)
    else:
        print_pairs([
            ("artifact", result["artifact"]),
            ("format", result["format"]),
            ("images", f"{result['images']} {result['form']}"
                       + (" (training images)" if result["decoded"] else " (tiles not decoded)")),
            ("files", len(result["files"])),
            ("out", result["out"]),
        ])
