"""Progress without a terminal (a log file, CI, nohup): plain lines with iteration, loss and ETA,
at most every 10% or every minute, none with --quiet or --json; bars only on a terminal."""

from __future__ import annotations

import re

import pytest
from cli_runner import TINY, invoke, one_json

from ncfm_cli.output import GlobalOptions, ProgressRenderer

LINE = re.compile(r"^distill: iteration (\d+)/(\d+) \((\d+)%\) loss \S+, [\d.]+ s/it, ETA .+$")

pytestmark = pytest.mark.usefixtures("single_thread")


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("distill:")]


def _run(renderer: ProgressRenderer, clock: FakeClock, iterations: range, total: int, step_s: float) -> None:
    for iteration in iterations:
        clock.now += step_s
        renderer({"stage": "distill", "iteration": iteration, "total": total, "loss": 0.25, "seconds": step_s})


def test_without_a_terminal_a_line_every_tenth_with_an_eta(capsys):
    clock = FakeClock()
    with ProgressRenderer(GlobalOptions()) as renderer:
        assert renderer.plain and not renderer.live  # pytest's stderr is no terminal
        renderer.clock = clock
        _run(renderer, clock, range(1, 1001), 1000, 0.01)
    lines = _lines(capsys)
    assert [int(LINE.match(line).group(1)) for line in lines] == list(range(100, 1001, 100))
    assert lines[0].endswith("ETA 9.0 s")  # 900 iterations left at 0.01 s each
    assert lines[-1].endswith("ETA 0.0 s") and "(100%)" in lines[-1]


def test_slow_runs_also_get_a_line_every_minute(capsys):
    clock = FakeClock()
    with ProgressRenderer(GlobalOptions()) as renderer:
        renderer.clock = clock
        _run(renderer, clock, range(501, 521), 1000, 20.0)  # a resumed run, 20 s an iteration
    lines = _lines(capsys)
    # 3 iterations (60 s) after the first event, then between lines, never more often: the first tenth is 100 iterations away
    assert [int(LINE.match(line).group(1)) for line in lines] == [504, 507, 510, 513, 516, 519]
    assert lines[0].endswith("ETA 2 h 45 min")  # 496 left at 20 s


def test_quiet_and_json_print_no_progress(capsys):
    for opts in (GlobalOptions(quiet=True), GlobalOptions(json=True)):
        clock = FakeClock()
        with ProgressRenderer(opts) as renderer:
            renderer.clock = clock
            _run(renderer, clock, range(1, 11), 10, 1.0)
    assert capsys.readouterr().err == ""


def test_distill_without_a_terminal_logs_plain_progress_lines(tmp_path):
    result = invoke("--store", tmp_path, "distill", "digits", "--ipc", "1", "--iterations", "20", *TINY)
    lines = [line for line in result.stderr.splitlines() if line.startswith("distill: iteration")]
    assert all(LINE.match(line) for line in lines), lines
    assert [int(LINE.match(line).group(1)) for line in lines][-1] == 20
    assert 2 <= len(lines) <= 10 + 1  # every 2 iterations at most, plus lines a slow minute adds
    assert "\x1b[" not in result.stderr and "━" not in result.stderr  # no bars, no escape codes
    quiet = invoke("--store", tmp_path, "--quiet", "distill", "digits", "--ipc", "1", "--iterations", "4", *TINY)
    assert quiet.stderr == ""
    as_json = invoke("--store", tmp_path, "--json", "distill", "digits", "--ipc", "1", "--iterations", "4", *TINY)
    assert "distill: iteration" not in as_json.stderr and one_json(as_json)["iterations"] == 4


def test_without_a_terminal_each_evaluation_network_gets_a_line(capsys):
    # an evaluation trains its networks for minutes each on a CPU: a log must show it is alive
    events = [{"stage": "eval", "what": "synthetic", "model": "convnet", "repeat": r, "repeats": 3,
               "accuracy": 0.9 + r / 100} for r in range(3)]
    events.append({"stage": "eval", "what": "random", "model": "convnet", "repeat": 0, "repeats": 1, "accuracy": 0.5})
    for opts, expected in ((GlobalOptions(), 4), (GlobalOptions(quiet=True), 0), (GlobalOptions(json=True), 0)):
        with ProgressRenderer(opts) as renderer:
            for event in events:
                renderer(event)
        lines = capsys.readouterr().err.splitlines()
        assert len(lines) == expected
    with ProgressRenderer(GlobalOptions()) as renderer:
        renderer(events[1])
        renderer(events[3])
    assert capsys.readouterr().err.splitlines() == ["eval convnet: network 2/3 accuracy 91.00%",
                                                     "random convnet: network 1/1 accuracy 50.00%"]



def test_without_a_terminal_the_pool_reports_every_tenth_and_every_trained_network(capsys):
    clock = FakeClock()
    with ProgressRenderer(GlobalOptions()) as renderer:
        renderer.clock = clock
        for member in range(2):
            for epoch in range(3):
                clock.now += 2.0
                renderer({"stage": "pool", "member": member, "members": 2, "epoch": epoch, "epochs": 3, "loss": 0.5})
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("pool:")]
    assert lines == [
        "pool: network 1/2 epoch 1/3 loss 0.5000",  # no pace yet, so no ETA
        "pool: network 1/2 epoch 2/3 loss 0.5000, ETA 8.0 s",
        "pool: network 1/2 trained (loss 0.5000), ETA 6.0 s",
        "pool: network 2/2 epoch 1/3 loss 0.5000, ETA 4.0 s",
        "pool: network 2/2 epoch 2/3 loss 0.5000, ETA 2.0 s",
        "pool: network 2/2 trained (loss 0.5000)",
    ]
