"""The ONNX Runtime backend (``--backend onnx``, ``--quantize int8``): only the forward pass.

Tokenizing, pooling, dense layers, normalisation, Matryoshka truncation and the sparse
heads stay in ``embedq.model.encoder`` and run in fp32 on this graph's
``last_hidden_state``, so every backend shares them.

The export is done once per model, quantization and exporter version, into
``--model-cache`` (``EMBEDQ_MODEL_CACHE``, default ``~/.cache/embedq``), and reused by every
process. Racing workers are safe: each exports into its own temporary folder beside the
cache entry and renames it into place; a rename that loses the race drops its copy, so no
process ever opens a half-written file.

Exporters: optimum (``optimum-onnx``) and sentence-transformers' ONNX helpers both import
``optimum.exporters.onnx``, which needs ``transformers < 4.58`` (it imports
``get_parameter_dtype``, gone in transformers 5); embedq runs on transformers 5. So the graph
comes from PyTorch's own exporter (``torch.onnx.export``, the one optimum calls underneath) and
int8 from ONNX Runtime's own quantizer (``MatMulNBitsQuantizer``, 8 bits, blocks of
``INT8_BLOCK``): int8 weights, activations quantized per block at run time. ONNX Runtime
picks its int8 kernels for the CPU at run time (AVX-512 VNNI where present, else AVX2);
``cpu_isa`` says which this machine has.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import tempfile
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from embedq.core.errors import ConfigError

# openvino reads the ONNX export (embedq.model.openvino_backend).
BACKENDS = ("torch", "onnx", "openvino")
QUANTIZATIONS = ("none", "int8")
# Bumped when the export recipe changes, so old cache entries are not reused.
EXPORT_VERSION = 2
OPSET = 17
# int8 weights in blocks of 32 along the input dimension, each with its own scale; with
# accuracy_level 4 the activations are quantized per block too and the products run on int8
# kernels. Per-tensor dynamic quantization (``quantize_dynamic``) failed the gate on
# all-MiniLM-L6-v2 (lowest probe cosine 0.974, mean 0.990); blocks of 32 gave 0.9985 (128:
# 0.9954). See docs/backends.md.
INT8_BLOCK = 32
_SAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def default_cache_dir() -> Path:
    return Path("~/.cache/embedq").expanduser()


def variant(backend: str, quantize: str) -> str:
    """What the fingerprint adds for this backend: "" for fp32 torch (so existing
    collections keep theirs), else e.g. ``onnx-int8``."""
    if backend == "torch" and quantize == "none":
        return ""
    return backend if quantize == "none" else f"{backend}-{quantize}"


def check_choice(backend: str, quantize: str, device: str, splade: bool) -> None:
    """One line for a combination this backend does not serve."""
    if backend not in BACKENDS:
        raise ConfigError(f"--backend {backend}: use torch, onnx or openvino")
    if quantize not in QUANTIZATIONS:
        raise ConfigError(f"--quantize {quantize}: use none or int8")
    if backend == "torch" and quantize != "none":
        raise ConfigError(f"--quantize {quantize} needs --backend onnx or openvino")
    if backend != "torch" and device != "cpu":
        raise ConfigError(f"--backend {backend} runs on the CPU: pass --device cpu (got {device})")
    if backend != "torch" and splade:
        raise ConfigError(
            f"--backend {backend} does not serve SPLADE models (the export gives "
            "last_hidden_state, not the MLM logits SPLADE pools): use --backend torch"
        )


def cpu_isa() -> str:
    """The widest int8 instruction set this CPU offers ONNX Runtime's kernels."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return "unknown"
    if "avx512_vnni" in flags:
        return "AVX-512 VNNI"
    if "avx_vnni" in flags:
        return "AVX-VNNI"
    if "avx512f" in flags:
        return "AVX-512"
    if "avx2" in flags:
        return "AVX2"
    return "SSE"


def cache_entry(cache_dir: Path, name: str, model_fingerprint: str, quantize: str) -> Path:
    import onnxruntime
    import torch

    versions = f"v{EXPORT_VERSION}-torch{torch.__version__}-ort{onnxruntime.__version__}"
    return cache_dir / safe_name(f"{name}-{model_fingerprint}-{quantize}-{versions}")


def safe_name(tag: str) -> str:
    """``tag`` as one folder name: anything but letters, digits, ``_.-`` becomes ``_``."""
    return _SAFE.sub("_", tag)


def exported(
    model: Any,
    model_dir: Path,
    entry: Path,
    *,
    quantize: str,
    token_types: bool,
    backend: str = "onnx",
) -> Path:
    """The ``model.onnx`` of ``entry``, exporting it first when absent."""
    return built(
        entry,
        "model.onnx",
        lambda out: _export(model, out, quantize=quantize, token_types=token_types),
        f"--backend {backend}: cannot export {model_dir} to ONNX",
    )


def built(entry: Path, filename: str, build: Callable[[Path], None], failure: str) -> Path:
    """``entry / filename``, running ``build(folder)`` first when absent: into a temporary
    folder beside ``entry``, renamed into place (atomic; a rename that loses a race drops
    its copy). A failing build is one ``ConfigError`` line starting with ``failure``."""
    final = entry / filename
    if final.is_file():
        return final
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=entry.parent))
    try:
        try:
            # The tracer warns about every Python branch it freezes and the quantizers about
            # pre-processing: nothing the operator can act on, and the gate checks the result.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                build(tmp)
        except Exception as exc:
            first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
            raise ConfigError(f"{failure}: {type(exc).__name__}: {first}") from None
        try:
            tmp.rename(entry)  # atomic; fails if a racing process got there first
        except OSError:
            if not final.is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _export(model: Any, out: Path, *, quantize: str, token_types: bool) -> None:
    import torch

    names = ["input_ids", "attention_mask"] + (["token_type_ids"] if token_types else [])

    class LastHidden(torch.nn.Module):
        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, *inputs: Any) -> Any:
            return self.inner(**dict(zip(names, inputs, strict=True))).last_hidden_state

    example = torch.ones((2, 8), dtype=torch.long)
    args = tuple(example if n != "token_type_ids" else torch.zeros_like(example) for n in names)
    axes = {n: {0: "batch", 1: "tokens"} for n in [*names, "last_hidden_state"]}
    fp32 = out / ("model_fp32.onnx" if quantize == "int8" else "model.onnx")
    # Eager attention: SDPA's CPU masking path traces into ops the exporter rejects.
    previous = getattr(model.config, "_attn_implementation", None)
    try:
        if previous is not None:
            model.config._attn_implementation = "eager"
        with torch.inference_mode(False), torch.no_grad():
            torch.onnx.export(
                LastHidden(model).eval(),
                args,
                str(fp32),
                input_names=names,
                output_names=["last_hidden_state"],
                dynamic_axes=axes,
                opset_version=OPSET,
                dynamo=False,
            )
    finally:
        if previous is not None:
            model.config._attn_implementation = previous
    if quantize == "int8":
        quantizer_class = _quiet_import_quantizer()
        quantizer = quantizer_class(
            str(fp32), bits=8, block_size=INT8_BLOCK, is_symmetric=True, accuracy_level=4
        )
        quantizer.process()
        quantizer.model.save_model_to_file(str(out / "model.onnx"), True)
        fp32.unlink()
    (out / "embedq-export.json").write_text(
        json.dumps({"quantize": quantize, "opset": OPSET, "cpu_isa": cpu_isa(), "inputs": names})
    )


def _quiet_import_quantizer() -> Any:
    """``MatMulNBitsQuantizer``. Its module calls ``logging.basicConfig(level=INFO)`` on
    import, which would print every library's INFO lines on the root logger from then on, and
    logs a line per graph node: both undone here."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    return MatMulNBitsQuantizer


class OnnxForward:
    """ONNX Runtime sessions that answer like a transformers model: an object with
    ``last_hidden_state`` as an fp32 torch tensor.

    One session per calling thread, each with as many intra-op threads as torch has in that
    thread when it first calls: the worker's CPU replicas split the cores between them
    (``embedq.worker.replicas``), and two replicas sharing one session with every core each
    would oversubscribe the CPU. A session of MiniLM is about 90 MB (fp32) or 25 MB (int8).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._local = threading.local()
        # Opened now, in this thread: a file that cannot be loaded stops the start.
        self.input_names = [i.name for i in self._session().get_inputs()]

    def _session(self) -> Any:
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = self._open()
        return session

    def _open(self) -> Any:
        import onnxruntime
        import torch

        options = onnxruntime.SessionOptions()
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = torch.get_num_threads()
        options.log_severity_level = 3  # errors only: its warnings are not the operator's
        try:
            return onnxruntime.InferenceSession(
                str(self.path), options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:
            first = (str(exc).strip().splitlines() or [""])[0][:300]
            raise ConfigError(
                f"cannot load the ONNX model {self.path}: {first} (delete {self.path.parent} "
                "to export it again)"
            ) from None

    def __call__(self, input_ids: np.ndarray, mask: np.ndarray) -> Any:
        import torch

        feeds = {"input_ids": input_ids, "attention_mask": mask}
        if "token_type_ids" in self.input_names:
            feeds["token_type_ids"] = np.zeros_like(input_ids)
        (hidden,) = self._session().run(["last_hidden_state"], feeds)
        return SimpleNamespace(last_hidden_state=torch.from_numpy(np.asarray(hidden)))
