"""Real processes: SIGKILL then resume gives bit-identical images; Ctrl-C exits 130 with a
resume hint; two concurrent distills to one name get two good versions."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from typer.testing import CliRunner

from ncfm_cli.main import app
from ncfm_core.store import Store, load_state, load_synset, load_tensors

REPO_ROOT = Path(__file__).resolve().parents[1]
ITERATIONS = 30
DISTILL = ["distill", "digits", "--ipc", "1", "--iterations", str(ITERATIONS), "--checkpoint-every", "5", "--seed", "3",
           "--pool-size", "1", "--pool-epochs", "1", "--freqs", "16", "--real-per-class", "4", "--width", "8"]
POLL_LIMIT_S = 240


def ncfm(store: Path, *args: str, pause_at: int | None = None, **popen) -> subprocess.Popen:
    """``ncfm ARGS`` in a new process. With ``pause_at`` the run waits after its checkpoint at
    that iteration until it is stopped (``NCFM_PAUSE_AFTER_CHECKPOINT``), so a test stops it at
    a known iteration on a machine of any speed."""
    # Every process gets the same single thread: bit-identity across processes needs the same
    # reduction order, and one thread is also the fastest on a busy machine.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env.pop("NCFM_PAUSE_AFTER_CHECKPOINT", None)
    if pause_at is not None:
        env["NCFM_PAUSE_AFTER_CHECKPOINT"] = str(pause_at)
    return subprocess.Popen(
        [sys.executable, "-m", "ncfm_cli", "--store", str(store), *args],
        cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen,
    )


def finish(proc: subprocess.Popen, expect: int = 0) -> tuple[str, str]:
    stdout, stderr = proc.communicate(timeout=POLL_LIMIT_S)
    assert proc.returncode == expect, f"exit {proc.returncode} != {expect}\nstdout:\n{stdout}\nstderr:\n{stderr}"
    return stdout, stderr


def wait_for_checkpoint(proc: subprocess.Popen, manifest_path: Path, iterations: int) -> dict:
    """Poll the manifest until its checkpoint holds at least ``iterations``; the run must still be going."""
    deadline = time.monotonic() + POLL_LIMIT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            stdout, stderr = proc.communicate()
            raise AssertionError(f"the run ended (exit {proc.returncode}) before it could be stopped:\n{stderr}")
        if manifest_path.is_file():
            manifest = json.loads(manifest_path.read_text())  # written atomically: never half a file
            if (manifest.get("checkpoint_iteration") or 0) >= iterations:
                return manifest
        time.sleep(0.02)
    proc.kill()
    raise AssertionError(f"no checkpoint with {iterations} iterations after {POLL_LIMIT_S} s")


def ncfm_here(*args: str) -> dict:
    """Run the CLI app in this process on one thread (as the subprocesses) and parse its JSON."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = CliRunner().invoke(app, ["--json", *args])
    finally:
        torch.set_num_threads(before)
    assert result.exit_code == 0, f"{result.stdout}\n{result.stderr}\n{result.exception!r}"
    return json.loads(result.stdout)


def test_sigkill_then_resume_is_bit_identical(tmp_path):
    killed_store, straight_store = tmp_path / "killed", tmp_path / "straight"
    # The uninterrupted reference, in its own store (so its pool is trained separately).
    reference = Store(straight_store).resolve(ncfm_here("--store", str(straight_store), *DISTILL)["artifact"])

    victim = ncfm(killed_store, *DISTILL, pause_at=10)
    manifest_path = killed_store / "artifacts" / "digits-ipc1" / "v1" / "manifest.json"
    try:
        seen = wait_for_checkpoint(victim, manifest_path, 10)
        assert seen["checkpoint_iteration"] == 10  # paused there: the kill lands mid-run
        victim.send_signal(signal.SIGKILL)
    finally:
        victim.kill()
        victim.communicate()
    assert seen["process"]["pid"] == victim.pid

    version = Store(killed_store).resolve("digits-ipc1@v1")
    assert version.record().status == "running"  # SIGKILL leaves no chance to say otherwise
    assert int(load_state(version.checkpoint_path)["iteration"]) == 10
    assert not version.synset_path.exists()

    resumed = ncfm_here("--store", str(killed_store), "resume", "digits-ipc1")
    assert resumed["artifact"] == "digits-ipc1@v1" and resumed["status"] == "complete"
    assert resumed["iterations"] == ITERATIONS
    record = version.record()
    assert record.pool.cached is True  # the resume reused the victim's pool
    assert record.pool.key == reference.record().pool.key
    # The killed session could record nothing: the timings say which iterations they cover.
    assert [(s.from_iteration, s.to_iteration) for s in record.timings.per_session] == [(10, ITERATIONS)]

    got, want = load_synset(version.synset_path), load_synset(reference.synset_path)
    assert torch.equal(got.images, want.images), (got.images - want.images).abs().max()
    assert torch.equal(got.labels, want.labels)
    got_psi, want_psi = load_tensors(version.sampler_path)[0], load_tensors(reference.sampler_path)[0]
    assert got_psi.keys() == want_psi.keys() and got_psi
    assert all(torch.equal(got_psi[key], want_psi[key]) for key in want_psi)


def test_concurrent_distills_to_one_name_and_a_real_ctrl_c(tmp_path):
    """Two processes distill into one name at once: they get v1 and v2. One is stopped with
    SIGINT after a checkpoint: it exits 130 naming the resume command; resumed, it ends with
    exactly the images of its uninterrupted twin, so neither process wrote into the other."""
    store = tmp_path / "store"
    procs = [ncfm(store, "--json", *DISTILL, "--name", "shared", pause_at=pause) for pause in (5, None)]
    stopped, finished = procs
    try:
        deadline = time.monotonic() + POLL_LIMIT_S
        mine = None
        while mine is None and time.monotonic() < deadline:
            assert stopped.poll() is None, stopped.communicate()
            for path in (store / "artifacts" / "shared").glob("v*/manifest.json"):
                manifest = json.loads(path.read_text())
                if (manifest.get("process") or {}).get("pid") == stopped.pid:
                    mine = path
            time.sleep(0.02)
        assert mine is not None, "the process to stop never wrote its manifest"
        wait_for_checkpoint(stopped, mine, 5)
        stopped.send_signal(signal.SIGINT)
        _, stderr = finish(stopped, expect=130)
        stdout, _ = finish(finished)
    finally:
        for proc in procs:
            proc.kill()

    interrupted_ref = f"shared@{mine.parent.name}"
    manifest = json.loads(mine.read_text())
    assert manifest["status"] == "interrupted" and manifest["interrupted"] is True
    saved = manifest["checkpoint_iteration"]
    assert saved == 5 == load_state(mine.parent / "checkpoint" / "state.safetensors")["iteration"]
    assert f"checkpoint saved at iteration {saved}" in stderr and "Traceback" not in stderr
    assert f"ncfm --store {store} resume {interrupted_ref}" in stderr

    completed_ref = json.loads(stdout)["artifact"]
    assert sorted([completed_ref, interrupted_ref]) == ["shared@v1", "shared@v2"]
    assert ncfm_here("--store", str(store), "resume", interrupted_ref)["status"] == "complete"

    versions = Store(store).versions("shared")
    assert [v.version for v in versions] == [1, 2]
    for version in versions:
        record = version.record()
        assert record.status == "complete" and record.iterations_done == ITERATIONS
        assert record.name == "shared" and record.version == version.version
    first, second = (load_synset(v.synset_path) for v in versions)
    assert first.images.shape == (10, 1, 16, 16)
    assert torch.equal(first.images, second.images)
