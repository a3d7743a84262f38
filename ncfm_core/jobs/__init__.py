"""Jobs: what the ``ncfm`` commands do, as plain functions over a :class:`~ncfm_core.store.Store`.

One module per command, mirroring ``ncfm_cli/``: :mod:`~ncfm_core.jobs.distill`,
:mod:`~ncfm_core.jobs.resume` (both run the loop through :mod:`~ncfm_core.jobs.run`),
:mod:`~ncfm_core.jobs.eval`, :mod:`~ncfm_core.jobs.plan` (``--dry-run``) and
:mod:`~ncfm_core.jobs.artifacts` (export, inspect, ls). :mod:`~ncfm_core.jobs.events` holds the
progress events every job emits, :mod:`~ncfm_core.jobs.common` what several jobs share.

Each job validates its input, resolves its values once (the device, at the boundary that
:func:`ncfm_core.parallel.ranked_job` draws around distill, resume and eval), does the work,
records it in the artifact's manifest and returns a value the command line renders.
"""

from ncfm_core.jobs.artifacts import Inspection, artifact_summary, export_job, inspect_job, list_job
from ncfm_core.jobs.distill import default_artifact_name, distill_job
from ncfm_core.jobs.eval import BASELINE_KINDS, eval_job, eval_request, pending_eval_job, requested_eval
from ncfm_core.jobs.events import JobCallback, JobInterrupted
from ncfm_core.jobs.plan import make_plan, plan_job
from ncfm_core.jobs.resume import resume_job
from ncfm_core.jobs.run import DEFAULT_CHECKPOINT_EVERY

__all__ = [
    "BASELINE_KINDS",
    "DEFAULT_CHECKPOINT_EVERY",
    "Inspection",
    "JobCallback",
    "JobInterrupted",
    "artifact_summary",
    "default_artifact_name",
    "distill_job",
    "eval_job",
    "eval_request",
    "export_job",
    "inspect_job",
    "list_job",
    "make_plan",
    "pending_eval_job",
    "plan_job",
    "requested_eval",
    "resume_job",
]
