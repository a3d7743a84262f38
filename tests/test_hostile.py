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


def _drop_dac() -> list[str]:
    """A prefix that runs a command as root without the capabilities that bypass file permissions,
    so a mode of 0000 is refused as it is for any user; skip where that is not possible."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to drop CAP_DAC_OVERRIDE")
    wrap = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]
    if subprocess.run([*wrap, "true"], capture_output=True).returncode != 0:
        pytest.skip("setpriv cannot drop capabilities here")
    return wrap


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


# ----------------------------------------------------------------------------- 4. checked before any work

DISTILL = ["distill", "digits", "--ipc", "1", "--iterations", "2", *TINY]


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


def test_a_simulated_full_disk_is_a_one_line_error_and_leaves_no_version(store_copy, monkeypatch):
    import ncfm_core.store.versions as versions_module

    def full(path, obj):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(versions_module, "write_json", full)
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
        Store(store).update_manifest(version, sha256={**version.manifest()["sha256"], relpath: digest})
    return path
