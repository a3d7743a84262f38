"""The ``ncfm`` command line through Typer's CliRunner: every command, every exit code, JSON shapes."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from cli_runner import EVAL_TINY, TINY, error_line, invoke, one_json, one_thread
from test_jobs import interrupt_at
from typer.testing import CliRunner

from ncfm_cli import distill as distill_module
from ncfm_cli.main import app
from ncfm_cli.output import EXIT_CODES_HELP, exit_code_for
from ncfm_core.errors import (
    BudgetInfeasibleError,
    ConfigError,
    CorruptArtifactError,
    NcfmError,
    NotFoundError,
)
from ncfm_core.store import Store, load_tensors

REPO_ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """One distilled and evaluated artifact, shared read-only by the tests of this module."""
    with one_thread():
        store = tmp_path_factory.mktemp("cli_store")
        distilled = one_json(invoke("--store", store, "--json", "distill", "digits", "--ipc", "1",
                                    "--iterations", "3", *TINY))
        evaluated = one_json(invoke("--store", store, "eval", "digits-ipc1", *EVAL_TINY, "--json"))
    return {"store": store, "distill": distilled, "eval": evaluated}



# ----------------------------------------------------------------------------- JSON a CI script reads


def _assert_types(obj: dict, schema: dict) -> None:
    for key, types in schema.items():
        assert key in obj, f"missing key {key!r} in {sorted(obj)}"
        assert isinstance(obj[key], types), f"{key}: {obj[key]!r} is not {types}"


def test_distill_json_shape(made):
    out = made["distill"]
    _assert_types(out, {
        "artifact": str, "path": str, "status": str, "iterations": int, "seconds": float,
        "peak_memory_bytes": int, "peak_memory_source": str, "dataset": str, "ipc": int,
    })
    assert out["artifact"] == "digits-ipc1@v1" and out["status"] == "complete" and out["iterations"] == 3
    assert Path(out["path"]) == made["store"] / "artifacts" / "digits-ipc1" / "v1"
    assert out["seconds"] > 0 and out["peak_memory_bytes"] > 0


def test_eval_json_shape(made):
    out = made["eval"]
    _assert_types(out, {"artifact": str, "accuracy": dict, "protocol": dict, "seconds": float,
                        "device": str, "created": str, "passed": bool})
    _assert_types(out["accuracy"], {"mean": float, "std": float, "runs": list})
    assert len(out["accuracy"]["runs"]) == 1 and out["protocol"]["repeats"] == 1
    assert all(isinstance(r, float) and 0.0 <= r <= 1.0 for r in out["accuracy"]["runs"])
    assert 0.0 <= out["accuracy"]["mean"] <= 1.0 and out["accuracy"]["std"] == 0.0
    assert out["min_acc"] is None and out["passed"] is True


def test_inspect_and_ls_json_shape(made):
    info = one_json(invoke("--store", made["store"], "inspect", "digits-ipc1", "--json"))
    manifest = json.loads((made["store"] / "artifacts" / "digits-ipc1" / "v1" / "manifest.json").read_text())
    assert {key: info[key] for key in manifest} == manifest  # the manifest itself, plus:
    _assert_types(info, {"artifact": str, "path": str, "file_sizes": dict, "config": dict, "dataset": dict,
                         "evals": list, "timings": dict, "status": str, "versions": dict})
    assert all(isinstance(size, int) and size > 0 for size in info["file_sizes"].values())
    assert "synset.safetensors" in info["file_sizes"] and len(info["evals"]) >= 1

    listing = one_json(invoke("--store", made["store"], "--json", "ls"))
    _assert_types(listing, {"store": str, "artifacts": list, "warnings": list})
    row = next(r for r in listing["artifacts"] if r["artifact"] == "digits-ipc1@v1")
    _assert_types(row, {"name": str, "version": int, "status": str, "dataset": str, "ipc": int,
                        "iterations_done": int, "accuracy": float, "path": str})
    assert row["accuracy"] == info["evals"][-1]["accuracy"]["mean"]


# ----------------------------------------------------------------------------- commands, human output


def test_human_output_of_every_read_command(made, tmp_path):
    store = made["store"]
    listing = invoke("--store", store, "ls")
    assert "digits-ipc1@v1" in listing.stdout and "complete" in listing.stdout
    inspected = invoke("--store", store, "inspect", "digits-ipc1@v1")
    assert "fingerprint" in inspected.stdout and "synset.safetensors" in inspected.stdout
    assert "evaluations" in inspected.stdout
    empty = invoke("--store", tmp_path / "empty", "ls")
    assert "no artifacts" in empty.stdout


def test_peak_memory_reads_the_same_in_distill_resume_and_inspect(store_copy):
    def peak_line(text: str) -> str:
        return " ".join(next(line for line in text.splitlines() if line.startswith("peak memory")).split())

    shown = peak_line(invoke("--store", store_copy, "inspect", "digits-ipc1@v1").stdout)
    assert re.fullmatch(r"peak memory [0-9.]+ (MiB|GiB) \(process peak RSS\)", shown), shown
    assert peak_line(invoke("--store", store_copy, "resume", "digits-ipc1@v1").stdout) == shown
    made = invoke("--store", store_copy, "distill", "digits", "--ipc", "1", "--iterations", "1", "--name", "p", *TINY)
    assert peak_line(made.stdout).endswith("(process peak RSS)")


@pytest.mark.parametrize("fmt, expected", [
    ("png", "0/0000.png"), ("grid", "grid.png"), ("imagefolder", "train/000_0/0000.png"),
    ("pt", "synset.pt"), ("npz", "synset.npz"),
])
def test_export_formats(made, tmp_path, fmt, expected):
    out = tmp_path / "out"
    result = invoke("--store", made["store"], "export", "digits-ipc1", "--format", fmt, "--out", out, "--json")
    payload = one_json(result)
    assert payload["format"] == fmt and (out / expected).is_file()
    assert all(Path(f).is_file() for f in payload["files"])
    info = json.loads((out / "ncfm-export.json").read_text())
    training = fmt in ("imagefolder", "pt", "npz")  # decoded by default; png and grid: stored
    assert payload["decoded"] is training and info["form"] == ("decoded" if training else "stored")
    assert info["images"] == payload["images"] == (40 if training else 10)
    assert ("DECODED" if training else "STORED") in (out / "README.txt").read_text()
    assert len(info["mean"]) == len(info["std"]) == 1 and info["std"][0] > 0
    if fmt == "npz":
        with np.load(out / "synset.npz", allow_pickle=False) as archive:
            assert archive["images"].shape == (40, 1, 16, 16) and int(archive["factor"]) == 1


def test_eval_protocol_option(store_copy):
    out = one_json(invoke("--store", store_copy, "eval", "digits-ipc1", "--protocol", "dsa", *EVAL_TINY,
                          "--seed", "4", "--json"))
    assert out["protocol"]["protocol"] == "dsa" and out["protocol"]["optimizer"] == "sgd"
    assert out["protocol"]["seed"] == 4 and out["seeds"] == [4]
    assert Store(store_copy).resolve("digits-ipc1").record().evals[-1].protocol == out["protocol"]


def test_export_stored_and_decoded_on_request(made, tmp_path):
    result = invoke("--store", made["store"], "export", "digits-ipc1", "--format", "npz", "--out", tmp_path,
                    "--stored")
    assert re.search(r"^images +10 stored \(tiles not decoded\)$", result.stdout, flags=re.M), result.stdout
    with np.load(tmp_path / "synset.npz", allow_pickle=False) as archive:
        assert archive["images"].shape == (10, 1, 16, 16) and int(archive["factor"]) == 2
    result = invoke("--store", made["store"], "export", "digits-ipc1", "--format", "png", "--out",
                    tmp_path / "png", "--decoded")
    assert re.search(r"^images +40 decoded \(training images\)$", result.stdout, flags=re.M), result.stdout
    assert len(list((tmp_path / "png").rglob("*.png"))) == 40


def test_distill_with_eval_in_one_command_and_resume_extension(store_copy):
    out = one_json(invoke("--store", store_copy, "--json", "distill", "digits", "--ipc", "1", "--iterations", "2",
                          "--name", "both", "--seed", "5", "--no-sampler", *TINY, "--eval", "--eval-epochs", "1",
                          "--eval-repeats", "1"))
    assert out["artifact"] == "both@v1" and out["eval"]["accuracy"]["runs"] and out["passed"] is True
    manifest = json.loads(Path(out["path"], "manifest.json").read_text())
    assert manifest["config"]["seed"] == 5 and manifest["config"]["sampler"] is False
    assert len(manifest["evals"]) == 1 and manifest["pending_eval"] is None  # asked for, and done

    extended = one_json(invoke("--store", store_copy, "resume", "both", "--iterations", "4", "--json"))
    assert extended["artifact"] == "both@v2" and extended["parent"] == "both@v1" and extended["iterations"] == 4
    assert "eval" not in extended  # a new version does not owe its parent's evaluation
    nothing = invoke("--store", store_copy, "resume", "both@v2")
    assert "already complete" in nothing.stderr


def test_verbose_and_quiet_logging(store_copy):
    loud = invoke("--store", store_copy, "-v", "distill", "digits", "--ipc", "1", "--iterations", "4", *TINY,
                  "--checkpoint-every", "2")
    assert "distill: iteration 4/4" in loud.stderr and "checkpoint at iteration 2" in loud.stderr
    assert "artifact" in loud.stdout and "distill:" not in loud.stdout  # progress never on stdout
    normal = invoke("--store", store_copy, "distill", "digits", "--ipc", "1", "--iterations", "2", *TINY)
    assert "created digits-ipc1@v3" in normal.stderr and "distill: iteration 2/2 (100%)" in normal.stderr
    quiet = invoke("--store", store_copy, "--quiet", "distill", "digits", "--ipc", "1", "--iterations", "1", *TINY)
    assert quiet.stderr == "" and "digits-ipc1@v4" in quiet.stdout


# ----------------------------------------------------------------------------- exit codes


def test_exit_5_below_min_acc_after_printing_and_recording(store_copy):
    result = invoke("--store", store_copy, "eval", "digits-ipc1", *EVAL_TINY, "--min-acc", "1", "--json",
                    expect=5)
    out = one_json(result)
    assert out["passed"] is False and out["min_acc"] == 1.0
    assert "below --min-acc" in error_line(result)
    evals = Store(store_copy).resolve("digits-ipc1").record().evals
    assert evals[-1].accuracy.to_json() == out["accuracy"]
    invoke("--store", store_copy, "eval", "digits-ipc1", *EVAL_TINY, "--min-acc", "0")  # passes: exit 0


def _damage_truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-40])


def _damage_flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    for i in range(8, 40):  # inside the JSON header
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def _damage_names(path: Path) -> None:
    tensors, meta = load_tensors(path)
    path.write_bytes(safetensors.torch.save({"x": tensors["images"], "labels": tensors["labels"]}, metadata=meta))


def _damage_shape(path: Path) -> None:
    tensors, meta = load_tensors(path)
    path.write_bytes(safetensors.torch.save(
        {"images": tensors["images"][:, :, :8].contiguous(), "labels": tensors["labels"]}, metadata=meta))


@pytest.mark.parametrize("damage", [_damage_truncate, _damage_flip, _damage_names, _damage_shape])
@pytest.mark.parametrize("command", [["eval", "digits-ipc1", *EVAL_TINY], ["export", "digits-ipc1", "--format",
                                                                           "pt", "--out", "OUT"]])
def test_exit_1_corrupt_synset_one_line_naming_the_file(store_copy, tmp_path, damage, command):
    synset = store_copy / "artifacts" / "digits-ipc1" / "v1" / "synset.safetensors"
    damage(synset)
    args = [str(tmp_path / "out") if a == "OUT" else a for a in command]
    result = invoke("--store", store_copy, *args, expect=1)
    assert str(synset) in error_line(result)
    assert result.stdout == ""


def test_ncfm_debug_shows_the_exception(store_copy, monkeypatch):
    (store_copy / "artifacts" / "digits-ipc1" / "v1" / "synset.safetensors").write_bytes(b"junk")
    monkeypatch.setenv("NCFM_DEBUG", "1")
    result = CliRunner().invoke(app, ["--store", str(store_copy), "eval", "digits-ipc1", *EVAL_TINY])
    assert isinstance(result.exception, CorruptArtifactError), result.output


def test_exit_1_unexpected_error_is_one_line(store_copy, monkeypatch):
    def explode(*args, **kwargs):
        raise RuntimeError("disk on fire\nsecond line")

    monkeypatch.setattr(distill_module, "distill_job", explode)
    result = invoke("--store", store_copy, "distill", "digits", "--ipc", "1", *TINY, expect=1)
    assert error_line(result) == (
        "error: unexpected RuntimeError: disk on fire second line (set NCFM_DEBUG=1 for the traceback)"
    )


@pytest.mark.parametrize("args", [
    ["distill", "digits"],  # --ipc missing (Typer's own usage error)
    ["distill", "digits", "--ipc", "0"],
    ["eval", "digits-ipc1", "--repeats", "0"],
    ["export", "digits-ipc1", "--format", "jpeg", "--out", "x"],
    ["frobnicate"],
    ["distill", "digits", "--ipc", "1", "--verbosity"],
])
def test_exit_2_usage_errors(made, args):
    invoke("--store", made["store"], *args, expect=2)


@pytest.mark.parametrize("args, fragment", [
    (["distill", "digits", "--ipc", "500", *TINY], "--ipc"),
    (["distill", "digitz", "--ipc", "1", *TINY], "did you mean 'digits'"),
    (["distill", "digits", "--ipc", "1", "--matching", "l2", *TINY], "--matching"),
    (["distill", "digits", "--ipc", "1", "--device", "tpu", *TINY], "device"),
    (["distill", "digits", "--ipc", "1", "--name", "../x", *TINY], "invalid artifact name"),
    (["eval", "digits-ipc1", "--min-acc", "-1"], "--min-acc"),
    (["inspect", "digits-ipc1@vx"], "invalid version"),
    (["eval", "digits-ipc1", "--protocol", "bogus"], "unknown protocol"),
])
def test_exit_2_config_errors_are_one_line(store_copy, args, fragment):
    result = invoke("--store", store_copy, *args, expect=2)
    assert fragment in error_line(result)
    assert len(Store(store_copy).versions("digits-ipc1")) == 1  # nothing was created


@pytest.mark.parametrize("args", [
    ["inspect", "nothing-here"], ["eval", "digits-ipc1@v9"], ["export", "nope", "--format", "png", "--out", "x"],
    ["resume", "nope"], ["inspect", "/no/such/dir"],
])
def test_exit_3_not_found(made, args):
    result = invoke("--store", made["store"], *args, expect=3)
    error_line(result)


def test_exit_4_budget_infeasible_is_mapped(store_copy, monkeypatch):
    assert exit_code_for(BudgetInfeasibleError("x")) == 4
    assert [exit_code_for(e) for e in (NcfmError(), ConfigError(), NotFoundError(), CorruptArtifactError())] == [
        1, 2, 3, 1]
    assert exit_code_for(KeyboardInterrupt()) == 130 and exit_code_for(ValueError()) == 1

    def too_small(*args, **kwargs):
        raise BudgetInfeasibleError("--gpu-mem 10M is too small; the smallest plan needs 1.2G")

    monkeypatch.setattr(distill_module, "distill_job", too_small)
    result = invoke("--store", store_copy, "distill", "digits", "--ipc", "1", *TINY, expect=4)
    assert error_line(result) == "error: --gpu-mem 10M is too small; the smallest plan needs 1.2G"


def test_exit_130_ctrl_c_saves_a_checkpoint_and_says_how_to_resume(store_copy, monkeypatch):
    args = ["distill", "digits", "--ipc", "1", "--iterations", "6", "--name", "stop", *TINY]
    with monkeypatch.context() as patch:
        interrupt_at(patch, 3)
        result = invoke("--store", store_copy, *args, expect=130)
    expected_hint = f"ncfm --store {store_copy} resume stop@v1"
    assert "checkpoint saved at iteration 3" in result.stderr and expected_hint in result.stderr, result.stderr
    record = Store(store_copy).resolve("stop@v1").record()
    assert record.status == "interrupted" and record.iterations_done == 3

    # ls and inspect, human and JSON, say interrupted (not failed) with the command that continues it.
    hint = f"stopped with a checkpoint at iteration 3; continue it with `{expected_hint}`"
    row = next(r for r in one_json(invoke("--store", store_copy, "--json", "ls"))["artifacts"] if r["artifact"] == "stop@v1")
    assert (row["status"], row["hint"]) == ("interrupted", hint)
    shown = one_json(invoke("--store", store_copy, "inspect", "stop@v1", "--json"))
    assert (shown["status"], shown["hint"], shown["interrupted"]) == ("interrupted", hint, True)
    assert "recorded_status" not in shown  # recorded so, not only shown so
    listed = invoke("--store", store_copy, "ls").stdout
    assert "interrupted" in listed and f"stop@v1: {hint}" in " ".join(listed.split()), listed
    inspected = [" ".join(line.split()) for line in invoke("--store", store_copy, "inspect", "stop@v1").stdout.splitlines()]
    assert "status interrupted (Ctrl-C)" in inspected and f"next {hint}" in inspected, inspected

    resumed = one_json(invoke("--store", store_copy, "--json", "resume", "stop@v1"))
    assert resumed["status"] == "complete" and resumed["iterations"] == 6
    # inspect's median seconds per iteration: one per session, each naming the iterations it covers.
    time_line = next(line for line in invoke("--store", store_copy, "inspect", "stop@v1").stdout.splitlines()
                     if line.startswith("time "))
    assert re.search(r"median [0-9.]+ s/it \(iterations 0-3\), [0-9.]+ s/it \(iterations 3-6\)$", time_line), time_line
    sessions = one_json(invoke("--store", store_copy, "inspect", "stop@v1", "--json"))["timings"]["per_session"]
    assert [(s["from_iteration"], s["to_iteration"], s["ended"]) for s in sessions] == [
        (0, 3, "interrupted"), (3, 6, "complete")]
    straight = one_json(invoke("--store", store_copy, "--json", *args[:-len(TINY)], *TINY, "--name", "straight"))
    a = load_tensors(Path(resumed["path"]) / "synset.safetensors")[0]["images"]
    b = load_tensors(Path(straight["path"]) / "synset.safetensors")[0]["images"]
    assert torch.equal(a, b)


EVAL_ASKED = ["--eval", "--eval-epochs", "1", "--eval-repeats", "2", "--eval-protocol", "dsa", "--min-acc", "0"]


def test_resume_carries_over_the_eval_distill_asked_for(store_copy, monkeypatch):
    args = ["distill", "digits", "--ipc", "1", "--iterations", "4", "--name", "asked", *TINY, *EVAL_ASKED]
    with monkeypatch.context() as patch:
        interrupt_at(patch, 2)
        invoke("--store", store_copy, *args, expect=130)
    version = Store(store_copy).resolve("asked@v1")
    pending = version.record().pending_eval
    assert (pending.protocol["protocol"], pending.protocol["epochs"], pending.protocol["repeats"]) == ("dsa", 1, 2)
    assert pending.min_acc == 0.0 and version.record().evals == ()
    assert "pending eval" in invoke("--store", store_copy, "inspect", "asked@v1").stdout

    out = one_json(invoke("--store", store_copy, "--json", "resume", "asked"))
    assert out["status"] == "complete" and out["iterations"] == 4
    assert out["eval"]["protocol"]["protocol"] == "dsa" and len(out["eval"]["accuracy"]["runs"]) == 2
    assert out["min_acc"] == 0.0 and out["passed"] is True
    record = version.record()
    assert record.pending_eval is None and [e.protocol["epochs"] for e in record.evals] == [1]
    again = invoke("--store", store_copy, "resume", "asked")  # nothing left to do, nothing run twice
    assert "already complete" in again.stderr and len(version.record().evals) == 1


def test_an_evaluation_interrupted_after_the_run_is_finished_by_resume(store_copy, monkeypatch):
    from ncfm_core.jobs import eval as eval_module

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt("SIGINT")

    args = ["distill", "digits", "--ipc", "1", "--iterations", "2", "--name", "late", *TINY, *EVAL_ASKED[:-2],
            "--min-acc", "1"]
    with monkeypatch.context() as patch:
        patch.setattr(eval_module, "evaluate_models", stopped)
        invoke("--store", store_copy, *args, expect=130)
    version = Store(store_copy).resolve("late")  # complete: only its evaluation was stopped
    assert version.record().pending_eval.min_acc == 1.0

    skipped = invoke("--store", store_copy, "resume", "late", "--no-eval")
    assert "still to run" in skipped.stderr and version.record().pending_eval is not None
    result = invoke("--store", store_copy, "resume", "late", expect=5)  # its --min-acc 1 came along
    assert "below --min-acc 100.00%" in error_line(result) and "evaluated" in result.stdout
    assert version.record().pending_eval is None and len(version.record().evals) == 1  # recorded first


# ----------------------------------------------------------------------------- help and README


@pytest.mark.parametrize("command", ["distill", "resume", "eval", "export", "inspect", "ls"])
def test_every_command_explains_itself(command):
    result = invoke(command, "--help")
    text = " ".join(result.stdout.split())
    assert "Example" in text and f"ncfm {command}" in text
    assert "Exit codes" in text


def test_app_help_documents_every_exit_code():
    text = " ".join(invoke("--help").stdout.split())
    for code in ("0 success", "1 failure", "2 usage", "3 artifact", "4 memory budget", "5 accuracy below",
                 "130 interrupted"):
        assert code in text and code in EXIT_CODES_HELP


def test_readme_newcomer_commands():
    readme = (REPO_ROOT / "README.md").read_text()
    commands = re.findall(r"^(uv run (?:ncfm|pytest)[^\n]*)$", readme, flags=re.MULTILINE)
    assert "uv run pytest" in commands, commands
    distill_lines = [c for c in commands if "ncfm distill digits" in c]
    assert distill_lines and ("--eval" in distill_lines[0] or any("ncfm eval" in c for c in commands)), commands
    invoke("distill", "--help")
    invoke("eval", "--help")
    # The options the README uses exist: the real parser rejects unknown ones before --help runs.
    for line in distill_lines:
        args = line.split()[3:]  # after "uv run ncfm"
        invoke(*(args[: args.index("&&")] if "&&" in args else args), "--help")


def test_inspect_eval_history_shows_baselines_and_ior():
    from rich.console import Console

    from ncfm_cli.inspect import evals_table
    from ncfm_core.store import EvalRecord

    with_baselines = {
        "created": "2026-01-01T00:00:00Z", "protocol": {"model": "convnet", "epochs": 300}, "device": "cpu",
        "accuracy": {"mean": 0.9312, "std": 0.004, "runs": [0.93, 0.935, 0.929]},
        "baselines": {"random": {"accuracy": {"mean": 0.69, "std": 0.012}},
                      "full": {"accuracy": {"mean": 0.981, "std": 0.001}}},
        "metrics": {"ior": 0.2412},
    }
    plain = {"created": "2026-01-02T00:00:00Z", "protocol": {"model": "alexnet", "epochs": 5},
             "accuracy": {"mean": 0.5, "std": 0.0, "runs": [0.5]}, "device": "cuda:0"}
    console = Console(record=True, width=200)
    # A malformed record never reaches the table: reading the manifest refuses it (test_record.py).
    console.print(evals_table([EvalRecord.from_json(with_baselines), EvalRecord.from_json(plain)]))
    text = console.export_text()
    rows = [line for line in text.splitlines() if "convnet" in line or "alexnet" in line]
    assert len(rows) == 2
    assert "93.12% +- 0.40%" in rows[0] and "69.00% +- 1.20%" in rows[0] and "98.10% +- 0.10%" in rows[0]
    assert "+24.12 pts" in rows[0]
    assert "50.00% +- 0.00%" in rows[1] and rows[1].count(" - ") >= 1 and "pts" not in rows[1]


def test_the_command_line_keeps_freed_memory_unless_the_user_set_the_allocator_up():
    import platform

    from ncfm_cli.main import keep_freed_memory

    assert keep_freed_memory({"MALLOC_ARENA_MAX": "2"}) is False  # the user's own allocator settings win
    assert keep_freed_memory({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=131072"}) is False
    glibc = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    assert keep_freed_memory({}) is glibc


@pytest.mark.parametrize(("given", "seen"), [(None, "PASSIVE"), ("ACTIVE", "ACTIVE"), ("", "")])
def test_the_command_line_lets_idle_openmp_threads_sleep_unless_told_otherwise(given, seen):
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if given is not None:
        env["OMP_WAIT_POLICY"] = given
    shown = subprocess.run([sys.executable, "-c", "import os, ncfm_cli; print(repr(os.environ['OMP_WAIT_POLICY']))"],
                           env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert shown == repr(seen)
