"""Clean ASCII texts skip BERT's normalizer (embedq.tokenizing): the ids and the truncation
must be exactly what the model's full tokenizer gives, on both corpora and on the strings
most likely to tell the two paths apart."""

from __future__ import annotations

from typing import Any

import pytest
from tokenizers import Tokenizer, normalizers

from embedq import tokenizing
from embedq.encoder import Encoder
from tests.conftest import corpus_rows

HOSTILE = [
    "Hello\tWorld\nnew\rline  double  spaces ",
    "\t\n\r leading and trailing whitespace \r\n\t",
    "control\x01char inside a word",
    "bell\x07 and escape\x1b[31m sequences",
    "delete\x7fchar",
    "nul\x00byte",
    "vertical\x0btab and form\x0cfeed",
    "MiXeD CaSe ACRONYMS like NASA and iPhone",
    "punctuation!?...--(brackets)[x]{y} don't can't o'clock",
    "numbers 3.14159 1,000,000 0x1F 42nd",
    "emails a.b@c.org and urls https://example.com/a?b=c#d",
    "x" * 3000,  # one word past WordPiece's 100 characters: [UNK]
    "abc, " * 300,  # words and commas: truncated
    "word " * 600,  # many words: truncated
    " ",
    "café naïve résumé",  # accents: the full path strips them
    "日本語のテキスト and English",  # CJK: the full path spaces them out
    "non\u00a0breaking\u2003spaces",
    "replacement \ufffd char",
    "ASCII then é at the end",
    "Ünïcödé ÀÉÎÕÜ lower",
]


def full_encodings(backend: Any, texts: list[str]) -> list[Any]:
    return list(backend.encode_batch(texts, add_special_tokens=True))


def assert_same(backend: Any, twin: Any, texts: list[str]) -> None:
    mine = tokenizing.encode(backend, twin, texts)
    wanted = full_encodings(backend, texts)
    assert len(mine) == len(wanted) == len(texts)
    for text, got, want in zip(texts, mine, wanted, strict=True):
        assert got.ids == want.ids, repr(text[:80])
        assert bool(got.overflowing) == bool(want.overflowing), repr(text[:80])


@pytest.fixture(scope="module")
def packaged() -> Encoder:
    return Encoder(device="cpu")


def test_the_packaged_model_s_tokenizer_has_a_cheaper_twin_for_clean_ascii(
    packaged: Encoder,
) -> None:
    assert packaged._ascii is not None
    assert isinstance(packaged._ascii.normalizer, normalizers.Lowercase)


@pytest.mark.parametrize("corpus", ["short.jsonl", "long.jsonl"])
def test_both_corpora_tokenize_to_the_full_tokenizer_s_ids(packaged: Encoder, corpus: str) -> None:
    texts = [r["text"] for r in corpus_rows(corpus, 12_000)]
    assert_same(packaged._backend, packaged._ascii, texts)
    # And through the encoder as the worker calls it (truncated flags included).
    got = packaged.tokenize(texts[:2000])
    want = full_encodings(packaged._backend, texts[:2000])
    assert [t.ids for t in got] == [e.ids for e in want]


def test_hostile_strings_mixed_in_one_window_keep_their_order_and_ids(packaged: Encoder) -> None:
    texts = [*HOSTILE, "plain ascii text", *reversed(HOSTILE)]
    assert_same(packaged._backend, packaged._ascii, texts)
    assert_same(packaged._backend, packaged._ascii, [t for t in HOSTILE if not t.isascii()])
    truncated = packaged.tokenize(["word " * 600, "abc, " * 300, "short"])
    assert [t.truncated for t in truncated] == [True, True, False]
    assert len(truncated[0].ids) == packaged.max_seq_length


def test_a_cased_bert_tokenizer_gets_a_twin_without_any_normalizer(packaged: Encoder) -> None:
    cased = Tokenizer.from_str(packaged._backend.to_str())
    cased.normalizer = normalizers.BertNormalizer(lowercase=False)
    twin = tokenizing.ascii_twin(cased)
    assert twin is not None and twin.normalizer is None
    assert_same(cased, twin, [*HOSTILE, "Upper Case Stays Upper"])


def test_a_tokenizer_that_is_not_bert_s_keeps_its_full_pipeline(packaged: Encoder) -> None:
    other = Tokenizer.from_str(packaged._backend.to_str())
    other.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    assert tokenizing.ascii_twin(other) is None
    assert_same(other, None, HOSTILE)


_THREADS_AFTER_A_WINDOW = """
import os
from embedq.config import Settings
from embedq.launch import load_encoders

encoder = load_encoders(Settings(device="cpu", replicas=1))[0]
before = len(os.listdir("/proc/self/task"))
encoder.tokenize([f"text number {i} for the window" for i in range(4096)])
print(before, len(os.listdir("/proc/self/task")))
"""


@pytest.mark.parametrize("operator", [None, "true"])
def test_a_worker_tokenizes_in_its_reader_thread_unless_the_operator_asks_for_the_pool(
    operator: str | None,
) -> None:
    # The pool's threads cost more CPU than they saved beside the model and writer threads,
    # and their time was invisible in the tokenize stage's count (embedq.tokenizing.serial).
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TOKENIZERS_PARALLELISM"}
    if operator:
        env["TOKENIZERS_PARALLELISM"] = operator
    out = subprocess.run(
        [sys.executable, "-c", _THREADS_AFTER_A_WINDOW],
        env=env, capture_output=True, text=True, timeout=120, check=True,
    ).stdout.split()  # fmt: skip
    before, after = int(out[-2]), int(out[-1])
    if operator:
        assert after > before  # the Rust tokenizer started its pool
    else:
        assert after == before
