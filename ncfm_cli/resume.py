"""``ncfm resume``: continue an interrupted distillation, or extend a finished one."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from ncfm_cli.distill import report_version
from ncfm_cli.options import (
    CommandJsonOption,
    DataDirOption,
    DeviceOption,
    GpuMemOption,
    ResumeRefArgument,
)
from ncfm_cli.output import command_errors, global_options, job_progress
from ncfm_core.jobs import resume_job

RESUME_EPILOG = (
    "REF may be a bare NAME: resume then takes its newest version, whatever its status. "
    "On CPU with the same seed, a resumed run ends with exactly the images of an uninterrupted one. "
    "A resumed run keeps the memory plan it was made with; --gpu-mem SIZE (2.5G, 800M: K, M, G are "
    "powers of 1024; or 0.3 of the device) only re-caps the allocator, and the budget recorded by "
    "`ncfm distill --gpu-mem` applies again when it is left out. "
    "Exit codes: 0 ok (also when there is nothing to do); 1 failure (e.g. a corrupt checkpoint); "
    "2 invalid option; 3 artifact not found; 4 --gpu-mem below the recorded plan's estimate, or out "
    "of memory under it (the checkpoint is kept); 6 the artifact's lock held by another process past "
    "--lock-timeout; 7 the file system refused (permission, read-only, disk full); 130 (Ctrl-C) or 143 "
    "(SIGTERM) interrupted again (resume again)."
)


def resume_command(
    ctx: typer.Context,
    ref: ResumeRefArgument,
    iterations: Annotated[
        Optional[int],
        typer.Option(
            "--iterations",
            min=0,
            show_default=False,
            help="New target. For an unfinished run it replaces the target; for a complete one, a larger "
            "number continues it into a new version (its parent is REF).",
        ),
    ] = None,
    device: DeviceOption = "auto",
    data_dir: DataDirOption = None,
    gpu_mem: GpuMemOption = None,
    json_flag: CommandJsonOption = False,
) -> None:
    """Continue a distillation from its last checkpoint (after Ctrl-C, a crash or a kill).

    Example, after `ncfm distill digits --ipc 10` was stopped:

        ncfm resume digits-ipc10
    """
    opts = global_options(ctx, json_flag)
    with command_errors(opts):
        with job_progress(opts) as progress:
            version = resume_job(
                opts.open_store(), ref, iterations=iterations, device=device,
                data_dir=None if data_dir is None else str(data_dir), callback=progress, gpu_mem=gpu_mem,
            )
    report_version(opts, version)
