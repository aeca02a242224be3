"""Tiny sparse models built from configs (no hub): a SPLADE ``SparseEncoder`` and a BGE-M3
(XLM-R weights with ``sparse_linear.pt`` and ``colbert_linear.pt`` beside them), and a
way to load FlagEmbedding's ``BGEM3FlagModel`` under this transformers."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path
from typing import Any

from embedq.bench.sparse import save_splade
from embedq.model.encoder import packaged_model_dir

from .tiny_models import FULL_VOCAB, bert_config

SAMPLE = Path(__file__).resolve().parents[2] / "examples" / "sample.jsonl"


def build_splade(target: Path, *, seed: int = 0, strategy: str = "max") -> Path:
    """A one-layer BertForMaskedLM (the packaged tokenizer) saved by sentence-transformers
    as a SparseEncoder: Transformer(fill-mask) + SpladePooling."""
    import torch
    from transformers import BertForMaskedLM

    source = packaged_model_dir()
    assert source is not None
    torch.manual_seed(seed)
    model = BertForMaskedLM(bert_config(vocab_size=FULL_VOCAB, max_positions=128))
    with torch.no_grad():
        # Random logits are positive half the time; a real SPLADE activates a few hundred
        # of 30522 entries. A negative bias gives the tiny model that sparsity.
        model.cls.predictions.bias.fill_(-0.25)
    return save_splade(model, source, target, strategy=strategy, max_seq_length=128)


def _tokenizer(target: Path) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import XLMRobertaTokenizerFast

    texts = [json.loads(line)["text"] for line in SAMPLE.open(encoding="utf-8")]
    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    trainer = trainers.UnigramTrainer(vocab_size=600, special_tokens=specials, unk_token="<unk>")
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>",
        pair="<s> $A </s> </s> $B </s>",
        special_tokens=[("<s>", 0), ("</s>", 2)],
    )
    fast = XLMRobertaTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        sep_token="</s>",
        cls_token="<s>",
        unk_token="<unk>",
        pad_token="<pad>",
        mask_token="<mask>",
        model_max_length=128,
    )
    fast.save_pretrained(str(target))
    return fast


def build_bge_m3(target: Path, *, seed: int = 0) -> Path:
    """A one-layer XLMRobertaModel with BGE-M3's two heads beside it, no modules.json (the
    layout FlagEmbedding loads)."""
    import torch
    from transformers import XLMRobertaConfig, XLMRobertaModel

    target.mkdir(parents=True, exist_ok=True)
    tokenizer = _tokenizer(target)
    torch.manual_seed(seed)
    config = XLMRobertaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=130,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
    )
    XLMRobertaModel(config).save_pretrained(target)
    sparse = torch.nn.Linear(32, 1)
    colbert = torch.nn.Linear(32, 32)
    torch.save(sparse.state_dict(), target / "sparse_linear.pt")
    torch.save(colbert.state_dict(), target / "colbert_linear.pt")
    return target


def bgem3_flag_model(model_dir: Path) -> Any:
    """FlagEmbedding's ``BGEM3FlagModel`` on CPU in fp32.

    FlagEmbedding 1.4.2's package ``__init__`` imports its MiniCPM reranker, which imports
    ``transformers.modeling_attn_mask_utils``, gone in transformers 5; the BGE-M3 code path
    does not use it. An empty stand-in for that one module lets the package import; nothing
    of BGE-M3's path is replaced."""
    name = "transformers.modeling_attn_mask_utils"
    if name not in sys.modules:
        try:
            __import__(name)
        except ImportError:
            stub = types.ModuleType(name)
            for attr in (
                "AttentionMaskConverter",
                "_prepare_4d_attention_mask",
                "_prepare_4d_causal_attention_mask",
                "_prepare_4d_causal_attention_mask_for_sdpa",
            ):
                setattr(stub, attr, _unavailable(attr))
            sys.modules[name] = stub
    from FlagEmbedding import BGEM3FlagModel

    return BGEM3FlagModel(str(model_dir), use_fp16=False, devices="cpu")


def _unavailable(name: str) -> Any:
    def unavailable(*_args: Any, **_kwargs: Any) -> Any:
        raise NotImplementedError(f"{name} is not in this transformers (MiniCPM reranker only)")

    unavailable.__name__ = name
    return unavailable
