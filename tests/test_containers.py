"""The container build files, checked without a Docker engine (there is none here): every
file they copy exists, they run as a non-root user, their entrypoints are executable
scripts in the repo, the worker image pins the torch the project pins, never reaches for
a model hub, and leaves the heap to the worker (no preloaded allocator); the producer
image installs what the producer-side commands import.
"""

from __future__ import annotations

import re
import shlex
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str


def parse(path: Path) -> list[Instruction]:
    """Dockerfile instructions, continuation lines joined and comments dropped."""
    instructions: list[Instruction] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, args = (pending + line).partition(" ")
        instructions.append(Instruction(keyword.upper(), args.strip()))
        pending = ""
    assert not pending, f"{path} ends inside a continued line"
    return instructions


def repo_file_at(instructions: list[Instruction], path: str) -> str | None:
    """The repo path that ``COPY`` last put at ``path`` in the image (WORKDIR-relative
    targets resolved), or None."""
    workdir, found = "/", None
    for i in instructions:
        if i.keyword == "WORKDIR":
            workdir = str(Path(workdir) / i.args)
        if i.keyword != "COPY":
            continue
        *sources, target = shlex.split(i.args)
        into = Path(workdir) / target
        for source in sources:
            if not target.endswith("/"):
                if str(into) == path:
                    found = source
            elif (ROOT / source).is_dir() and path.startswith(f"{into}/"):
                found = str(Path(source) / path.removeprefix(f"{into}/"))
            elif str(into / Path(source).name) == path:
                found = source
    return found


def env_of(instructions: list[Instruction]) -> dict[str, str]:
    env: dict[str, str] = {}
    for i in instructions:
        if i.keyword == "ENV":
            for pair in shlex.split(i.args):
                name, _, value = pair.partition("=")
                env[name] = value
    return env


def args_of(instructions: list[Instruction]) -> dict[str, str]:
    return dict(
        i.args.partition("=")[::2] for i in instructions if i.keyword == "ARG" and "=" in i.args
    )


@pytest.mark.parametrize("side", ["workers", "producers"])
def test_an_image_copies_only_what_exists_and_runs_unprivileged(side: str) -> None:
    dockerfile = ROOT / side / "Dockerfile"
    instructions = parse(dockerfile)
    # Only ARG may come before the first FROM (the base image is a build argument).
    assert next(i.keyword for i in instructions if i.keyword != "ARG") == "FROM"
    for copy in (i for i in instructions if i.keyword == "COPY"):
        *sources, _target = shlex.split(copy.args)
        for source in sources:
            assert (ROOT / source).exists(), f"{dockerfile}: COPY {source} is not in the repo"
    (user,) = [i.args for i in instructions if i.keyword == "USER"]
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) >= 1000  # numeric: runAsNonRoot can check it
    (entrypoint,) = [i.args for i in instructions if i.keyword == "ENTRYPOINT"]
    (script,) = re.findall(r'"([^"]+)"', entrypoint)
    # The entrypoint is a script this repo ships, copied in, executable, exec-ing embedq.
    source = repo_file_at(instructions, script)
    shipped = ROOT / source if source else None
    assert shipped is not None, f"{dockerfile}: {script} is not copied from the repo"
    assert shipped.is_file() and shipped.stat().st_mode & 0o111, shipped
    assert "exec embedq" in shipped.read_text()
    assert env_of(instructions).get("EMBEDQ_LOG_JSON") == "true"


def test_the_worker_image_pins_torch_stays_offline_and_leaves_the_heap_to_the_worker() -> None:
    instructions = parse(ROOT / "workers" / "Dockerfile")
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    (pin,) = [d for d in pyproject["project"]["dependencies"] if d.startswith("torch")]
    assert pin == f"torch=={args_of(instructions)['TORCH_VERSION']}"
    env = env_of(instructions)
    assert env["HF_HUB_OFFLINE"] == "1" and env["TRANSFORMERS_OFFLINE"] == "1"
    # No allocator preloaded: embedq.worker.heap tunes glibc's, which another allocator would undo.
    assert "LD_PRELOAD" not in env


def test_the_producer_image_installs_what_the_producer_commands_import() -> None:
    """It installs embedq with --no-deps plus a short list: that list must cover the
    runtime dependencies that are not model-side (torch, transformers, numpy, pymilvus)."""
    instructions = parse(ROOT / "producers" / "Dockerfile")
    runs = " ".join(i.args for i in instructions if i.keyword == "RUN")
    installed = {re.split(r"[\[<>=]", spec.strip('"'))[0] for spec in re.findall(r'"[^"]+"', runs)}
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    model_side = {"torch", "transformers", "tokenizers", "numpy", "pymilvus", "milvus-lite"}
    needed = {re.split(r"[\[<>=;]", d)[0] for d in pyproject["project"]["dependencies"]}
    assert needed - model_side <= installed, needed - model_side - installed
    # and the optional sources (Parquet, PostgreSQL): a producer image reads them all
    extras = pyproject["project"]["optional-dependencies"]
    optional = {re.split(r"[\[<>=;]", d)[0] for d in extras["parquet"] + extras["postgres"]}
    assert optional <= installed, optional - installed
