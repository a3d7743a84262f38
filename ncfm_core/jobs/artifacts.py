"""``ncfm export``, ``ncfm inspect``, ``ncfm ls``: reading what the store holds."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ncfm_core.errors import ConfigError, NcfmError, one_line, storage_error
from ncfm_core.export import (
    EXPORT_FORMATS,
    check_export_target,
    decoded_by_default,
    export_record,
    export_synset,
)
from ncfm_core.jobs.common import config_from_record, open_complete_synset
from ncfm_core.jobs.run import shown_status
from ncfm_core.store import (
    CHECKPOINT_RELPATH,
    SAMPLER_FILE,
    SYNSET_FILE,
    ArtifactVersion,
    RunRecord,
    Store,
    Timings,
    file_sha256,
)


def export_job(
    store: Store,
    ref: str,
    fmt: str,
    out_dir: Path | str,
    *,
    decoded: bool | None = None,
    replace: bool = False,
) -> dict[str, Any]:
    """Write the synthetic set of ``ref`` into the folder ``out_dir`` in format ``fmt`` (see
    ``ncfm_core.export``; ``decoded=None``: decoded for the training formats imagefolder, pt and
    npz, stored for png and grid), plus ``ncfm-export.json`` and ``README.txt`` saying what was
    written (form, image count, factor, class names, the normalisation the networks used).
    ``out_dir`` must be new or empty, or hold an earlier ncfm export and ``replace`` be set (it is
    then replaced whole); checked before anything is read. Returns ``{artifact, path, format,
    decoded, form, images, stored_images, factor, class_names, mean, std, out, files,
    replaced}`` (``replaced``: the record of the export it replaced, or None)."""
    if fmt not in EXPORT_FORMATS:
        raise ConfigError(f"unknown export format {fmt!r}; choose one of: {', '.join(EXPORT_FORMATS)}")
    replaced = check_export_target(out_dir, replace)
    version, _, synset = open_complete_synset(store, ref)
    decoded = decoded_by_default(fmt) if decoded is None else decoded
    extra = {"artifact": version.ref, "mean": None if synset.mean is None else list(synset.mean),
             "std": None if synset.std is None else list(synset.std)}
    files = export_synset(synset.images, synset.labels, synset.class_names, out_dir, fmt,
                          factor=synset.factor, decoded=decoded, replace=replace, info=extra)
    info = export_record(fmt, int(synset.images.shape[0]), synset.factor, decoded, synset.class_names, extra)
    return {**info, "path": str(version.path), "out": str(Path(out_dir).expanduser().absolute()),
            "files": [str(f) for f in files], "replaced": replaced}


VERIFIED_FILES = (SYNSET_FILE, SAMPLER_FILE, CHECKPOINT_RELPATH)
"""The files a complete version records the sha256 of."""


def _checked_file(version: ArtifactVersion, relpath: str, expected: str | None) -> dict[str, Any]:
    """One file of ``version`` against the sha256 its manifest recorded: ``{status, sha256,
    expected, reason}``, status one of ok, changed, missing, unreadable, not recorded."""
    entry: dict[str, Any] = {"status": "ok", "sha256": None, "expected": expected, "reason": None}
    parts = Path(relpath).parts
    if Path(relpath).is_absolute() or ".." in parts or not parts:  # a manifest must not point outside
        return {**entry, "status": "unreadable", "reason": "not a path inside the version folder"}
    try:
        entry["sha256"] = file_sha256(version.path / relpath)
    except NcfmError as err:
        missing = type(err).__name__ == "NotFoundError"
        return {**entry, "status": "missing" if missing else "unreadable", "reason": one_line(err)}
    except OSError as err:
        return {**entry, "status": "unreadable", "reason": one_line(storage_error(err))}
    if expected is None:
        return {**entry, "status": "not recorded", "reason": "the manifest records no sha256 for it (an older ncfm)"}
    if entry["sha256"] != expected:
        return {**entry, "status": "changed", "reason": "its sha256 differs from the one recorded when it was written"}
    return entry


def verify_job(store: Store, ref: str) -> dict[str, Any]:
    """Check every file of ``ref`` whose sha256 its manifest records (the synthetic set, the
    sampler, the checkpoint; every one, read whole, whether or not a command would load it), plus
    those a complete version should have. Returns ``{artifact, path, status, ok, files: {path:
    {status, sha256, expected, reason}}, problems: [line, ...]}``; ``ok`` is False when a file is
    changed, missing or unreadable ("not recorded": a version from before hashes, not a
    problem). Raises only for what stops the check itself (no such version, a damaged manifest)."""
    version = store.resolve(ref)
    record = version.record()
    recorded = dict(record.sha256)
    expected_files = VERIFIED_FILES if record.status == "complete" else ()
    names = sorted(set(recorded) | set(expected_files))
    files = {name: _checked_file(version, name, recorded.get(name)) for name in names}
    problems = [f"{version.path / name}: {entry['status']} ({entry['reason']})"
                for name, entry in files.items() if entry["status"] not in ("ok", "not recorded")]
    return {"artifact": version.ref, "path": str(version.path), "status": record.status,
            "ok": not problems, "files": files, "problems": problems}


def _file_sizes(directory: Path) -> dict[str, int]:
    sizes = {}
    for path in sorted(directory.rglob("*")):
        relative = path.relative_to(directory)
        if path.is_file() and not any(part.startswith(".") for part in relative.parts) and not path.name.endswith(".tmp"):
            sizes[relative.as_posix()] = path.stat().st_size
    return sizes


@dataclass(frozen=True)
class Inspection:
    """What ``ncfm inspect`` shows: a version's record, the status to show (see
    :func:`~ncfm_core.jobs.run.shown_status`; a run whose process died is recorded "running"
    and shown "interrupted") with a hint on how to continue it, its files' sizes (path relative
    to the version directory -> bytes) and the picture drawn, if any."""

    artifact: str
    path: Path
    record: RunRecord
    status: str
    hint: str | None
    file_sizes: dict[str, int]
    plot: Path | None = None

    def to_json(self) -> dict[str, Any]:
        """The record as its manifest's JSON (``RunRecord.to_json``: older layouts come migrated)
        plus ``artifact``, ``path``, ``file_sizes``; ``status`` is the shown one, with
        ``recorded_status`` when they differ, ``hint`` and ``plot`` when there are."""
        result = self.record.to_json()
        result.update(artifact=self.artifact, path=str(self.path), file_sizes=self.file_sizes)
        if self.status != self.record.status:
            result.update(status=self.status, recorded_status=self.record.status)
        if self.hint is not None:
            result["hint"] = self.hint
        if self.plot is not None:
            result["plot"] = str(self.plot)
        return result


def inspect_job(store: Store, ref: str, *, plot: Path | str | None = None) -> Inspection:
    """The :class:`Inspection` of ``ref``. With ``plot``, also a PNG there of the loss curve beside
    the synthetic images (``ncfm_core.plot.run_figure``; needs a complete version and matplotlib)."""
    version = store.resolve(ref)
    record = version.record()
    status, hint = shown_status(store, version, record)
    drawn = None
    if plot is not None:
        from ncfm_core.plot import run_figure  # lazy: matplotlib is optional

        _, record, synset = open_complete_synset(store, ref)
        run_figure(version.ref, record.loss_curve, synset.images, synset.labels, synset.class_names, plot)
        drawn = Path(plot).absolute()
    return Inspection(version.ref, version.path, record, status, hint, _file_sizes(version.path), drawn)


def _dataset_and_ipc(version: ArtifactVersion, record: RunRecord, warnings: list[str]) -> tuple[Any, Any]:
    """What ``ls`` shows of a version's config, read as leniently as ``ls`` reads everything (the
    config's own fields, ``config.DistillConfig``, even from a config this ncfm would not run)."""
    if not record.config:
        warnings.append(f"{version.ref}: {version.manifest_path} has no config; not an ncfm distillation?")
    return record.config.get("dataset"), record.config.get("ipc")


def list_job(store: Store) -> dict[str, Any]:
    """Every version in the store: ``{"store", "artifacts": [row, ...], "warnings": [str, ...]}``; a
    row is ``{artifact, name, version, status (as shown_status says), hint (how to continue an
    interrupted run, else None), dataset, ipc, iterations_done, iterations_target, accuracy (last
    eval's mean or None), evals, created, path}``. Unreadable versions become warnings instead of
    errors."""
    found, warnings = store.scan()
    rows = []
    for version, record in found:
        dataset, ipc = _dataset_and_ipc(version, record, warnings)
        status, hint = shown_status(store, version, record)
        rows.append({
            "artifact": version.ref,
            "name": version.name,
            "version": version.version,
            "status": status,
            "hint": hint,
            "dataset": dataset,
            "ipc": ipc,
            "iterations_done": record.iterations_done,
            "iterations_target": record.iterations_target,
            "accuracy": record.last_accuracy,
            "evals": len(record.evals),
            "created": record.created,
            "path": str(version.path),
        })
    return {"store": str(store.root), "artifacts": rows, "warnings": warnings}


def artifact_summary(version: ArtifactVersion) -> dict[str, Any]:
    """What ``ncfm distill`` / ``ncfm resume`` report: ``{artifact, path, status, iterations,
    iterations_target, seconds, seconds_per_iteration (median of the last session), device,
    peak_memory_bytes, peak_memory_source, peak_memory, plan, flops_per_iteration, dataset, ipc,
    parent, pool_cached}`` (``peak_memory``, ``plan`` and ``flops_per_iteration`` are None for
    versions made before memory plans)."""
    record = version.record()
    timings = record.timings or Timings()
    config = config_from_record(version, record)
    return {
        "artifact": version.ref,
        "path": str(version.path),
        "status": record.status,
        "iterations": record.iterations_done,
        "iterations_target": record.iterations_target,
        "seconds": None if record.timings is None else timings.seconds,
        "seconds_per_iteration": timings.seconds_per_iteration_median,
        "device": record.device,
        "peak_memory_bytes": record.peak_memory_bytes,
        "peak_memory_source": record.peak_memory_source,
        "peak_memory": None if record.peak_memory is None else record.peak_memory.to_json(),
        "plan": None if record.plan is None else record.plan.to_json(),
        "flops_per_iteration": record.flops_per_iteration,
        "dataset": config.dataset,
        "ipc": config.ipc,
        "parent": record.parent,
        "pool_cached": None if record.pool is None else record.pool.cached,
    }
