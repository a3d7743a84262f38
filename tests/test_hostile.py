"""Hostile stores and hostile input (issue 24): no hang, no "unexpected", no silent merge, and
the library refuses what the command line refuses (issue 21, section 4).

Store entries that are not regular files (FIFOs, devices, sockets), unreadable versions, a lock
held by another process, out-of-range numbers, exports into occupied folders, corrupted files no
command reads, and file systems that refuse (read-only, full, names too long). Tests that need a
real FIFO, a real second process, a tmpfs or a permission check as root run ncfm in a subprocess
(with a time limit, so a regression fails instead of hanging the suite)."""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from cli_runner import EVAL_TINY, TINY, error_line, invoke, one_json, one_thread

import ncfm_core
from ncfm_core.errors import ConfigError, CorruptArtifactError
from ncfm_core.store import Store, file_sha256, load_state, load_synset, load_tensors, read_json, save_synset
from ncfm_core.store import files as files_module
from ncfm_core.store import locks as locks_module

pytestmark = pytest.mark.usefixtures("single_thread")

NAME = "digits-ipc1"


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """One complete artifact (4 iterations, checkpoints every 2), shared read-only."""
    with one_thread():
        store = tmp_path_factory.mktemp("hostile_store")
        invoke("--store", store, "--json", "distill", "digits", "--ipc", "1", "--iterations", "4",
               "--checkpoint-every", "2", *TINY)
    return {"store": store}


def run_ncfm(*args: object, timeout: float = 120, wrap: list[str] | None = None, env: dict | None = None,
             cwd: Path | None = None) -> subprocess.CompletedProcess:
    """``ncfm ARGS`` in its own process: at most ``timeout`` seconds (a hang fails the test) and
    6 GiB of address space (reading /dev/zero whole fails fast instead of eating the machine).
    ``wrap``: a command to run it under (unshare, setpriv)."""
    def limits() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (6 * 2**30, 6 * 2**30))

    command = [*(wrap or []), sys.executable, "-m", "ncfm_cli", *map(str, args)]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=timeout, preexec_fn=limits,
                              env=full_env, cwd=cwd)
    except subprocess.TimeoutExpired:
        pytest.fail(f"ncfm {' '.join(map(str, args))} did not finish within {timeout} s (a hang)")


def last_error(proc: subprocess.CompletedProcess) -> str:
    lines = proc.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr and "unexpected" not in proc.stderr, proc.stderr
    return lines[-1]


@contextlib.contextmanager
def time_limit(seconds: int):
    """Fail (not hang) if the block blocks: SIGALRM interrupts a blocking open of a FIFO."""
    def expired(signum, frame):
        raise TimeoutError(f"blocked for {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _version(store: Path, number: int = 1) -> Path:
    return store / "artifacts" / NAME / f"v{number}"


def _swap(path: Path, kind: str) -> None:
    """Put ``kind`` where the regular file ``path`` was: fifo, dir, devnull, devzero, socket."""
    path.unlink()
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "dir":
        path.mkdir()
    elif kind in ("devnull", "devzero"):
        path.symlink_to("/dev/null" if kind == "devnull" else "/dev/zero")
    elif kind == "socket":
        server = socket.socket(socket.AF_UNIX)
        with contextlib.chdir(path.parent):  # a socket's path is limited to ~100 bytes: bind a relative one
            server.bind(path.name)
        server.close()


# ----------------------------------------------------------------------------- 1. no hangs


@pytest.mark.parametrize("kind", ["fifo", "dir", "devnull", "socket"])
def test_every_store_reader_refuses_what_is_not_a_regular_file(store_copy, kind):
    """Manifest, synset, sampler, checkpoint, the JSON and tensor readers and the hash: each
    refuses a FIFO (without blocking on it), a folder, a device and a socket, naming the file."""
    version = _version(store_copy)
    readers = [
        (version / "manifest.json", lambda p: Store(store_copy).resolve(f"{NAME}@v1").record()),
        (version / "synset.safetensors", load_synset),
        (version / "sampler.safetensors", load_tensors),
        (version / "checkpoint" / "state.safetensors", load_state),
        (version / "synset.safetensors", file_sha256),
        (version / "manifest.json", read_json),
    ]
    for path, read in readers:
        saved = path.read_bytes() if path.is_file() else None
        _swap(path, kind)
        with time_limit(20), pytest.raises(CorruptArtifactError, match="not a regular file") as caught:
            read(path)
        assert str(path) in str(caught.value)
        if path.is_dir() and not path.is_symlink():
            path.rmdir()
        else:
            path.unlink()
        if saved is not None:
            path.write_bytes(saved)


def test_a_fifo_manifest_and_a_dev_zero_manifest_do_not_stop_ls(store_copy):
    """`ncfm ls` blocked forever on a FIFO manifest and read /dev/zero until memory ran out."""
    for number, kind in ((2, "fifo"), (3, "devzero")):
        shutil.copytree(_version(store_copy), _version(store_copy, number))
        _swap(_version(store_copy, number) / "manifest.json", kind)
    proc = run_ncfm("--store", store_copy, "ls", "--json")
    assert proc.returncode == 0, proc.stderr
    listing = json.loads(proc.stdout)
    assert [row["artifact"] for row in listing["artifacts"]] == [f"{NAME}@v1"]
    warnings = " ".join(listing["warnings"])
    assert f"{NAME}@v2" in warnings and "FIFO" in warnings
    assert f"{NAME}@v3" in warnings and "character device" in warnings


def test_a_fifo_synset_does_not_stop_export(store_copy, tmp_path):
    _swap(_version(store_copy) / "synset.safetensors", "fifo")
    proc = run_ncfm("--store", store_copy, "export", NAME, "--format", "npz", "--out", tmp_path / "out")
    assert proc.returncode == 1 and "synset.safetensors: is a FIFO" in last_error(proc)
    assert not (tmp_path / "out").exists()


def test_json_reads_are_bounded_by_what_is_read_not_by_stat(tmp_path, monkeypatch):
    path = tmp_path / "big.json"
    path.write_bytes(b'{"a": "' + b"x" * 5000 + b'"}')
    with pytest.raises(CorruptArtifactError, match="more than any ncfm record"):
        read_json(path, max_bytes=4096, what="record")
    real_fstat = os.fstat
    monkeypatch.setattr(files_module.os, "fstat",
                        lambda fd: os.stat_result((*real_fstat(fd)[:6], 0, *real_fstat(fd)[7:])))  # claims 0 bytes
    with pytest.raises(CorruptArtifactError, match="more than 4096 bytes"):
        read_json(path, max_bytes=4096, what="record")


# ----------------------------------------------------------------------------- 2. one bad version


def test_unreadable_versions_are_warnings_and_ls_exits_0(store_copy):
    """100,000 nested lists (RecursionError), a hand-made v01 (listed v1 twice) and a v0."""
    nested = _version(store_copy, 2)
    shutil.copytree(_version(store_copy), nested)
    (nested / "manifest.json").write_text("[" * 100_000 + "]" * 100_000)
    shutil.copytree(_version(store_copy), store_copy / "artifacts" / NAME / "v01")
    shutil.copytree(_version(store_copy), store_copy / "artifacts" / NAME / "v0")
    result = invoke("--store", store_copy, "ls", "--json")
    listing = one_json(result)
    assert [row["artifact"] for row in listing["artifacts"]] == [f"{NAME}@v1"]
    warnings = listing["warnings"]
    assert any(f"{NAME}@v2" in w and "nested too deeply" in w for w in warnings), warnings
    assert any(w.endswith("v01: not a version folder ncfm made (versions are v1, v2, ...); ignored") for w in warnings)
    assert [v.version for v in Store(store_copy).versions(NAME)] == [1, 2]  # v01 and v0 are not versions
    assert "unexpected" not in result.stderr


def test_an_unreadable_manifest_is_a_warning_in_ls(store_copy, monkeypatch):
    """Permission denied (as root a mode of 0000 is still readable: the denial is simulated;
    test_permission_denied_as_a_real_user_is_a_warning_and_a_one_line_error does it for real)."""
    shutil.copytree(_version(store_copy), _version(store_copy, 2))
    denied = _version(store_copy, 2) / "manifest.json"
    real_open = os.open

    def open_denied(path, flags, *args):
        if Path(path) == denied:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(files_module.os, "open", open_denied)
    listing = one_json(invoke("--store", store_copy, "ls", "--json"))
    assert [row["artifact"] for row in listing["artifacts"]] == [f"{NAME}@v1"]
    assert any(f"{NAME}@v2: {denied}: permission denied" in w for w in listing["warnings"]), listing["warnings"]
    line = error_line(invoke("--store", store_copy, "inspect", f"{NAME}@v2", expect=7))
    assert f"{denied}: permission denied (Permission denied)" in line


def _drop_dac() -> list[str]:
    """A prefix that runs a command as root without the capabilities that bypass file permissions,
    so a mode of 0000 is refused as it is for any user; skip where that is not possible."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to drop CAP_DAC_OVERRIDE")
    wrap = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]
    if subprocess.run([*wrap, "true"], capture_output=True).returncode != 0:
        pytest.skip("setpriv cannot drop capabilities here")
    return wrap


def test_permission_denied_as_a_real_user_is_a_warning_and_a_one_line_error(store_copy, tmp_path):
    wrap = _drop_dac()
    shutil.copytree(_version(store_copy), _version(store_copy, 2))
    (_version(store_copy, 2) / "manifest.json").chmod(0)
    proc = run_ncfm("--store", store_copy, "ls", "--json", wrap=wrap)
    assert proc.returncode == 0, proc.stderr
    assert any(f"{NAME}@v2" in w and "permission denied" in w for w in json.loads(proc.stdout)["warnings"])
    # a store the user may read but not write: reading works, writing says what to do
    for folder in [store_copy, *store_copy.rglob("*")]:
        if folder.is_dir():
            folder.chmod(0o555)
    try:
        proc = run_ncfm("--store", store_copy, "distill", "digits", "--ipc", "1", "--iterations", "1", *TINY, wrap=wrap)
        assert proc.returncode == 7, proc.stderr
        assert "permission denied" in last_error(proc) and "give this user access" in last_error(proc)
        proc = run_ncfm("--store", store_copy, "export", NAME, "--format", "npz", "--out", tmp_path / "out", wrap=wrap)
        assert proc.returncode == 0, proc.stderr
    finally:
        for folder in [store_copy, *store_copy.rglob("*")]:
            if folder.is_dir():
                folder.chmod(0o755)


# ----------------------------------------------------------------------------- 3. the name lock

HOLD_LOCK = textwrap.dedent("""
    import sys, time
    from ncfm_core.store import Store
    store = Store(sys.argv[1])
    with store._name_lock(sys.argv[2]):
        print("held", flush=True)
        time.sleep(120)
""")
HOLD_FOREIGN_LOCK = textwrap.dedent("""
    import sys, time, filelock
    with filelock.FileLock(sys.argv[1]):
        print("held", flush=True)
        time.sleep(120)
""")


@contextlib.contextmanager
def holding(script: str, *args: object):
    """A real second process holding a lock until the block ends."""
    proc = subprocess.Popen([sys.executable, "-c", script, *map(str, args)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
        yield proc
    finally:
        proc.kill()
        proc.wait()


def test_a_held_name_lock_is_reported_and_given_up_on(store_copy, monkeypatch, caplog):
    monkeypatch.setattr(locks_module, "LOCK_REPORT_EVERY_S", 0.3)
    with holding(HOLD_LOCK, store_copy, NAME) as holder:
        started = time.monotonic()
        result = invoke("--store", store_copy, "--lock-timeout", "1.5", "eval", NAME, *EVAL_TINY, expect=6)
        waited = time.monotonic() - started
        line = error_line(result)
    assert "gave up after waiting" in line and f"PID {holder.pid}" in line and "--lock-timeout" in line
    assert "(python -c " in line  # the holder's command line
    waiting = [r.getMessage() for r in caplog.records if "still waiting for the lock" in r.getMessage()]
    assert len(waiting) >= 3 and all(f"held by PID {holder.pid}" in message for message in waiting), waiting
    assert waited < 60  # it gave up, it did not wait forever
    assert Store(store_copy).resolve(NAME).record().evals == ()  # nothing trained, nothing recorded


def test_a_lock_holder_without_a_record_is_unknown(store_copy, monkeypatch):
    monkeypatch.setenv("NCFM_LOCK_TIMEOUT", "0")
    lock = store_copy / "artifacts" / NAME / ".lock"
    with holding(HOLD_FOREIGN_LOCK, lock):
        result = invoke("--store", store_copy, "--json", "resume", f"{NAME}@v1", "--iterations", "6", expect=6)
    error = one_json(result)["error"]
    assert error["exit_code"] == 6 and error["type"] == "StoreBusyError"
    assert "held by an unknown process" in error["message"]


@pytest.mark.parametrize("value", ["nan", "-1", "inf", "abc"])
def test_the_lock_timeout_is_a_finite_number_of_seconds(store_copy, monkeypatch, value):
    if value != "abc":
        line = error_line(invoke("--store", store_copy, "--lock-timeout", value, "ls", expect=2))
        assert "lock_timeout (--lock-timeout) must be a finite number" in line
    monkeypatch.setenv("NCFM_LOCK_TIMEOUT", value)
    line = error_line(invoke("--store", store_copy, "ls", expect=2))
    assert "$NCFM_LOCK_TIMEOUT must be a finite number" in line


def test_a_lock_path_that_is_a_folder_is_a_one_line_error(store_copy):
    lock = store_copy / "artifacts" / NAME / ".lock"
    lock.unlink()
    lock.mkdir()
    line = error_line(invoke("--store", store_copy, "eval", NAME, *EVAL_TINY, expect=1))
    assert ".lock: cannot be used as a lock" in line


# ----------------------------------------------------------------------------- 4. checked before any work

DISTILL = ["distill", "digits", "--ipc", "1", "--iterations", "2", *TINY]


@pytest.mark.parametrize(("args", "words"), [
    (["--seed", "-1"], "seed (--seed) must be an integer in [0, 4294967295], got -1"),
    (["--seed", str(2**80)], "seed (--seed) must be an integer"),
    (["--init", "evil"], "init (--init) must be one of real, mix, noise"),
    (["--gpu-mem", "1e400"], "memory size '1e400' is too large"),
    (["--lr", "inf"], "image_lr (--lr) must be a finite number in (0, 10]"),
    (["--alpha", "nan"], "alpha (--alpha) must be a finite number in [0, 1]"),
    (["--calib-weight", "1e400"], "calib_weight (--calib-weight) must be a finite number in [0, 1000]"),
    (["--calib-weight", "-1"], "calib_weight (--calib-weight)"),
    (["--data-dir", ""], "empty path"),
])
def test_a_bad_distill_request_is_exit_2_and_leaves_no_version(tmp_path, args, words):
    result = invoke("--store", tmp_path, *DISTILL, *args, expect=2)
    assert words in (error_line(result) if words != "empty path" else result.stderr)  # parse errors: click's box
    assert not (tmp_path / "artifacts").exists() or Store(tmp_path).names() == []


@pytest.mark.parametrize(("args", "words"), [
    (["--seed", str(10**23)], "seed (--seed) must be an integer"),
    (["--seed", "-1"], "seed (--seed)"),
    (["--baseline", "random", "--baseline-seed", "-5"], "baseline_seed (--baseline-seed)"),
    (["--weight-decay", "inf"], "weight_decay (--weight-decay) must be a finite number >= 0, got inf"),
    (["--weight-decay", "2000"], "weight_decay (--weight-decay) 2000 is too large for lr (--lr) 0.001"),
    (["--lr", "nan"], "lr (--lr) must be a finite number in (0, 10]"),
    (["--momentum", "5"], "momentum (--momentum) must be a finite number in [0, 1)"),
    (["--cutmix-prob", "nan"], "Invalid value for '--cutmix-prob'"),  # typer's own range check
    (["--cutmix-prob", "inf"], "Invalid value for '--cutmix-prob'"),
    (["--soft-labels", "--temperature", "1e30"], "temperature (--temperature) must be a finite number in (0, 100]"),
    (["--temperature", "1"], "only apply with soft labels"),
    (["--repeats", str(10**11)], "repeats (--repeats) 100000000000 is more than 1000"),
    (["--min-acc", "nan"], "--min-acc must be a fraction in [0, 1]"),
])
def test_a_bad_eval_request_is_exit_2_before_any_work(store_copy, monkeypatch, args, words):
    import ncfm_core.jobs.eval as eval_jobs

    monkeypatch.setattr(eval_jobs, "load_job_dataset", lambda *a, **k: pytest.fail("the dataset was loaded"))
    result = invoke("--store", store_copy, "eval", NAME, *EVAL_TINY, *args, expect=2)
    assert words in (result.stderr if words.startswith("Invalid value") else error_line(result))
    assert Store(store_copy).resolve(NAME).record().evals == ()


@pytest.mark.parametrize("ref", [f"{NAME}@v\u00b2", f"{NAME}@v\u0661", f"{NAME}@v" + "9" * 5000, f"{NAME}@v-1"])
def test_a_version_that_is_not_ascii_digits_is_an_invalid_reference(store_copy, ref):
    line = error_line(invoke("--store", store_copy, "inspect", ref, expect=2))
    assert "invalid version" in line and len(line) < 300


def test_config_and_loop_agree_on_init_modes():
    from ncfm_core import config, synset

    assert config.INIT_MODES == synset.INIT_MODES


# issue 21, section 4: a table of bad requests, through the command line and through the API
BAD_DISTILL = [
    (["--seed", "-1"], {"seed": -1}),
    (["--seed", str(2**80)], {"seed": 2**80}),
    (["--init", "evil"], {"init": "evil"}),
    (["--lr", "inf"], {"image_lr": math.inf}),
    (["--lr", "20"], {"image_lr": 20.0}),
    (["--alpha", "1.5"], {"alpha": 1.5}),
    (["--calib-weight", "nan"], {"calib_weight": math.nan}),
    (["--freqs", "0"], {"num_freqs": 0}),
    (["--gpu-mem", "1e400"], {"gpu_mem": "1e400"}),
]
BAD_EVAL = [
    (["--weight-decay", "inf"], {"weight_decay": math.inf}),
    (["--lr", "20"], {"lr": 20.0}),
    (["--momentum", "1"], {"momentum": 1.0}),
    (["--seed", "-1"], {"seed": -1}),
    (["--soft-labels", "--temperature", "0"], {"soft_labels": True, "temperature": 0.0}),
    (["--temperature", "2"], {"temperature": 2.0}),
    (["--teacher-member", "0"], {"teacher_member": 0}),
    (["--repeats", "0"], {"repeats": 0}),
    (["--epochs", "-1"], {"epochs": -1}),
    (["--batch-size", "0"], {"batch_size": 0}),
    (["--optimizer", "lion"], {"optimizer": "lion"}),
]


@pytest.mark.parametrize(("cli", "api"), BAD_DISTILL)
def test_the_api_refuses_the_distill_requests_the_cli_refuses(tmp_path, cli, api):
    invoke("--store", tmp_path / "cli", *DISTILL, *cli, expect=2)
    options = {"iterations": 2, "pool_size": 1, "pool_epochs": 0, "num_freqs": 16, "real_per_class": 4, "width": 8,
               **api}
    with pytest.raises(ConfigError):
        ncfm_core.distill("digits", 1, store=tmp_path / "api", device="cpu", **options)
    for store in ("cli", "api"):
        assert not (tmp_path / store).exists() or Store(tmp_path / store).names() == []


@pytest.mark.parametrize(("cli", "api"), BAD_EVAL)
def test_the_api_refuses_the_eval_requests_the_cli_refuses(store_copy, cli, api):
    invoke("--store", store_copy, "eval", NAME, *EVAL_TINY, *cli, expect=2)
    settings = {"epochs": 1, "repeats": 1, **api}
    with pytest.raises(ConfigError):
        ncfm_core.evaluate(NAME, store=store_copy, device="cpu", **settings)
    assert Store(store_copy).resolve(NAME).record().evals == ()


def test_core_messages_name_the_field_and_the_flag():
    from ncfm_core.config import make_config
    from ncfm_core.evaluate import protocol_config

    with pytest.raises(ConfigError, match=r"^image_lr \(--lr\) must be"):
        make_config("digits", 1, image_lr=-1.0)
    with pytest.raises(ConfigError, match=r"^num_freqs \(--freqs\) must be"):
        make_config("digits", 1, num_freqs=0)
    with pytest.raises(ConfigError, match=r"^pool_lr must be"):  # no command-line option: the field alone
        make_config("digits", 1, pool_lr=0.0)
    with pytest.raises(ConfigError, match=r"^weight_decay \(--weight-decay\) must be"):
        protocol_config("ncfm", weight_decay=-1.0)


# ----------------------------------------------------------------------------- 5. no silent wrong results


def test_export_into_another_export_is_refused_unless_replaced(store_copy, tmp_path):
    out = tmp_path / "out"
    invoke("--store", store_copy, "export", NAME, "--format", "imagefolder", "--out", out)
    first = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    (out / "train" / "000_0" / "9999.png").write_bytes(b"stale")  # what a merge would keep
    line = error_line(invoke("--store", store_copy, "export", NAME, "--format", "png", "--out", out, expect=2))
    assert "already holds an export" in line and "--replace" in line
    result = invoke("--store", store_copy, "export", NAME, "--format", "png", "--out", out, "--replace")
    assert "replaced" in result.stdout and "imagefolder" in result.stdout
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert not any(name.startswith("train/") for name in files) and files != first
    record = json.loads((out / "ncfm-export.json").read_text())
    assert record["format"] == "png" and len([f for f in files if f.endswith(".png")]) == record["images"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "store"]  # nothing left aside


def test_empty_paths_are_refused(store_copy, tmp_path, monkeypatch):
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    result = invoke("--store", store_copy, "export", NAME, "--format", "npz", "--out", "", expect=2)
    assert "Invalid value for '--out': is an empty path" in result.stderr
    monkeypatch.setenv("NCFM_HOME", str(store_copy))
    error = one_json(invoke("--json", "--store", "", "ls", expect=2))["error"]
    assert "Invalid value for '--store': is an empty path" in error["message"]
    assert list(here.iterdir()) == []  # nothing written where '' would have pointed
    with pytest.raises(ConfigError, match="empty path"):
        Store("")


def test_exporting_into_an_empty_folder_through_a_symlink_works(store_copy, tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    invoke("--store", store_copy, "export", NAME, "--format", "npz", "--out", tmp_path / "link")
    assert (tmp_path / "link").is_symlink() and (tmp_path / "real" / "synset.npz").is_file()


@pytest.mark.parametrize("relpath", ["synset.safetensors", "sampler.safetensors", "checkpoint/state.safetensors"])
def test_verify_finds_a_changed_byte_in_every_file_kind(store_copy, relpath):
    result = invoke("--store", store_copy, "verify", NAME, "--json")
    assert one_json(result)["ok"] is True
    path = _version(store_copy) / relpath
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0x01
    path.write_bytes(bytes(raw))
    result = invoke("--store", store_copy, "verify", NAME, "--json", expect=1)
    printed = one_json(result)
    assert printed["ok"] is False and printed["files"][relpath]["status"] == "changed"
    assert printed["error"]["exit_code"] == 1 and str(path) in printed["error"]["message"]
    assert [name for name, entry in printed["files"].items() if entry["status"] != "ok"] == [relpath]
    line = error_line(invoke("--store", store_copy, "verify", NAME, expect=1))
    assert str(path) in line and "changed" in line


def test_verify_reports_missing_and_non_regular_files(store_copy):
    (_version(store_copy) / "sampler.safetensors").unlink()
    _swap(_version(store_copy) / "checkpoint" / "state.safetensors", "fifo")
    with time_limit(60):
        printed = one_json(invoke("--store", store_copy, "verify", f"{NAME}@v1", "--json", expect=1))
    assert printed["files"]["sampler.safetensors"]["status"] == "missing"
    assert printed["files"]["checkpoint/state.safetensors"]["status"] == "unreadable"
    assert "FIFO" in printed["files"]["checkpoint/state.safetensors"]["reason"]


# ----------------------------------------------------------------------------- 6. the file system refuses


def test_a_class_name_of_300_characters_exports(store_copy, tmp_path):
    version = Store(store_copy).resolve(NAME)
    synset = load_synset(version.synset_path)
    names = ["c" * 300, *synset.class_names[1:]]
    digest = save_synset(version.synset_path, synset.images, synset.labels, factor=synset.factor, ipc=synset.ipc,
                         class_names=names, mean=synset.mean, std=synset.std)
    Store(store_copy).update_record(version, sha256={**version.record().sha256, "synset.safetensors": digest})
    for fmt in ("png", "imagefolder", "grid"):
        invoke("--store", store_copy, "export", NAME, "--format", fmt, "--out", tmp_path / fmt)
    assert any(len(p.name) <= 104 and p.name.endswith(p.name[-8:]) for p in (tmp_path / "png").iterdir())


def test_names_too_long_and_files_in_the_way_are_one_line_errors(store_copy, tmp_path):
    long = tmp_path / ("x" * 300)
    line = error_line(invoke("--store", long, "ls", expect=7))
    assert "too long for the file system" in line
    line = error_line(invoke("--store", store_copy, "export", NAME, "--format", "npz", "--out", long / "out",
                             expect=7))
    assert "too long for the file system" in line
    (tmp_path / "file").write_text("x")
    line = error_line(invoke("--store", tmp_path / "file" / "store", *DISTILL, expect=7))
    assert "a part of this path is a file, not a folder" in line
    line = error_line(invoke("--store", tmp_path / "file", "ls", expect=2))
    assert "is not a folder" in line


def test_a_simulated_full_disk_is_a_one_line_error_and_leaves_no_version(store_copy, monkeypatch):
    import ncfm_core.store.record as record_module  # where a version's first manifest is written

    def full(path, obj):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(record_module, "write_json", full)
    line = error_line(invoke("--store", store_copy, *DISTILL, "--name", "full", expect=7))
    assert "no space left on the device" in line and "free some space" in line
    assert Store(store_copy).versions("full") == []


def _tmpfs_wrap(mount_point: Path) -> list[str]:
    """A prefix that runs a command in its own mount namespace with a 1 MiB tmpfs at
    ``mount_point`` (nothing is mounted outside that process); skip where mounting is refused."""
    wrap = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
            'mount -t tmpfs -o size=1m tmpfs "$0" && exec "$@"', str(mount_point)]
    if shutil.which("unshare") is None or subprocess.run([*wrap, "true"], capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root in a mount namespace)")
    return wrap


def test_a_read_only_and_a_full_file_system_on_a_real_tmpfs(store_copy, tmp_path):
    mount_point = tmp_path / "mnt"
    mount_point.mkdir()
    wrap = _tmpfs_wrap(mount_point)
    out = tmp_path / "results"
    out.mkdir()
    script = textwrap.dedent(f"""
        set -u
        cp -r {store_copy} {mount_point}/store
        run() {{ name=$1; shift; {sys.executable} -m ncfm_cli "$@" >{out}/$name.out 2>{out}/$name.err; echo $? >{out}/$name.rc; }}
        head -c 4M /dev/zero > {mount_point}/fill 2>/dev/null
        run full_distill --store {mount_point}/store distill digits --ipc 1 --iterations 1 {' '.join(TINY)} --name full
        run full_export --store {mount_point}/store export {NAME} --format npz --out {mount_point}/exported
        rm {mount_point}/fill
        mount -o remount,ro {mount_point}
        run ro_distill --store {mount_point}/store distill digits --ipc 1 --iterations 1 {' '.join(TINY)}
        run ro_eval --store {mount_point}/store eval {NAME} {' '.join(EVAL_TINY)}
        run ro_ls --store {mount_point}/store ls --json
        run ro_verify --store {mount_point}/store verify {NAME}
    """)
    proc = subprocess.run([*wrap, "sh", "-c", script], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr

    def outcome(name: str) -> tuple[int, str]:
        stderr = (out / f"{name}.err").read_text()
        assert "Traceback" not in stderr and "unexpected" not in stderr, stderr
        return int((out / f"{name}.rc").read_text()), stderr.strip().splitlines()[-1] if stderr.strip() else ""

    for name in ("full_distill", "full_export"):
        code, line = outcome(name)
        assert code == 7 and "no space left on the device" in line, (name, line)
    for name in ("ro_distill", "ro_eval"):
        code, line = outcome(name)
        assert code == 7 and "read-only" in line.lower(), (name, line)
    for name in ("ro_ls", "ro_verify"):
        assert outcome(name)[0] == 0, name


def test_running_out_of_memory_is_exit_4_with_a_one_line_error(store_copy, monkeypatch):
    import ncfm_core.jobs.eval as eval_jobs

    def no_memory(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: you "
                           "tried to allocate 36000000000 bytes. Error code 12 (Cannot allocate memory)")

    monkeypatch.setattr(eval_jobs, "evaluate_models", no_memory)
    line = error_line(invoke("--store", store_copy, "eval", NAME, *EVAL_TINY, expect=4))
    assert line.startswith("error: out of memory") and "--width" in line


# ----------------------------------------------------------------------------- 7. crafted contents


def _rewrite_tensors(store: Path, relpath: str, change) -> Path:
    """Rewrite a store tensor file with changed metadata, recording its new hash as ncfm would
    (so only the content checks can catch it)."""
    path = _version(store) / relpath if not relpath.startswith("pools/") else next(store.glob(f"{relpath}/*/pool.safetensors"))
    tensors, meta = load_tensors(path)
    from ncfm_core.store import save_tensors

    digest = save_tensors(path, tensors, change(meta))
    if not relpath.startswith("pools/"):
        version = Store(store).resolve(f"{NAME}@v1")
        Store(store).update_record(version, sha256={**version.record().sha256, relpath: digest})
    return path


@pytest.mark.parametrize(("relpath", "change", "command", "words"), [
    ("checkpoint/state.safetensors", lambda m: {**m, "ncfm_state_tree": "[" * 100_000 + "]" * 100_000},
     ["resume", f"{NAME}@v1", "--iterations", "6"], "broken state tree"),
    ("synset.safetensors", lambda m: {**m, "class_names": "[" * 100_000 + "]" * 100_000},
     ["export", NAME, "--format", "npz", "--out", "{out}"], "malformed metadata"),
    ("pools/", lambda m: {**m, "spec": "{not json"},
     ["eval", NAME, *EVAL_TINY, "--soft-labels"], "not a pool for this dataset and network"),
    ("pools/", lambda m: {**m, "test_accuracy": "[" * 100_000 + "]" * 100_000},
     ["eval", NAME, *EVAL_TINY, "--soft-labels"], "not a pool for this dataset and network"),
])
def test_crafted_metadata_is_a_one_line_corrupt_error(store_copy, tmp_path, relpath, change, command, words):
    path = _rewrite_tensors(store_copy, relpath, change)
    args = [str(tmp_path / "out") if arg == "{out}" else arg for arg in command]
    line = error_line(invoke("--store", store_copy, *args, expect=1))
    assert str(path) in line and words in line


def test_a_manifest_number_of_5000_digits_is_corrupt_not_unexpected(store_copy):
    path = _version(store_copy) / "manifest.json"
    path.write_text(path.read_text().replace('"seed": 0', '"seed": 1' + "0" * 5000))
    line = error_line(invoke("--store", store_copy, "inspect", f"{NAME}@v1", expect=1))
    assert str(path) in line and "not valid JSON" in line
    assert any(str(path) in w for w in one_json(invoke("--store", store_copy, "ls", "--json"))["warnings"])


def test_a_decompression_bomb_in_a_folder_dataset_is_a_one_line_error(tmp_path):
    import struct
    import zlib

    from PIL import Image

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    for label in ("a", "b"):
        (tmp_path / "data" / label).mkdir(parents=True)
        for index in range(3):
            Image.new("RGB", (8, 8), (index * 40, 0, 0)).save(tmp_path / "data" / label / f"{index}.png")
    bomb = tmp_path / "data" / "a" / "bomb.png"  # claims 20000 x 20000 pixels in 100 bytes
    bomb.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 20000, 20000, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\0" * 100)) + chunk(b"IEND", b""))
    line = error_line(invoke("--store", tmp_path / "store", "distill", f"folder:{tmp_path / 'data'}", "--ipc", "1",
                             "--iterations", "1", *TINY, expect=1))
    assert f"cannot read image {bomb}" in line and "decompression bomb" in line
