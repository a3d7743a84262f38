"""Running ``ncfm`` in-process from the tests (Typer's CliRunner), shared by the CLI test modules."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator

import torch
from typer.testing import CliRunner

from ncfm_cli.main import app

# the smallest real run: one untrained extractor, 16 frequencies, 4 real images a class, width 8
TINY = ["--pool-size", "1", "--pool-epochs", "0", "--freqs", "16", "--real-per-class", "4", "--width", "8"]
EVAL_TINY = ["--epochs", "1", "--repeats", "1"]  # one network, one epoch


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Tiny ops on an oversubscribed machine run far faster on one thread; restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def invoke(*args: object, expect: int = 0):
    """Run ``ncfm ARGS`` and assert its exit code, showing everything it wrote if it differs."""
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == expect, (
        f"exit {result.exit_code} != {expect}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}\n"
        f"exception: {result.exception!r}"
    )
    return result


def error_line(result) -> str:
    """The one-line error a failed command ends with (log lines may come before it)."""
    lines = result.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("error: "), result.stderr
    assert sum(line.startswith("error") for line in lines) == 1, result.stderr
    assert "Traceback" not in result.output, result.output
    return lines[-1]


def one_json(result) -> dict:
    """The single JSON document a ``--json`` command printed (nothing else on stdout)."""
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, result.stdout
    return json.loads(lines[0])
