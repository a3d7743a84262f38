"""The documentation stays true: the generated CLI reference is current, the store page's
snippet reads a real artifact, every relative link and image resolves, and every ``ncfm``
command line shown in the docs parses against the real command-line app."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import re
import shlex
from pathlib import Path

import pytest
import torch
import typer
import typer.main

from ncfm_core.config import make_config
from ncfm_core.jobs import distill_job
from ncfm_core.store import Store, load_synset
from ncfm_core.synset import decode_synset

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = sorted([ROOT / "README.md", *DOCS.rglob("*.md")])
SNIPPET_MARKER = "<!-- test: store-snippet -->"


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"docs_{name}", ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _without_code(text: str) -> str:
    """Markdown with fenced code blocks and inline code removed (links inside them are not links)."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def _code_blocks(text: str) -> list[str]:
    return re.findall(r"^```[a-z]*\n(.*?)^```", text, flags=re.S | re.M)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    headings = re.findall(r"^#{1,6}\s+(.*)$", _without_code(page.read_text()), flags=re.M)
    return {_slug(h) for h in headings}


def test_the_cli_reference_is_generated_from_the_current_app():
    reference = _load_script("cli_reference")
    expected = reference.render()
    current = (DOCS / "cli.md").read_text() if (DOCS / "cli.md").exists() else ""
    assert current == expected, (
        "docs/cli.md is out of date with the Typer app; run: python tools/cli_reference.py "
        "(uv run python tools/cli_reference.py) and commit the result"
    )
    # the reference really comes from the app: every command and a few options are in it
    for needle in ("## ncfm distill", "## ncfm eval", "`--ipc", "`--min-acc", "Exit codes"):
        assert needle in expected, needle


def test_the_presets_page_is_generated_from_the_dataset_registry():
    presets = _load_script("presets_table")
    expected = presets.render()
    assert (DOCS / "presets.md").read_text() == expected, (
        "docs/presets.md is out of date with the dataset registry; run: uv run python tools/presets_table.py"
    )
    from ncfm_core.data import dataset_names, dataset_preset

    for name in dataset_names():  # every registered dataset has a row, with its own preset values
        row = next(line for line in expected.splitlines() if line.startswith(f"| `{name}` |"))
        preset = dataset_preset(name)
        if "iterations" in preset:
            assert f" {preset['iterations']:,} |" in row, name
    assert "docs/presets.md" in " ".join((DOCS / "cli.md").read_text().split())  # linked from distill --help
    assert "(presets.md)" in (DOCS / "index.md").read_text()


def test_every_relative_link_and_image_points_to_an_existing_file():
    broken = []
    checked = 0
    for page in PAGES:
        for target in re.findall(r"!?\[[^\]]*\]\(([^)\s]+)\)", _without_code(page.read_text())):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                continue
            path_part, _, anchor = target.partition("#")
            resolved = (page.parent / path_part).resolve() if path_part else page
            checked += 1
            if not resolved.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
                broken.append(f"{page.relative_to(ROOT)}: {target} (no heading with that anchor)")
    assert checked > 20, f"only {checked} links found: is the link pattern still right?"
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_images_in_the_docs_are_small_pngs():
    images = sorted((DOCS / "images").glob("*.png"))
    assert images, "docs/images/ holds no pictures"
    from PIL import Image

    for path in images:
        assert path.stat().st_size < 300_000, f"{path.name} is {path.stat().st_size} bytes; keep pictures < 300 KB"
        with Image.open(path) as image:
            assert image.format == "PNG", path.name


def _command_lines() -> list[tuple[Path, str]]:
    """Every shell line of the docs' code blocks that runs ``ncfm`` (no placeholders)."""
    found = []
    for page in PAGES:
        for block in _code_blocks(page.read_text()):
            for line in block.splitlines():
                line = line.split(" #")[0].strip()
                for prefix in ("$ uv run ncfm ", "uv run ncfm ", "$ ncfm ", "ncfm "):
                    if line.startswith(prefix):
                        found.append((page, line[len(prefix):]))
                        break
    return found


def test_every_ncfm_command_shown_in_the_docs_parses():
    from ncfm_cli.main import app

    root = typer.main.get_command(app)
    commands = set(root.list_commands(typer.Context(root, info_name="ncfm")))
    lines = _command_lines()
    assert len(lines) > 10, "expected the docs to show ncfm commands"
    problems = []
    for page, line in lines:
        words = shlex.split(line)
        if any(placeholder in words for placeholder in ("...", "REF", "NAME")):
            continue
        position = next((i for i, word in enumerate(words) if word in commands), None)
        if position is None:
            if words and words[0] not in ("--help", "--version"):
                problems.append(f"{page.name}: ncfm {line} (no command)")
            continue
        name = words[position]
        try:
            root_ctx = root.make_context("ncfm", [*words[:position], name])
            command = root.get_command(root_ctx, name)
            command.make_context(name, words[position + 1:], parent=root_ctx)
        except (typer.Exit, SystemExit):
            pass  # --help
        except Exception as err:  # noqa: BLE001 - any parse failure is a wrong example
            problems.append(f"{page.name}: ncfm {line}: {err}")
    assert not problems, "commands in the docs that the CLI rejects:\n" + "\n".join(problems)


def test_readme_keeps_the_test_command_and_the_newcomer_commands():
    readme = (ROOT / "README.md").read_text()
    assert "uv run pytest" in readme.splitlines()
    assert "uv run ncfm distill digits --ipc 1 --eval --eval-baseline random" in readme.splitlines()
    assert "uv run ncfm export digits-ipc1 --format grid --out syn/" in readme.splitlines()


@pytest.fixture(scope="module")
def tiny_artifact(tmp_path_factory):
    """A real, tiny distillation: digits, IPC 1, factor 2, one iteration, an untrained pool."""
    store = Store(tmp_path_factory.mktemp("store"))
    config = make_config("digits", 1, factor=2, iterations=1, pool_size=1, pool_epochs=0, real_per_class=4,
                         num_freqs=16)
    return distill_job(store, config, device="cpu")


def test_the_store_snippet_reads_a_real_artifact_with_safetensors_and_decodes_it_like_ncfm(tiny_artifact):
    text = (DOCS / "store.md").read_text()
    pieces = text.split(SNIPPET_MARKER)[1:]
    assert len(pieces) == 2, "docs/store.md should mark its two snippet blocks"
    blocks = [re.search(r"```python\n(.*?)```", piece, flags=re.S).group(1) for piece in pieces]

    namespace: dict = {}
    printed = io.StringIO()
    previous = Path.cwd()
    os.chdir(tiny_artifact.path)  # the snippet runs inside a version directory, as documented
    try:
        with contextlib.redirect_stdout(printed):
            for block in blocks:
                exec(compile(block, "docs/store.md", "exec"), namespace)  # noqa: S102 - our own docs
    finally:
        os.chdir(previous)

    synset = load_synset(tiny_artifact.synset_path)
    assert namespace["factor"] == 2 and namespace["class_names"] == [str(d) for d in range(10)]
    assert torch.equal(torch.from_numpy(namespace["images"]), synset.images)
    assert torch.equal(torch.from_numpy(namespace["labels"]), synset.labels)
    decoded, decoded_labels = decode_synset(synset.images, synset.labels, synset.factor)
    assert namespace["decoded"].shape == (40, 1, 16, 16)
    torch.testing.assert_close(namespace["decoded"], decoded, rtol=0, atol=1e-6)
    assert torch.equal(namespace["decoded_labels"], decoded_labels)
    assert printed.getvalue().startswith("complete digits (10, 1, 16, 16) 2")


def test_the_python_page_runs_top_to_bottom_and_prints_what_it_says(tmp_path, monkeypatch):
    """docs/python.md as a user runs it: its python blocks in one namespace, its ``uv run ncfm``
    lines through the real command line, in an empty folder; every output it shows in a
    comment or after "prints" is what it printed."""
    from typer.testing import CliRunner

    from ncfm_cli.main import app

    text = (DOCS / "python.md").read_text()
    blocks = re.findall(r"^```(python|)\n(.*?)^```", text, flags=re.S | re.M)
    assert [kind for kind, _ in blocks].count("python") >= 5
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("NCFM_HOME", str(tmp_path / "default-store"))
    namespace: dict = {}
    printed = io.StringIO()
    torch.manual_seed(0)
    with contextlib.redirect_stdout(printed):
        for kind, block in blocks:
            if kind == "python":
                exec(compile(block, "docs/python.md", "exec"), namespace)  # noqa: S102 - our own docs
                continue
            for line in block.splitlines():
                assert line.startswith("uv run ncfm "), line
                result = CliRunner().invoke(app, shlex.split(line)[3:])
                assert result.exit_code == 0, (line, result.output)
    lines = printed.getvalue().splitlines()
    assert lines[0] == "my-digits@v1 (100, 1, 8, 8) 2"  # the page says so after the first block
    for shown in ("400 ('0', '1', '2') (0.30", "torch.Size([400, 1, 8, 8]) decoded [0.30", "400 ['000_0', '001_1']"):
        assert shown.split(" (0.")[0].split(" [0.")[0] in text, shown  # still what the page shows
        assert any(line.startswith(shown) for line in lines), (shown, lines)
    assert re.fullmatch(r"test accuracy \d+\.\d% after training on 400 synthetic images", lines[2]), lines
    assert re.fullmatch(r"\d+\.\d% \+- \d+\.\d% over 2 networks", lines[3]), lines
    assert namespace["accuracy"] > 0.5  # a network trained on 40 decoded images per class learned digits
    assert not (tmp_path / "default-store").exists()  # every command used the page's own store
