"""The front door (issue 28): a short README over a documentation site whose references are
generated from the code, built with ``mkdocs build --strict``, and whose examples work on
the demo's data."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import click
import numpy as np
import pytest

from embedq.core.config import ENV_PREFIX, Settings
from embedq.sink.milvus import Row, Sink

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def hooks() -> ModuleType:
    spec = importlib.util.spec_from_file_location("docs_hooks", ROOT / "scripts" / "docs_hooks.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_readme_is_a_front_door_not_a_manual() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 250
    for heading in ("## Prerequisites", "## Set-up", "## Using it", "## Your own data"):
        assert heading in readme, heading
    for needed in ("Python ≥ 3.11", "Redis ≥ 7", "make demo", "make test", "make test-fast"):
        assert needed in readme, needed
    # every link to a page of the site names a page that exists
    for target in re.findall(r"\]\((docs/[^)#]+)", readme):
        assert (ROOT / target).is_file(), target


def test_every_page_is_in_the_nav_and_every_nav_entry_is_a_page() -> None:
    config = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    named = set(re.findall(r":\s+([\w/-]+\.md)\s*$", config, flags=re.M))
    pages = {str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md")}
    assert named == pages


def test_the_configuration_reference_is_every_setting_with_its_variable_and_flags() -> None:
    """Generated, so a new Settings field or a renamed flag cannot be missing from it."""
    table = hooks().settings_reference()
    rows = {line.split("|")[1].strip(" `"): line for line in table.splitlines()[2:]}
    assert set(rows) == {f.name for f in dataclasses.fields(Settings)}
    assert "`--grace`" in rows["grace_s"] and f"`{ENV_PREFIX}GRACE_S`" in rows["grace_s"]
    assert "`--chunk`" in rows["enqueue_chunk"]
    assert "`30.0`" in rows["grace_s"]


def test_the_cli_reference_is_every_command_with_its_help() -> None:
    from embedq.cli import main

    page = hooks().cli_reference()
    ctx = click.Context(main)
    for name in main.list_commands(ctx):
        command = main.get_command(ctx, name)
        assert command is not None
        assert f"## `embedq {name}`" in page or command.hidden, name
    assert "EMBEDQ_REDIS_URL" in page and "--drain" in page


def test_the_site_builds_strict(tmp_path: Path) -> None:
    """`make docs`: a broken link or anchor fails the build; the references are filled in."""
    if importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("material") is None:
        pytest.fail("mkdocs-material is not installed: pip install -e '.[docs]' (make docs)")
    site = tmp_path / "site"
    built = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={"NO_MKDOCS_2_WARNING": "1", "PATH": str(Path(sys.executable).parent)},
        check=False,
        timeout=300,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    configuration = (site / "reference" / "configuration" / "index.html").read_text()
    assert "EMBEDQ_MAX_BATCH_TOKENS" in configuration and "embedq:settings" not in configuration
    assert "embedq worker" in (site / "reference" / "cli" / "index.html").read_text()
    shutil.rmtree(site)


def _search_filter() -> str:
    """The ``filter`` of the gateway page's ``/v1/search`` curl example."""
    page = (DOCS / "gateway.md").read_text(encoding="utf-8")
    block = page.split("```sh\n", 1)[1].split("```", 1)[0].replace("\\\n", " ")
    (line,) = [line for line in block.splitlines() if "/v1/search" in line]
    words = shlex.split(line, comments=True)
    return str(json.loads(words[words.index("-d") + 1])["filter"])


def test_the_gateways_search_example_returns_rows_on_the_demos_data(sink: Sink) -> None:
    """Its filter once named meta["lang"], which examples/sample.jsonl does not have, so the
    example answered nothing on the demo's data (issue 28)."""
    records = [
        json.loads(line)
        for line in (ROOT / "examples" / "sample.jsonl").read_text(encoding="utf-8").splitlines()
    ]
    sink.ensure_collection(8, "docs-test")
    rng = np.random.default_rng(28)
    vectors = rng.standard_normal((len(records), 8)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    sink.upsert(
        [
            Row(id=r["id"], vector=v, text=r["text"], meta=r.get("meta"))
            for r, v in zip(records, vectors, strict=True)
        ]
    )
    hits = sink.search(vectors[0], 3, _search_filter())
    assert len(hits) == 3 and hits[0].id == records[0]["id"]


def test_the_getting_started_page_runs_what_the_readme_test_runs() -> None:
    """tests/test_readme.py runs README's "Using it" block; the site shows the same one."""

    def using_it(path: Path) -> str:
        section = path.read_text(encoding="utf-8").split("\n## Using it\n", 1)[1]
        return section.split("```sh\n", 1)[1].split("```", 1)[0]

    assert using_it(DOCS / "getting-started.md") == using_it(ROOT / "README.md")
