import subprocess
import sys

from typer.testing import CliRunner

from ncfm_cli.main import app
from ncfm_core import __version__


def test_version_flag_prints_version():
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == f"ncfm {__version__}"


def test_python_dash_m_entry_point():
    proc = subprocess.run(
        [sys.executable, "-m", "ncfm_cli", "--version"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("ncfm ")


def test_help_lists_usage():
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output
