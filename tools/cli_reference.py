"""Generate docs/cli.md, the command-line reference, from the Typer app itself.

Walks ``typer.main.get_command(app)`` (Typer's public API) and renders, for the app and each
command: the usage line, the help text, every option and argument as ``--help`` shows it
(``get_help_record``), grouped by help panel, and the epilog (exit codes). The reference can
therefore never describe an option the code does not have. tests/test_docs.py fails when
docs/cli.md differs from what this script writes.

    uv run python tools/cli_reference.py            # rewrite docs/cli.md
    uv run python tools/cli_reference.py --check    # exit 1 if docs/cli.md is stale
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import typer
import typer.main

ROOT = Path(__file__).resolve().parent.parent
REFERENCE_PATH = ROOT / "docs" / "cli.md"
COMMAND = "uv run python tools/cli_reference.py"

# Environment variables the code reads (ncfm_core.store, ncfm_core.data.registry, ncfm_cli.main,
# rich); not Typer options, so they cannot be walked and are listed here.
ENVIRONMENT = (
    ("NCFM_HOME", "Artifact store root when `--store` is not given (else the user data directory)."),
    ("NCFM_DATA_DIR", "Dataset directory when `--data-dir` is not given (else the user cache directory)."),
    ("NCFM_DEBUG", "`1` prints the full traceback instead of the one-line `error: ...` message."),
    ("NO_COLOR", "Any value turns colour off in progress bars and tables."),
)


def _cell(text: str) -> str:
    """Text that is safe inside one Markdown table cell."""
    return " ".join(str(text).split()).replace("|", "\\|")


def _paragraphs(text: str | None) -> list[str]:
    """A command's help text as Markdown lines: indented lines (examples) stay a code block."""
    if not text:
        return []
    lines = []
    for line in text.splitlines():
        stripped = line.rstrip()
        if stripped.startswith("    "):
            lines.append("    " + stripped.strip())  # a Markdown indented code block
        else:
            lines.append(stripped.strip())
    return lines


def _options_tables(command, ctx: typer.Context) -> list[str]:
    """One table per help panel (the unnamed panel first), rows in declaration order."""
    panels: dict[str, list[tuple[str, str]]] = {}
    for param in command.params:
        if getattr(param, "hidden", False):
            continue
        record = param.get_help_record(ctx)
        if record is None:
            continue
        names, description = record
        kind = "Arguments" if param.param_type_name == "argument" else "Options"
        panel = getattr(param, "rich_help_panel", None) or kind
        panels.setdefault(panel, []).append((names, description))
    help_names = command.get_help_option_names(ctx)
    if help_names:
        panels.setdefault("Options", []).append((", ".join(sorted(help_names)), "Show the help and exit."))
    ordered = [p for p in ("Arguments", "Options") if p in panels] + [
        p for p in panels if p not in ("Arguments", "Options")
    ]
    lines: list[str] = []
    for panel in ordered:
        lines += ["", f"**{panel}**", "", "| option | description |", "|---|---|"]
        lines += [f"| `{_cell(names)}` | {_cell(description)} |" for names, description in panels[panel]]
    return lines


def render() -> str:
    """The whole reference as Markdown (deterministic: no terminal width, no dates)."""
    from ncfm_cli.main import app

    root = typer.main.get_command(app)
    root_ctx = typer.Context(root, info_name="ncfm")
    lines = [
        "# Command-line reference",
        "",
        f"<!-- Generated from the Typer app by `{COMMAND}`; do not edit by hand. -->",
        "",
        "Generated from the code: every option below is one the installed `ncfm` accepts, with the",
        "help text `ncfm COMMAND --help` prints. Options given before the command (`ncfm --json ls`)",
        "are global; `--json` is also accepted after any command.",
        "",
        "## ncfm",
        "",
        "```",
        root.get_usage(root_ctx),
        "```",
        "",
        *_paragraphs(root.help),
        *_options_tables(root, root_ctx),
        "",
        "**Commands**",
        "",
        "| command | what it does |",
        "|---|---|",
    ]
    names = root.list_commands(root_ctx)
    for name in names:
        command = root.get_command(root_ctx, name)
        lines.append(f"| [`{name}`](#ncfm-{name}) | {_cell(command.get_short_help_str(limit=200))} |")
    if root.epilog:
        lines += ["", *_paragraphs(root.epilog)]
    lines += ["", "**Environment variables**", "", "| variable | effect |", "|---|---|"]
    lines += [f"| `{name}` | {_cell(effect)} |" for name, effect in ENVIRONMENT]

    for name in names:
        command = root.get_command(root_ctx, name)
        ctx = typer.Context(command, info_name=name, parent=root_ctx)
        lines += ["", f"## ncfm {name}", "", "```", command.get_usage(ctx), "```", "", *_paragraphs(command.help)]
        lines += _options_tables(command, ctx)
        if command.epilog:
            lines += ["", *_paragraphs(command.epilog)]
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the reference is out of date")
    parser.add_argument("--out", type=Path, default=REFERENCE_PATH, help="where to write (default docs/cli.md)")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = args.out.read_text() if args.out.exists() else ""
        if current != text:
            print(f"{args.out} is out of date; run: {COMMAND}", file=sys.stderr)
            return 1
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
