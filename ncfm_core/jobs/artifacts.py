"""``ncfm export``, ``ncfm inspect``, ``ncfm ls``: reading what the store holds."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ncfm_core.export import decoded_by_default, export_synset
from ncfm_core.jobs.common import config_from_record, open_complete_synset
from ncfm_core.jobs.run import shown_status
from ncfm_core.store import ArtifactVersion, RunRecord, Store, Timings, atomic_write_bytes, write_json

EXPORT_INFO_FILE = "ncfm-export.json"
EXPORT_README_FILE = "README.txt"


def export_job(
    store: Store,
    ref: str,
    fmt: str,
    out_dir: Path | str,
    *,
    decoded: bool | None = None,
) -> dict[str, Any]:
    """Write the synthetic set of ``ref`` under ``out_dir`` in format ``fmt`` (see
    ``ncfm_core.export``; ``decoded=None``: decoded for the training formats imagefolder, pt and
    npz, stored for png and grid), plus ``ncfm-export.json`` and ``README.txt`` saying what was
    written (form, image count, factor, class names, the normalisation the networks used).
    Returns ``{artifact, path, format, decoded, form, images, factor, mean, std, out, files}``."""
    version, _, synset = open_complete_synset(store, ref)
    decoded = decoded_by_default(fmt) if decoded is None else decoded
    out = Path(out_dir)
    files = export_synset(synset.images, synset.labels, synset.class_names, out, fmt,
                          factor=synset.factor, decoded=decoded)
    factor = 1 if decoded or synset.factor == 1 else synset.factor
    count = int(synset.images.shape[0]) * (synset.factor**2 if decoded else 1)
    info = {
        "artifact": version.ref,
        "format": fmt,
        "decoded": decoded,
        "form": "decoded" if decoded else "stored",
        "images": count,
        "factor": factor,
        "class_names": list(synset.class_names),
        "mean": None if synset.mean is None else list(synset.mean),
        "std": None if synset.std is None else list(synset.std),
    }
    write_json(out / EXPORT_INFO_FILE, info)
    atomic_write_bytes(out / EXPORT_README_FILE, _export_readme(info, synset.factor).encode())
    return {**info, "path": str(version.path), "out": str(out.absolute()), "files": [str(f) for f in files]}


def _export_readme(info: dict[str, Any], stored_factor: int) -> str:
    if info["decoded"]:
        form = (f"DECODED training images: each stored image ({stored_factor} x {stored_factor} tiles) became "
                f"{stored_factor**2} images, upsampled to full size; train on these." if stored_factor > 1
                else "training images (this artifact has no multi-formation: stored = decoded).")
    else:
        form = (f"STORED images: each holds {stored_factor} x {stored_factor} tiles; decode before training "
                f"(ncfm export --decoded, or ncfm_core.open_synthetic)." if stored_factor > 1
                else "stored images (no multi-formation: stored = decoded).")
    norm = ("networks normalise [0, 1] pixels with mean " + ", ".join(f"{v:.4f}" for v in info["mean"])
            + " and std " + ", ".join(f"{v:.4f}" for v in info["std"])) if info["mean"] else \
        "normalisation: not recorded (artifact made before ncfm recorded it)"
    return (f"{info['artifact']}, exported by ncfm as {info['format']}\n"
            f"{info['images']} {form}\n"
            f"pixels in [0, 1] (PNG: 0..255); {norm}\n"
            f"details: {EXPORT_INFO_FILE}\n")


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
