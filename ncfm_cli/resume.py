"""``ncfm resume``: continue an interrupted distillation, or extend a finished one."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from ncfm_cli.distill import report_version
from ncfm_cli.eval import fail_below_min_acc, fail_if_unsaved, kept_if_unsaved
from ncfm_cli.options import (
    CommandJsonOption,
    DataDirOption,
    DeviceOption,
    GpuMemOption,
    ResumeRefArgument,
)
from ncfm_cli.output import command_errors, error_object, global_options, job_progress, log
from ncfm_core.jobs import pending_eval_job, requested_eval, resume_job

RESUME_EPILOG = (
    "REF may be a bare NAME: resume then takes its newest version, whatever its status. "
    "When the run was made by `ncfm distill --eval`, the evaluation it asked for (its protocol, "
    "epochs, repeats, model and --min-acc) runs once the run is complete, also when only the "
    "evaluation was interrupted; --no-eval leaves it for later. "
    "On CPU with the same seed, a resumed run ends with exactly the images of an uninterrupted one. "
    "A resumed run keeps the memory plan it was made with; --gpu-mem SIZE (2.5G, 800M: K, M, G are "
    "powers of 1024; or 0.3 of the device) only re-caps the allocator, and the budget recorded by "
    "`ncfm distill --gpu-mem` applies again when it is left out. "
    "Exit codes: 0 ok (also when there is nothing to do); 1 failure (e.g. a corrupt checkpoint); "
    "5 the carried-over evaluation below its --min-acc; "
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
    no_eval: Annotated[bool, typer.Option(
        "--no-eval", help="Do not run the evaluation `ncfm distill --eval` asked for now (it stays pending: "
        "a later resume runs it).")] = False,
    json_flag: CommandJsonOption = False,
) -> None:
    """Continue a distillation from its last checkpoint (after Ctrl-C, a crash or a kill).

    Example, after `ncfm distill digits --ipc 10` was stopped:

        ncfm resume digits-ipc10
    """
    opts = global_options(ctx, json_flag)
    with command_errors(opts):
        store = opts.open_store()
        with job_progress(opts) as progress:
            version = resume_job(
                store, ref, iterations=iterations, device=device,
                data_dir=None if data_dir is None else str(data_dir), callback=progress, gpu_mem=gpu_mem,
            )
            request = pending_eval_job(store, version.ref, device)
            record, unsaved = None, None
            if request is not None and no_eval:
                log(opts, f"the evaluation `ncfm distill --eval` asked for is still to run; "
                          f"`ncfm {opts.store_flag()}resume {version.ref}` runs it")
            elif request is not None:  # under torchrun every rank joins: the repeats are spread
                record, unsaved = kept_if_unsaved(lambda: requested_eval(store, version, request, device, progress))
    min_acc = None if request is None else request.min_acc
    report_version(opts, version, eval_record=record, min_acc=min_acc,
                   extra=None if unsaved is None else error_object(unsaved))
    fail_if_unsaved(unsaved)
    if record is not None:
        fail_below_min_acc(record, min_acc)
