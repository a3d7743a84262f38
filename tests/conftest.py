"""Shared test settings: small, deterministic, CPU-only unless a test says otherwise."""

import os
import shutil
import signal

# Idle OpenMP threads should sleep, not spin: several test processes may share 2 cores.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

# The CI machine has 2 cores; more threads than that only adds contention.
torch.set_num_threads(min(2, os.cpu_count() or 1))

# A script that starts the suite in the background (`uv run pytest &`, no job control) makes it
# ignore SIGINT, and so every process it starts: ncfm rightly leaves an ignored SIGINT alone, and
# the Ctrl-C tests would fail for the shell's reason. Python's own handler here; the processes the
# tests start get the default disposition back when they exec.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(autouse=True)
def _isolated_store(tmp_path_factory, monkeypatch):
    """Never let a test touch the user's real store or dataset cache."""
    monkeypatch.setenv("NCFM_HOME", str(tmp_path_factory.mktemp("ncfm_home")))
    monkeypatch.setenv("NCFM_DATA_DIR", str(tmp_path_factory.mktemp("ncfm_data")))
    monkeypatch.delenv("NCFM_DEBUG", raising=False)


@pytest.fixture
def single_thread():
    """Torch on one thread for the test, restored afterwards: tiny ops on an oversubscribed
    machine run far faster so. Modules of tiny jobs use it for every test with
    ``pytestmark = pytest.mark.usefixtures("single_thread")``."""
    from cli_runner import one_thread

    with one_thread():
        yield


@pytest.fixture
def store_copy(made, tmp_path):
    """A private copy of the module's shared store (its ``made`` fixture), for tests that damage
    or extend it."""
    target = tmp_path / "store"
    shutil.copytree(made["store"], target)
    return target
