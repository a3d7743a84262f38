"""A run's record: what a version's ``manifest.json`` holds, as frozen dataclasses, and the one
place it is read, validated, migrated from older layouts and written.

Every part is a :class:`Part`: a frozen dataclass whose field names are the JSON keys, read and
written by one generic walker over the fields' type hints, so a new field is one line in its
class (plus its display; docs/architecture.md, "How to add a record field"). Keys this ncfm
does not know (written by a newer one) are kept in the part's ``extra`` and written back as they
were, so an older ncfm updating a record never drops what a newer one recorded.

Reading validates every field's type and turns anything malformed into a one-line
:class:`~ncfm_core.errors.CorruptArtifactError` naming the field and the file; writing checks
that what it writes reads back, then writes atomically (``store.files``).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, TypeVar

from ncfm_core.errors import CorruptArtifactError
from ncfm_core.store.files import read_json, write_json

SCHEMA_VERSION = 2
"""The layout of ``manifest.json``, written into every file as ``schema_version``.

- 1: every manifest written before this field existed (read as 1 when it is absent). A run
  stopped by Ctrl-C or SIGTERM was status "failed" with ``interrupted: true``.
- 2: status "interrupted" of its own (``interrupted`` is still written, derived from it, for
  readers of the old layout); ``timings.per_session``; ``pending_eval``.
"""

KIND = "ncfm-synset"
STATUSES = ("running", "complete", "failed", "interrupted")
"""A version's recorded status. "running": a process is distilling it, or one died without a word
(``jobs.run.shown_status`` tells the two apart); "interrupted": stopped by Ctrl-C or SIGTERM after a
checkpoint; "failed": an error stopped it (``error`` says which). Only "complete" has results."""

MAX_RECORD_BYTES = 16 * 2**20
"""The largest manifest read: ncfm's own stay far below (kilobytes, plus a record per eval);
a larger file is damaged or not ours, and is refused before it is read (or rewritten) whole."""

PEAK_MEMORY_SOURCES = {
    "cuda_max_memory_reserved": "CUDA peak reserved",
    "cuda_max_memory_allocated": "CUDA peak allocated",  # versions made before reserved bytes were recorded
    "process_peak_rss": "process peak RSS",
    "mps_driver_allocated": "MPS driver allocated, not a peak",
    "unavailable": "not measured",
}
"""What each ``peak_memory_source`` measures, in words (the one rendering of the field)."""


def describe_peak_source(source: str | None) -> str:
    """``peak_memory_source`` in words; an unknown code (a newer ncfm's) as it is."""
    return PEAK_MEMORY_SOURCES.get(str(source), str(source))


SIGNED = "signed"
Seed = Annotated[int, SIGNED]
"""An int that may be negative (a seed); every other int of the record is a count, >= 0."""


class _Malformed(Exception):
    """A field of the wrong type or value: the reason, without the file (added by the reader)."""


# ----------------------------------------------------------------------------- the parts

P = TypeVar("P", bound="Part")


@dataclass(frozen=True, kw_only=True)
class Part:
    """A JSON object of the record. ``extra``: the keys this ncfm does not know, kept as read."""

    extra: Mapping[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_json(cls: type[P], obj: Any, source: str = "record") -> P:
        """Parse and validate ``obj`` (parsed JSON); ``CorruptArtifactError`` naming ``source`` and
        the field when it does not fit."""
        try:
            return _parse_part(cls, obj, "")
        except _Malformed as err:
            raise CorruptArtifactError(f"{source}: {err}") from None

    def to_json(self) -> dict[str, Any]:
        """The JSON object (known fields over ``extra``)."""
        return _to_json(self)

    def replace(self: P, **changes: Any) -> P:
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True, kw_only=True)
class Normalization(Part):
    """What the networks apply to [0, 1] pixels, ``(x - mean) / std``, one value per channel."""

    mean: tuple[float, ...]
    std: tuple[float, ...]


@dataclass(frozen=True, kw_only=True)
class DatasetRecord(Part):
    """The data a run was distilled from; ``fingerprint`` is the sha256 of the data as loaded."""

    name: str
    fingerprint: str
    num_classes: int
    image_size: int
    channels: int
    class_names: tuple[str, ...]
    num_train: int
    num_test: int
    normalization: Normalization | None = None  # None: made before ncfm recorded it


@dataclass(frozen=True, kw_only=True)
class BackendRecord(Part):
    """The process-wide settings a plan carries (``ncfm_core.runtime.BackendSettings``)."""

    allocator_conf: str | None = None
    allocator_chosen_by: str = ""
    allocator_applied: str = ""
    cudnn_benchmark: bool = False
    cudnn_benchmark_chosen_by: str = ""
    cudnn_benchmark_limit: int = 10


@dataclass(frozen=True, kw_only=True)
class PlanRecord(Part):
    """The memory plan a run used, as ``memory_model.Plan.to_dict()`` recorded it."""

    real_chunk: int
    class_chunk: int
    precision: str
    activation_checkpointing: bool
    budget_bytes: int | None = None
    estimated_peak_bytes: int
    device: str
    budget_source: str = ""
    estimate_terms: Mapping[str, float] = field(default_factory=dict)  # bytes by term
    estimated_seconds: float | None = None
    chosen_because: str = ""
    cf_precision: str = "fp32"  # plans made before TF32 projections: fp32
    estimated_allocated_bytes: int = 0  # the model's peak of allocated tensors (0: planned before it existed)
    headroom_bytes: int = 0  # reserved minus allocated: fragmentation and cuDNN's workspace
    capped: bool = False  # the allocator was capped at the budget (--gpu-mem)
    backend: BackendRecord | None = None  # None: planned before backend settings were recorded
    # the kernel levers the run used (ncfm_core.kernels.KernelLevers.to_dict(): lever -> choice);
    # None, or a lever not named: today's path (plans made before the levers, or outside a job)
    kernels: Mapping[str, str] | None = None


@dataclass(frozen=True, kw_only=True)
class PlanKnobs(Part):
    """What a smaller plan changes (``jobs.plan.PLAN_KNOBS``)."""

    real_chunk: int
    class_chunk: int
    activation_checkpointing: bool


@dataclass(frozen=True, kw_only=True)
class PlanAsked(Part):
    """The plan's knobs as the user asked them, before planning (None: left to the planner), and
    whether recomputation was allowed; an out-of-memory step-down walks the planner's path from
    these (``jobs.plan.step_down_path``)."""

    real_chunk: int | None = None
    class_chunk: int | None = None
    activation_checkpointing: bool = False
    allow_checkpointing: bool = True


@dataclass(frozen=True, kw_only=True)
class PlanChange(Part):
    """One out-of-memory step-down: at ``iteration``, in ``phase``, from ``before`` to ``after``."""

    iteration: int
    phase: str
    error: str = ""  # torch's message, one line
    reserved_bytes: int | None = None  # what the allocator held when it ran out
    before: PlanKnobs
    after: PlanKnobs


@dataclass(frozen=True, kw_only=True)
class MemoryFit(Part):
    """The plan's memory estimate beside what the run measured (CUDA: reserved and allocated), so
    every GPU run can refit ``ncfm_core.memory_model``."""

    estimated_reserved_bytes: int
    estimated_allocated_bytes: int = 0
    measured_reserved_bytes: int | None = None
    measured_allocated_bytes: int | None = None
    measured_source: str = ""
    knobs: PlanKnobs | None = None
    capped: bool = False
    cudnn_benchmark: bool = False
    allocator_conf: str | None = None


@dataclass(frozen=True, kw_only=True)
class PoolRecord(Part):
    """The feature-extractor pool a run used: its cache key, whether it was reused, its members."""

    key: str
    cached: bool
    size: int
    epochs: int
    seconds: float
    test_accuracy: tuple[float, ...]


@dataclass(frozen=True, kw_only=True)
class SessionTiming(Part):
    """One process's stretch of work on a version (a distill, or one resume)."""

    from_iteration: int
    to_iteration: int
    seconds: float
    pool_seconds: float
    seconds_per_iteration_median: float | None = None  # None: no iteration ran
    ended: str  # the status it left: complete, interrupted or failed
    compile_seconds: float = 0.0  # compiling the networks before its first iteration (kernels compile=on), in seconds


@dataclass(frozen=True, kw_only=True)
class Timings(Part):
    """Totals over every session that worked on a version, and each session on its own.
    ``seconds_per_iteration_median`` is the most recent session's (versions made before
    ``per_session`` only have that)."""

    seconds: float = 0.0
    pool_seconds: float = 0.0
    sessions: int = 0
    seconds_per_iteration_median: float | None = None
    per_session: tuple[SessionTiming, ...] = ()

    def after(self, session: SessionTiming) -> Timings:
        """These timings with ``session`` added."""
        median = session.seconds_per_iteration_median
        return Timings(
            seconds=self.seconds + session.seconds,
            pool_seconds=self.pool_seconds + session.pool_seconds,
            sessions=self.sessions + 1,
            seconds_per_iteration_median=median if median is not None else self.seconds_per_iteration_median,
            per_session=(*self.per_session, session),
            extra=self.extra,
        )


@dataclass(frozen=True, kw_only=True)
class PeakMemoryRecord(Part):
    """One session's peak-memory measurement (``devices.PeakMemory.to_dict()``)."""

    device: str
    source: str
    allocated_bytes: int | None = None
    reserved_bytes: int | None = None
    rss_bytes: int | None = None
    peak_bytes: int | None = None


@dataclass(frozen=True, kw_only=True)
class SynsetRecord(Part):
    file: str
    stored_images: int
    shape: tuple[int, ...]
    factor: int
    decoded_images: int


@dataclass(frozen=True, kw_only=True)
class SamplerRecord(Part):
    file: str
    learned: bool


@dataclass(frozen=True, kw_only=True)
class ProcessRecord(Part):
    pid: int
    host: str


@dataclass(frozen=True, kw_only=True)
class Accuracy(Part):
    """Test accuracies (fractions) of the networks one evaluation trained, and their mean and std."""

    mean: float | None = None
    std: float | None = None
    runs: tuple[float | None, ...] = ()


@dataclass(frozen=True, kw_only=True)
class BaselineRecord(Part):
    """A baseline's result (how it was made stays in ``extra``: subset, seeds, cache key, ...)."""

    accuracy: Accuracy


@dataclass(frozen=True, kw_only=True)
class EvalRecord(Part):
    """One evaluation (``ncfm eval``, ``--eval``) as ``jobs.eval.eval_job`` made it; its first
    model's results (``models`` in ``extra`` holds each model's with several)."""

    accuracy: Accuracy
    model: str | None = None
    protocol: Mapping[str, Any] = field(default_factory=dict)
    baselines: Mapping[str, BaselineRecord] = field(default_factory=dict)
    metrics: Mapping[str, float | None] = field(default_factory=dict)
    seeds: tuple[Seed, ...] = ()
    training: str | None = None
    train_set: Mapping[str, Any] = field(default_factory=dict)
    teacher: Mapping[str, Any] | None = None
    timings: Mapping[str, float | None] = field(default_factory=dict)
    seconds: float | None = None
    created: str | None = None
    device: str | None = None
    world_size: int | None = None


@dataclass(frozen=True, kw_only=True)
class EvalRequest(Part):
    """An evaluation the distilling command asked for (``ncfm distill --eval``) that has not been
    recorded yet; ``ncfm resume`` runs it once the version is complete."""

    protocol: Mapping[str, Any]  # protocols.EvalConfig.to_dict()
    models: tuple[str, ...] = ()  # () : the protocol's model
    baselines: tuple[str, ...] = ()
    baseline_seed: Seed = 0
    min_acc: float | None = None


@dataclass(frozen=True, kw_only=True)
class RunRecord(Part):
    """Everything ``manifest.json`` records about one version (docs/store.md has each field)."""

    name: str = ""
    version: int = 0
    status: str = "running"
    kind: str = KIND
    created: str | None = None
    finished: str | None = None
    failed: str | None = None  # when it last failed or was interrupted
    error: str | None = None  # why, in one line ("interrupted (SIGTERM)", "DivergedError: ...")
    parent: str | None = None  # name@vN this version continues
    config: Mapping[str, Any] = field(default_factory=dict)  # config.DistillConfig.to_dict()
    dataset: DatasetRecord | None = None
    seed: Seed | None = None
    versions: Mapping[str, str] = field(default_factory=dict)  # software: ncfm, torch, python
    device: str | None = None
    device_reason: str | None = None
    gpu_mem: str | None = None  # --gpu-mem as written
    plan: PlanRecord | None = None
    flops_per_iteration: float | None = None
    iterations_done: int = 0
    iterations_target: int | None = None
    checkpoint_every: int | None = None
    checkpoint_iteration: int | None = None  # None: no checkpoint yet
    world_size: int | None = None
    process: ProcessRecord | None = None
    pool: PoolRecord | None = None
    timings: Timings | None = None
    peak_memory_bytes: int | None = None  # the largest over every session
    peak_memory_source: str | None = None  # a key of PEAK_MEMORY_SOURCES
    peak_memory: PeakMemoryRecord | None = None  # the last session's measurement
    loss_curve: tuple[tuple[int, float | None], ...] = ()  # (iteration, mean loss of the last 10)
    final_loss: float | None = None
    synset: SynsetRecord | None = None
    sampler: SamplerRecord | None = None
    sha256: Mapping[str, str] = field(default_factory=dict)  # file relative to the version -> digest
    evals: tuple[EvalRecord, ...] = ()
    pending_eval: EvalRequest | None = None
    plan_asked: PlanAsked | None = None  # None: recorded before step-downs existed
    plan_changes: tuple[PlanChange, ...] = ()  # out-of-memory step-downs, oldest first
    memory_fit: MemoryFit | None = None  # the plan's estimate beside the measured peak

    @property
    def interrupted(self) -> bool:
        return self.status == "interrupted"

    @property
    def last_accuracy(self) -> float | None:
        """The mean accuracy of the newest evaluation (None: none, or not a finite number)."""
        mean = self.evals[-1].accuracy.mean if self.evals else None
        return float(mean) if mean is not None and math.isfinite(mean) else None

    def with_hashes(self, digests: Mapping[str, str]) -> RunRecord:
        """This record with ``digests`` (file relative to the version -> sha256) set in ``sha256``."""
        return self.replace(sha256={**self.sha256, **digests})

    def to_json(self) -> dict[str, Any]:
        return {**_to_json(self), "schema_version": SCHEMA_VERSION, "interrupted": self.interrupted}

    @classmethod
    def from_json(cls, obj: Any, source: str = "record") -> RunRecord:
        try:
            return _parse_run(obj)
        except _Malformed as err:
            raise CorruptArtifactError(f"{source}: {err}") from None


# ----------------------------------------------------------------------------- read, migrate, write


def read_record(path: Path) -> RunRecord:
    """Read, migrate and validate the manifest at ``path``: at most ``MAX_RECORD_BYTES``, a JSON
    object with ``name``, ``version`` and ``status``, every field of its type, non-negative counts.
    ``NotFoundError`` if missing; anything else is a one-line ``CorruptArtifactError`` (exit 1)
    naming the field and the file."""
    path = Path(path)

    def corrupt(reason: str) -> CorruptArtifactError:
        return CorruptArtifactError(f"{path}: {reason}; restore or delete this file")

    obj = read_json(path, max_bytes=MAX_RECORD_BYTES, what="manifest")  # a regular file, read bounded
    try:
        return _parse_run(obj)
    except _Malformed as err:
        raise corrupt(str(err)) from None


def write_record(path: Path, record: RunRecord) -> None:
    """Write ``record`` to ``path`` atomically (strict JSON, sorted keys, ``schema_version`` set).
    What would not read back (a wrong type, an unknown status) is a ``ValueError``, before anything
    is written."""
    obj = record.to_json()
    try:
        _parse_run(obj)
    except _Malformed as err:
        raise ValueError(f"refusing to write a record that would not read back: {err}") from None
    write_json(path, obj)


def migrate(obj: dict[str, Any]) -> dict[str, Any]:
    """A manifest of any schema this ncfm reads, in the current layout (a new dict). A newer schema
    is refused: its fields may mean what this ncfm cannot know."""
    schema = obj.get("schema_version", 1)
    if isinstance(schema, bool) or not isinstance(schema, int) or schema < 1:
        raise _Malformed(f"field 'schema_version' is {_shown(schema)}, expected an int >= 1")
    if schema > SCHEMA_VERSION:
        raise _Malformed(f"written by a newer ncfm (record schema {schema}; this one reads up to {SCHEMA_VERSION}); "
                         f"upgrade ncfm to read it")
    obj = dict(obj)
    if schema == 1 and obj.get("status") == "failed" and obj.get("interrupted") is True:
        obj["status"] = "interrupted"
    obj.pop("schema_version", None)
    obj.pop("interrupted", None)  # derived from the status since schema 2
    return obj


def _parse_run(obj: Any) -> RunRecord:
    if not isinstance(obj, dict):
        raise _Malformed(f"expected a JSON object, found {type(obj).__name__}")
    obj = migrate(obj)
    for key in ("name", "version", "status"):
        if obj.get(key) is None:
            raise _Malformed(f"field {key!r} is missing")
    record = _parse_part(RunRecord, obj, "")
    if record.status not in STATUSES:
        raise _Malformed(f"field 'status' is {_shown(record.status)}, expected one of {', '.join(STATUSES)}")
    return record


# ----------------------------------------------------------------------------- the walker

_NONE = type(None)


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls, include_extras=True)


def _shown(value: Any) -> str:
    return json.dumps(value, default=str)[:40]


def _expected(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if hint is int:
        return "int"
    if hint is float:
        return "number"
    if hint in (str, bool):
        return hint.__name__
    if origin is tuple:
        return "list"
    return "object"


def _parse(hint: Any, value: Any, where: str) -> Any:
    """``value`` (parsed JSON) checked against the type ``hint``; containers become tuples and
    dicts of parsed values, objects their :class:`Part`."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if origin is Annotated:  # Seed: an int without the count's lower bound
        if isinstance(value, bool) or not isinstance(value, int):
            raise _Malformed(f"field {where!r} is {_shown(value)}, expected int")
        return value
    if origin in (typing.Union, types.UnionType):  # only ``X | None`` in the record
        if value is None:
            return None
        (inner,) = [arg for arg in args if arg is not _NONE]
        return _parse(inner, value, where)
    wrong = _Malformed(f"field {where!r} is {_shown(value)}, expected {_expected(hint)}")
    if hint is bool:
        if not isinstance(value, bool):
            raise wrong
        return value
    if hint in (int, float):
        if isinstance(value, bool) or not isinstance(value, (int, float) if hint is float else int):
            raise wrong
        if hint is int and value < 0:
            raise _Malformed(f"field {where!r} is {value}, expected a count >= 0")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise wrong
        return value
    if origin is tuple:
        if not isinstance(value, list):
            raise wrong
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_parse(args[0], item, f"{where}[{i}]") for i, item in enumerate(value))
        if len(value) != len(args):
            raise _Malformed(f"field {where!r} is {_shown(value)}, expected a list of {len(args)}")
        return tuple(_parse(arg, item, f"{where}[{i}]") for i, (arg, item) in enumerate(zip(args, value)))
    if origin in (Mapping, dict):
        if not isinstance(value, dict):
            raise wrong
        return {key: _parse(args[1], item, f"{where}.{key}") for key, item in value.items()}
    if isinstance(hint, type) and issubclass(hint, Part):
        return _parse_part(hint, value, where)
    raise TypeError(f"record field {where!r} has a type the record cannot read: {hint!r}")  # a bug here


def _parse_part(cls: type[P], obj: Any, where: str) -> P:
    if not isinstance(obj, dict):
        raise _Malformed(f"field {where!r} is {_shown(obj)}, expected object" if where
                         else f"expected a JSON object, found {type(obj).__name__}")
    hints = _hints(cls)
    values: dict[str, Any] = {}
    known = set()
    for spec in dataclasses.fields(cls):
        if spec.name == "extra":  # a key "extra" in the file is kept in extra, like any unknown one
            continue
        known.add(spec.name)
        path = f"{where}.{spec.name}" if where else spec.name
        raw = obj.get(spec.name)
        if raw is None:  # absent or null: the default (a field without one is required)
            if spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING:
                raise _Malformed(f"field {path!r} is missing")
            continue
        values[spec.name] = _parse(hints[spec.name], raw, path)
    return cls(**values, extra={key: value for key, value in obj.items() if key not in known})


def _to_json(value: Any) -> Any:
    if isinstance(value, Part):
        known = {spec.name: _to_json(getattr(value, spec.name)) for spec in dataclasses.fields(value)
                 if spec.name != "extra"}
        return {**value.extra, **known}
    if isinstance(value, (tuple, list)):
        return [_to_json(item) for item in value]
    if isinstance(value, Mapping):
        return {key: _to_json(item) for key, item in value.items()}
    return value
