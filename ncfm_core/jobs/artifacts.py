"""``ncfm export``, ``ncfm inspect``, ``ncfm ls``: reading what the store holds."""

from __future__ import annotations

import math
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
from ncfm_core.jobs.common import open_complete_synset
from ncfm_core.jobs.run import shown_status
from ncfm_core.store import CHECKPOINT_RELPATH, SAMPLER_FILE, SYNSET_FILE, ArtifactVersion, Store, file_sha256


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
    manifest = version.manifest()
    recorded = dict(manifest.get("sha256") or {})
    expected_files = VERIFIED_FILES if manifest.get("status") == "complete" else ()
    names = sorted(set(recorded) | set(expected_files))
    files = {name: _checked_file(version, name, recorded.get(name)) for name in names}
    problems = [f"{version.path / name}: {entry['status']} ({entry['reason']})"
                for name, entry in files.items() if entry["status"] not in ("ok", "not recorded")]
    return {"artifact": version.ref, "path": str(version.path), "status": manifest.get("status"),
            "ok": not problems, "files": files, "problems": problems}


def _file_sizes(directory: Path) -> dict[str, int]:
    sizes = {}
    for path in sorted(directory.rglob("*")):
        relative = path.relative_to(directory)
        if path.is_file() and not any(part.startswith(".") for part in relative.parts) and not path.name.endswith(".tmp"):
            sizes[relative.as_posix()] = path.stat().st_size
    return sizes


def inspect_job(store: Store, ref: str, *, plot: Path | str | None = None) -> dict[str, Any]:
    """The manifest of ``ref`` plus ``artifact`` (name@vN), ``path`` and ``file_sizes``
    (path relative to the version directory -> bytes). With ``plot``, also a PNG there of the
    loss curve beside the synthetic images (``ncfm_core.plot.run_figure``; needs a complete
    version and matplotlib), and ``plot`` (its absolute path) in the result."""
    version = store.resolve(ref)
    result = dict(version.manifest())
    result.update(artifact=version.ref, path=str(version.path), file_sizes=_file_sizes(version.path))
    status, hint = shown_status(version, result)
    if hint is not None:
        result.update(status=status, recorded_status=result.get("status"), hint=hint)
    if plot is not None:
        from ncfm_core.plot import run_figure  # lazy: matplotlib is optional

        _, manifest, synset = open_complete_synset(store, ref)
        run_figure({**manifest, "artifact": version.ref}, synset.images, synset.labels, synset.class_names, plot)
        result["plot"] = str(Path(plot).absolute())
    return result


def _last_accuracy(manifest: dict) -> float | None:
    evals = manifest.get("evals")
    if not isinstance(evals, list) or not evals or not isinstance(evals[-1], dict):
        return None
    mean = (evals[-1].get("accuracy") or {}).get("mean")
    return float(mean) if isinstance(mean, (int, float)) and math.isfinite(mean) else None


def list_job(store: Store) -> dict[str, Any]:
    """Every version in the store: ``{"artifacts": [row, ...], "warnings": [str, ...]}``; a row is
    ``{artifact, name, version, status, dataset, ipc, iterations_done, iterations_target,
    accuracy (last eval's mean or None), evals, created, path}``. Unreadable versions become
    warnings instead of errors."""
    found, warnings = store.scan()
    rows = []
    for version, manifest in found:
        config = manifest.get("config") if isinstance(manifest.get("config"), dict) else {}
        if not config:
            warnings.append(f"{version.ref}: {version.manifest_path} has no config; not an ncfm distillation?")
        evals = manifest.get("evals")
        status, hint = shown_status(version, manifest)
        if hint is not None:
            warnings.append(hint)
        rows.append({
            "artifact": version.ref,
            "name": version.name,
            "version": version.version,
            "status": status,
            "dataset": config.get("dataset"),
            "ipc": config.get("ipc"),
            "iterations_done": manifest.get("iterations_done"),
            "iterations_target": manifest.get("iterations_target"),
            "accuracy": _last_accuracy(manifest),
            "evals": len(evals) if isinstance(evals, list) else 0,
            "created": manifest.get("created"),
            "path": str(version.path),
        })
    return {"store": str(store.root), "artifacts": rows, "warnings": warnings}


def artifact_summary(version: ArtifactVersion) -> dict[str, Any]:
    """What ``ncfm distill`` / ``ncfm resume`` report: ``{artifact, path, status, iterations,
    iterations_target, seconds, seconds_per_iteration (median of the last session), device,
    peak_memory_bytes, peak_memory_source, peak_memory, plan, flops_per_iteration, dataset, ipc,
    parent, pool_cached}`` (``peak_memory``, ``plan`` and ``flops_per_iteration`` are None for
    versions made before memory plans)."""
    manifest = version.manifest()
    timings = manifest.get("timings") if isinstance(manifest.get("timings"), dict) else {}
    config = manifest.get("config") if isinstance(manifest.get("config"), dict) else {}
    pool = manifest.get("pool") if isinstance(manifest.get("pool"), dict) else {}
    return {
        "artifact": version.ref,
        "path": str(version.path),
        "status": manifest.get("status"),
        "iterations": manifest.get("iterations_done"),
        "iterations_target": manifest.get("iterations_target"),
        "seconds": timings.get("seconds"),
        "seconds_per_iteration": timings.get("seconds_per_iteration_median"),
        "device": manifest.get("device"),
        "peak_memory_bytes": manifest.get("peak_memory_bytes"),
        "peak_memory_source": manifest.get("peak_memory_source"),
        "peak_memory": manifest.get("peak_memory"),
        "plan": manifest.get("plan"),
        "flops_per_iteration": manifest.get("flops_per_iteration"),
        "dataset": config.get("dataset"),
        "ipc": config.get("ipc"),
        "parent": manifest.get("parent"),
        "pool_cached": pool.get("cached"),
    }
