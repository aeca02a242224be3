"""Clean ASCII texts skip BERT's normalizer (embedq.model.tokenizing): the ids and the truncation
must be exactly what the model's full tokenizer gives, on both corpora and on the strings
most likely to tell the two paths apart."""

from __future__ import annotations

import random
from typing import Any

import pytest
from tokenizers import Tokenizer, normalizers

from embedq.model import tokenizing
from embedq.model.encoder import Encoder
from embedq.model.tokenizing import Tokenizing
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


ADDED_TOKENS = [
    "fill the [MASK] in",
    "[CLS] at the start and [SEP] in the middle",
    "lower case [mask] is matched too",
    "[UNK] [PAD]",
    "brackets [not a token] stay punctuation",
]


def full_encodings(backend: Any, texts: list[str]) -> list[Any]:
    return list(backend.encode_batch(texts, add_special_tokens=True))


def assert_same(
    backend: Any, texts: list[str], mine: Tokenizing | None = None, wanted: list[Any] | None = None
) -> None:
    """``mine`` (the cheaper paths) gives the full tokenizer's ids and truncation flags;
    ``wanted``: the full tokenizer's encodings of ``texts``, when the caller has them."""
    got = (mine or Tokenizing(backend)).encode(texts)
    wanted = wanted if wanted is not None else full_encodings(backend, texts)
    assert len(got) == len(wanted) == len(texts)
    for text, (ids, truncated), want in zip(texts, got, wanted, strict=True):
        assert ids == want.ids, repr(text[:80])
        assert truncated == bool(want.overflowing), repr(text[:80])


@pytest.fixture(scope="module")
def packaged() -> Encoder:
    return Encoder(device="cpu")


def test_the_packaged_model_s_tokenizer_takes_the_cheaper_paths(packaged: Encoder) -> None:
    paths = packaged._tokenizing
    assert paths.twin is not None and isinstance(paths.twin.normalizer, normalizers.Lowercase)
    assert paths.words is not None and paths.words.lowercase
    assert (paths.words.prefix, paths.words.suffix) == ([101], [102])  # [CLS] ... [SEP]


@pytest.mark.parametrize("corpus", ["short.jsonl", "long.jsonl"])
def test_both_corpora_tokenize_to_the_full_tokenizer_s_ids(packaged: Encoder, corpus: str) -> None:
    texts = [r["text"] for r in corpus_rows(corpus, 12_000)]
    wanted = full_encodings(packaged._backend, texts)  # once: the slow part of this test
    assert_same(packaged._backend, texts, wanted=wanted)
    # The word path alone, on the texts it takes (most of them), from a cold cache.
    words = Tokenizing(packaged._backend).words
    assert words is not None
    taken = [i for i, t in enumerate(texts) if tokenizing.clean(t)]
    assert len(taken) > 0.98 * len(texts) and all(words.takes(texts[i]) for i in taken)
    assert words.encode([texts[i] for i in taken]) == [
        (wanted[i].ids, bool(wanted[i].overflowing)) for i in taken
    ]
    # And through the encoder as the worker calls it (truncated flags included).
    got = packaged.tokenize(texts[:2000])
    assert [t.ids for t in got] == [e.ids for e in wanted[:2000]]


def test_hostile_strings_mixed_in_one_window_keep_their_order_and_ids(packaged: Encoder) -> None:
    texts = [*HOSTILE, "plain ascii text", *ADDED_TOKENS, *reversed(HOSTILE)]
    assert_same(packaged._backend, texts)
    assert_same(packaged._backend, [t for t in HOSTILE if not t.isascii()])
    assert_same(packaged._backend, ADDED_TOKENS)
    words = packaged._tokenizing.words
    assert words is not None and not any(words.takes(t) for t in ADDED_TOKENS[:4])
    truncated = packaged.tokenize(["word " * 600, "abc, " * 300, "short"])
    assert [t.truncated for t in truncated] == [True, True, False]
    assert len(truncated[0].ids) == packaged.max_seq_length


def test_long_words_and_a_full_cache_keep_the_ids_and_bound_the_memory(
    packaged: Encoder, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tokenizing, "MAX_WORDS", 500)
    mine = Tokenizing(packaged._backend)
    assert mine.words is not None
    rng = random.Random(7)
    letters = "abcdefghijklmnopqrstuvwxyz0123456789"
    for _ in range(5):  # 5 windows of 300 texts, ~10 new words each: the cache refills
        texts = [
            " ".join("".join(rng.choices(letters, k=rng.randint(1, 90))) for _ in range(10))
            for _ in range(300)
        ]
        assert_same(packaged._backend, texts, mine)
        assert len(mine.words.cache) <= 500
        assert all(len(w) <= tokenizing.MAX_WORD_CHARS for w in mine.words.cache)


def test_threads_sharing_one_full_cache_each_get_their_own_ids(
    packaged: Encoder, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The encoder is shared (replicas, the API's threads): one thread starting the cache
    # again must not take words from under another's window.
    import threading

    monkeypatch.setattr(tokenizing, "MAX_WORDS", 300)
    mine = Tokenizing(packaged._backend)
    rng = random.Random(11)
    windows = [
        [" ".join(f"w{rng.randrange(10**6)}" for _ in range(8)) for _ in range(100)]
        for _ in range(24)
    ]
    wanted = [
        [(e.ids, bool(e.overflowing)) for e in full_encodings(packaged._backend, w)]
        for w in windows
    ]
    got: dict[int, Any] = {}

    def work(first: int) -> None:
        for i in range(first, len(windows), 4):
            got[i] = mine.encode(windows[i])

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [got[i] for i in range(len(windows))] == wanted


def test_a_cased_bert_tokenizer_gets_paths_without_any_normalizer(packaged: Encoder) -> None:
    cased = Tokenizer.from_str(packaged._backend.to_str())
    cased.normalizer = normalizers.BertNormalizer(lowercase=False)
    mine = Tokenizing(cased)
    assert mine.twin is not None and mine.twin.normalizer is None
    assert mine.words is not None and not mine.words.lowercase
    assert_same(cased, [*HOSTILE, *ADDED_TOKENS, "Upper Case Stays Upper, MiXeD iPhone"])


def test_a_truncation_the_word_path_does_not_reproduce_leaves_it_to_the_tokenizer(
    packaged: Encoder,
) -> None:
    left = Tokenizer.from_str(packaged._backend.to_str())
    left.enable_truncation(max_length=16, direction="left")
    mine = Tokenizing(left)
    assert mine.twin is not None and mine.words is None
    assert_same(left, [*HOSTILE, "word " * 40, "short"])


def test_a_tokenizer_that_is_not_bert_s_keeps_its_full_pipeline(packaged: Encoder) -> None:
    other = Tokenizer.from_str(packaged._backend.to_str())
    other.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    mine = Tokenizing(other)
    assert mine.twin is None and mine.words is None
    assert_same(other, [*HOSTILE, *ADDED_TOKENS])


_THREADS_AFTER_A_WINDOW = """
import os
import threading
from embedq.core.config import Settings
from embedq.worker.launch import load_encoders

def cpu_ns():
    out = {}
    for tid in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{tid}/schedstat") as f:
            out[int(tid)] = int(f.read().split()[0])
    return out

encoder = load_encoders(Settings(device="cpu", replicas=1))[0]
before = cpu_ns()
for _ in range(3):
    encoder.tokenize([f"text number {i} for the window" for i in range(4096)])
    encoder.tokenize([f"café number {i} for the window" for i in range(4096)])  # the full path
after = cpu_ns()
me = threading.get_native_id()
print(sum(1 for t, ns in after.items() if t != me and ns - before.get(t, 0) > 2_000_000))
"""


@pytest.mark.parametrize("operator", [None, "true"])
def test_a_worker_tokenizes_in_its_reader_thread_unless_the_operator_asks_for_the_pool(
    operator: str | None,
) -> None:
    # The pool's threads cost more CPU than they saved beside the model and writer threads,
    # and their time was invisible in the tokenize stage's count (embedq.model.tokenizing.serial).
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TOKENIZERS_PARALLELISM"}
    if operator:
        env["TOKENIZERS_PARALLELISM"] = operator
    out = subprocess.run(
        [sys.executable, "-c", _THREADS_AFTER_A_WINDOW],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout.split()
    busy_threads = int(out[-1])  # threads other than the caller's that did the work
    if operator:
        assert busy_threads > 0  # the Rust tokenizer's pool
    else:
        assert busy_threads == 0
