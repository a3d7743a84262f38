"""``ncfm export``: write a synthetic set as images or arrays other tools read."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from ncfm_cli.options import CommandJsonOption, RefArgument, folder_path
from ncfm_cli.output import command_errors, global_options, print_json, print_pairs
from ncfm_core.export import EXPORT_FORMATS
from ncfm_core.jobs import export_job

ExportFormat = Enum("ExportFormat", {fmt: fmt for fmt in EXPORT_FORMATS}, type=str)

EXPORT_EPILOG = (
    "Formats: png (one PNG per image in a folder per class), grid (one labelled grid.png), "
    "imagefolder (train/<index>_<class>/ for torchvision ImageFolder), pt (torch file with "
    "images, labels, class_names, factor), npz (NumPy archive, loads with allow_pickle=False). "
    "imagefolder, pt and npz write the decoded training images unless --stored; a README.txt and "
    "ncfm-export.json beside them say which. The export is written beside --out and moved into place "
    "whole: --out must be new or empty, or hold an earlier ncfm export and --replace be given (it is "
    "then replaced whole, never merged into). A symbolic link to a folder exports into that folder. "
    "Exit codes: 0 ok; 1 failure (e.g. a corrupt synset.safetensors); 2 invalid option (also --out not "
    "empty without --replace); 3 not found; 7 the file system refused (permission, read-only, full)."
)


def export_command(
    ctx: typer.Context,
    ref: RefArgument,
    fmt: Annotated[ExportFormat, typer.Option("--format", help="Output format.", show_default=False)],
    out: Annotated[Path, typer.Option("--out", parser=folder_path, metavar="DIR", show_default=False,
                                      help="Output folder: new or empty (created), or an earlier ncfm export with "
                                      "--replace.")],
    decoded: Annotated[Optional[bool], typer.Option(
        "--decoded/--stored", show_default=False,
        help="--decoded: the training images (each stored image decoded into factor x factor images); "
        "--stored: the stored images, tiles side by side. Default: decoded for imagefolder, pt and npz, "
        "stored for png and grid.",
    )] = None,
    replace: Annotated[bool, typer.Option(
        "--replace", help="Replace the earlier ncfm export in --out, whole (a folder holding anything else is "
        "never replaced).")] = False,
    json_flag: CommandJsonOption = False,
) -> None:
    """Write the synthetic images of REF to a directory, as images or arrays.

    Example, per-class PNG folders a person can look through:

        ncfm export digits-ipc10 --format png --out synthetic/
    """
    opts = global_options(ctx, json_flag)
    with command_errors(opts):
        result = export_job(opts.open_store(), ref, ExportFormat(fmt).value, out, decoded=decoded, replace=replace)
    if opts.json:
        print_json(result)
    else:
        replaced = result["replaced"]
        print_pairs([
            ("artifact", result["artifact"]),
            ("format", result["format"]),
            ("images", f"{result['images']} {result['form']}"
                       + (" (training images)" if result["decoded"] else " (tiles not decoded)")),
            ("files", len(result["files"])),
            ("out", result["out"]),
            *([("replaced", f"the earlier export of {replaced.get('artifact', 'unknown')} "
                            f"({replaced.get('format')}, {replaced.get('images')} images)")] if replaced else []),
        ])
