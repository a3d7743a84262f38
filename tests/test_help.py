"""What ``--help`` says: flags show no value placeholder, and no help text contradicts the code."""

from __future__ import annotations

import re

import pytest
from typer.testing import CliRunner

from ncfm_cli.main import app

COMMANDS = ["distill", "resume", "eval", "export", "inspect", "ls"]


def _help(*args: str) -> str:
    result = CliRunner().invoke(app, [*args, "--help"], env={"COLUMNS": "200", "NO_COLOR": "1"})
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_boolean_flags_show_no_value_placeholder(command):
    text = _help(*([command] if command else []))
    assert "<bool>" not in text and "BOOLEAN" not in text, text
    for flag in ["--json", "--help"]:
        line = next(line for line in text.splitlines() if re.match(rf"[│\s]*{flag}\b", line))  # its option row
        assert re.search(rf"{flag}\s{{2,}}\S", line), line  # the help text follows the flag directly
    assert "<int>" in _help("distill")  # options that take a value keep their placeholder


def test_resume_says_a_bare_name_is_its_newest_version_whatever_its_status():
    text = " ".join(_help("resume").split())
    assert "newest version, whatever its status" in text and "latest complete" not in text


def test_eval_lr_default_is_the_protocols():
    from ncfm_core.evaluate import PROTOCOLS

    text = " ".join(_help("eval").split())
    assert "default: the protocol's" in text
    for name, knobs in PROTOCOLS.items():  # the figures the help names are the protocols' own
        assert f"{knobs['lr']} for {name}" in text


def test_distill_help_links_the_presets_table():
    text = " ".join(_help("distill").split())
    assert "docs/presets.md" in text and "--dry-run --json" in text
