"""What a sentence-transformers model directory says to do after the transformer:
pooling modes, dense layers, normalization, ``max_seq_length`` and lower-casing, read from
``modules.json``, ``1_Pooling/config.json``, ``sentence_bert_config.json`` and each Dense
module's ``config.json``. ``embedq.model.encoder`` runs the model as this ``ModelSpec`` says.

Two sparse layouts are recognised too (``embedq.model.sparse`` runs them): a ``SparseEncoder``
(an MLM transformer, ``transformer_task: fill-mask`` or the older ``MLMTransformer``, then
``SpladePooling``) and BGE-M3 (``sparse_linear.pt`` beside the weights). Whether the model
was trained for Matryoshka truncation comes from its model card's tags
(``embedq.model.matryoshka``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from embedq.core.errors import ConfigError

# sentence-transformers < 5 saves one boolean per mode, concatenated in this order; 5+ saves
# ``"pooling_mode": "mean"`` or a list of modes, concatenated in list order.
_LEGACY_POOLING_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}
_POOLING_MODES = frozenset(_LEGACY_POOLING_KEYS.values())


def _pooling_modes(cfg: dict[str, Any], where: Path) -> tuple[str, ...]:
    given = cfg.get("pooling_mode")
    if given is None:
        modes = tuple(mode for key, mode in _LEGACY_POOLING_KEYS.items() if cfg.get(key))
    else:
        modes = (given,) if isinstance(given, str) else tuple(given)
    unknown = [m for m in modes if m not in _POOLING_MODES]
    if unknown:
        raise ConfigError(f"{where}/config.json: pooling mode {unknown[0]!r} is not supported")
    if not modes:
        raise ConfigError(f"{where}/config.json enables no pooling mode")
    return modes


@dataclass(frozen=True)
class DenseSpec:
    path: Path
    in_features: int
    out_features: int
    bias: bool
    activation: str


@dataclass(frozen=True)
class SpladeSpec:
    """``SpladePooling``'s config: max or sum over tokens, relu or log1p_relu first."""

    strategy: str = "max"
    activation: str = "relu"


@dataclass(frozen=True)
class ModelSpec:
    """What the sentence-transformers config says to do after the transformer."""

    pooling: tuple[str, ...] = ("mean",)
    normalize: bool = False
    max_seq_length: int | None = None
    do_lower_case: bool = False
    dense: tuple[DenseSpec, ...] = field(default_factory=tuple)
    splade: SpladeSpec | None = None  # a SparseEncoder: sparse output only, no dense vector
    bge_m3: bool = False  # sparse_linear.pt beside the weights: dense and lexical weights

    @property
    def sparse(self) -> bool:
        return self.splade is not None or self.bge_m3

    def native_width(self, hidden_size: int) -> int:
        """The dense vector's size before any ``--dimensions``: the last Dense layer's output,
        else the pooled hidden states (one block per pooling mode); 0 for SPLADE (sparse
        only). The one derivation: the encoder and the gateway's identity both use it."""
        if self.splade is not None:
            return 0
        if self.dense:
            return self.dense[-1].out_features
        return hidden_size * len(self.pooling)

    @classmethod
    def load(cls, model_dir: Path) -> ModelSpec:
        bge_m3 = (model_dir / "sparse_linear.pt").is_file()
        modules_file = model_dir / "modules.json"
        if not modules_file.is_file():
            if bge_m3:
                # FlagEmbedding's BGEM3FlagModel: the CLS token, normalised.
                return cls(pooling=("cls",), normalize=True, bge_m3=True)
            # A plain transformers checkpoint: sentence-transformers would mean-pool it.
            return cls(pooling=("mean",), normalize=False)
        found: dict[str, Any] = {"bge_m3": bge_m3}
        dense: list[DenseSpec] = []
        for module in sorted(_read(modules_file), key=lambda m: m.get("idx", 0)):
            kind = module["type"].rsplit(".", 1)[-1]
            mdir = model_dir / module.get("path", "")
            if kind in ("Transformer", "MLMTransformer"):
                found.update(_transformer_options(mdir))
            elif kind == "SpladePooling":
                found["splade"] = _splade(mdir)
            elif kind == "Pooling":
                found["pooling"] = _pooling_modes(_read(mdir / "config.json"), mdir)
            elif kind == "Dense":
                dense.append(_dense(mdir))
            elif kind == "Normalize":
                found["normalize"] = True
            else:
                raise ConfigError(f"sentence-transformers module {module['type']} is not supported")
        return cls(**found, dense=tuple(dense))


def _read(path: Path) -> Any:
    return json.loads(path.read_text())


def _transformer_options(mdir: Path) -> dict[str, Any]:
    """``max_seq_length`` and ``do_lower_case`` from ``sentence_bert_config.json``, if any."""
    cfg_file = mdir / "sentence_bert_config.json"
    if not cfg_file.is_file():
        return {}
    cfg = _read(cfg_file)
    task = cfg.get("transformer_task", "feature-extraction")
    if task not in ("feature-extraction", "fill-mask"):
        raise ConfigError(f"{cfg_file}: transformer_task {task!r} is not supported")
    return {
        "max_seq_length": cfg.get("max_seq_length"),
        "do_lower_case": bool(cfg.get("do_lower_case", False)),
    }


def _dense(mdir: Path) -> DenseSpec:
    cfg = _read(mdir / "config.json")
    return DenseSpec(
        path=mdir,
        in_features=int(cfg["in_features"]),
        out_features=int(cfg["out_features"]),
        bias=bool(cfg.get("bias", True)),
        activation=str(cfg.get("activation_function", "torch.nn.modules.activation.Tanh")),
    )


def _splade(mdir: Path) -> SpladeSpec:
    cfg = _read(mdir / "config.json")
    spec = SpladeSpec(
        strategy=str(cfg.get("pooling_strategy", "max")),
        activation=str(cfg.get("activation_function", "relu")),
    )
    if spec.strategy not in ("max", "sum") or spec.activation not in ("relu", "log1p_relu"):
        raise ConfigError(f"{mdir}/config.json: SPLADE pooling {spec} is not supported")
    return spec
