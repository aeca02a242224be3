"""The OpenVINO backend (``--backend openvino``, ``--quantize int8``): only the forward pass.

As with ``--backend onnx`` (``embedq.model.onnx_backend``), tokenizing, pooling, dense
layers, normalisation, Matryoshka truncation and the sparse heads stay in
``embedq.model.encoder`` and run in fp32 torch on this graph's ``last_hidden_state``.

No second exporter: OpenVINO reads the fp32 ONNX export that ``--backend onnx`` makes (the
same cache entry, exported once) with its ONNX frontend, and the result is saved as OpenVINO
IR (``model.xml`` + ``model.bin``) in a cache entry of its own, written atomically the same
way. ``--quantize int8`` is OpenVINO's own path: NNCF's data-free weight compression
(``nncf.compress_weights``, int8 asymmetric per output channel); OpenVINO's CPU plugin then
runs the matrix products from int8 weights. NNCF is an optional package: without it,
``--quantize int8`` refuses with one line.

OpenVINO's CPU plugin runs in bf16 by default on CPUs with AVX-512 BF16 or AMX, and
``save_model`` stores fp16 weights by default: both are turned off, so "fp32" means fp32 on
every CPU and the accuracy gate judges what serves.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import logging
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from embedq.core.errors import ConfigError
from embedq.model import onnx_backend

# Bumped when the conversion recipe changes, so old cache entries are not reused.
CONVERT_VERSION = 1


def check_available(quantize: str) -> None:
    """One line when the packages this choice needs are missing."""
    if importlib.util.find_spec("openvino") is None:
        raise ConfigError("--backend openvino needs OpenVINO: pip install 'embedq[openvino]'")
    if quantize == "int8" and importlib.util.find_spec("nncf") is None:
        raise ConfigError(
            "--backend openvino --quantize int8 needs NNCF (OpenVINO's weight compression): "
            "pip install 'embedq[openvino]', or use --backend onnx --quantize int8"
        )


def cache_entry(onnx_entry: Path, quantize: str) -> Path:
    """The IR's cache entry: the ONNX entry it was read from, OpenVINO's version and the
    quantization."""
    import openvino

    tag = f"{onnx_entry.name}-openvino{openvino.__version__}-v{CONVERT_VERSION}-{quantize}"
    return onnx_entry.parent / onnx_backend.safe_name(tag)


def converted(onnx_path: Path, entry: Path, *, quantize: str) -> Path:
    """The ``model.xml`` of ``entry``, converting ``onnx_path`` first when absent."""
    return onnx_backend.built(
        entry,
        "model.xml",
        lambda out: _convert(onnx_path, out, quantize=quantize),
        f"--backend openvino: cannot convert {onnx_path} to OpenVINO",
    )


def _convert(onnx_path: Path, out: Path, *, quantize: str) -> None:
    import openvino

    model = openvino.Core().read_model(str(onnx_path))
    if quantize == "int8":
        import nncf

        nncf.set_log_level(logging.ERROR)
        # NNCF draws a progress bar on stdout, which is the operator's (--json output).
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            model = nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM)
    openvino.save_model(model, str(out / "model.xml"), compress_to_fp16=False)
    (out / "embedq-export.json").write_text(
        json.dumps(
            {
                "quantize": quantize,
                "openvino": openvino.__version__,
                "source": str(onnx_path),
                "cpu_isa": onnx_backend.cpu_isa(),
            }
        )
    )


class OpenvinoForward:
    """Compiled OpenVINO models that answer like a transformers model: an object with
    ``last_hidden_state`` as an fp32 torch tensor.

    One compiled model and infer request per calling thread (a request serves one call at a
    time), each with as many threads as torch has in that thread when it first calls, as
    ``OnnxForward`` does: the worker's CPU replicas split the cores between them."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._local = threading.local()
        # Compiled now, in this thread: a file that cannot be loaded stops the start.
        self.input_names = {
            name for port in self._request().model_inputs for name in port.get_names()
        }

    def _request(self) -> Any:
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self._compile().create_infer_request()
        return request

    def _compile(self) -> Any:
        import openvino
        import torch

        core = openvino.Core()
        config = {
            "INFERENCE_PRECISION_HINT": "f32",
            "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_NUM_THREADS": torch.get_num_threads(),
        }
        try:
            return core.compile_model(core.read_model(str(self.path)), "CPU", config)
        except Exception as exc:
            first = (str(exc).strip().splitlines() or [""])[0][:300]
            raise ConfigError(
                f"cannot load the OpenVINO model {self.path}: {first} (delete "
                f"{self.path.parent} to convert it again)"
            ) from None

    def __call__(self, input_ids: np.ndarray, mask: np.ndarray) -> Any:
        import torch

        feeds = {"input_ids": input_ids, "attention_mask": mask}
        if "token_type_ids" in self.input_names:
            feeds["token_type_ids"] = np.zeros_like(input_ids)
        # Copied out of the request (share_outputs is off by default): the next call on this
        # thread reuses the request's buffers.
        hidden = self._request().infer(feeds)["last_hidden_state"]
        return SimpleNamespace(last_hidden_state=torch.from_numpy(np.asarray(hidden)))
