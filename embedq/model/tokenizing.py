"""Tokenizing a window of texts: clean ASCII texts skip BERT's normalizer, and most of them
skip the Rust tokenizer too.

The Rust tokenizer cost more CPU per short text than all of a worker's Python around it
(figures: see docs/benchmarks.md#what-changed-issue-13-and-why). Three paths, chosen per text:

* **Words** (``WordIds``): a clean ASCII text (no control character, no added token such
  as ``[MASK]`` in it) whose tokenizer is BERT's (``BertNormalizer`` + ``BertPreTokenizer``)
  is split into words here, lowercased if the model is uncased, and each word's ids come
  from a cache that the tokenizer fills, a window's new words in one call. The tokenizer
  runs its model on each pre-token alone, so the concatenation is exactly its result;
  then the post-processor's tokens around it, and its truncation. Several times cheaper
  than the tokenizer per text. This part holds the GIL, which the Rust tokenizer released:
  a worker's reader spends more time per text in Python and its process less CPU in all,
  and ``--procs-per-device`` gives a device more readers.
* **Twin**: other clean ASCII texts go through a copy of the tokenizer whose normalizer is
  only ``Lowercase`` (none for a cased model). On a text that is ASCII with no control
  character, every other step of ``BertNormalizer`` (clean control characters, map
  whitespace, space out CJK, strip accents) does nothing that ``BertPreTokenizer``, which
  splits on any whitespace, does not undo.
* **Full**: every other text, and every tokenizer not built that way.

The ids and truncation are the same on every path (``tests/test_tokenizing.py`` compares
both corpora and hostile strings); nearly every text of the benchmark corpora is clean ASCII.
Measured costs and shares: see docs/benchmarks.md#what-changed-issue-13-and-why.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from functools import partial
from itertools import chain
from typing import Any

# What BertNormalizer's clean_text removes from ASCII: control characters other than tab,
# newline and carriage return (it maps those to a space), NUL and DEL.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
# BertPreTokenizer on clean ASCII: runs of letters and digits, and each other printable
# character alone (all of ASCII's are punctuation to it); tab, newline, CR and space split.
_WORDS_UNCASED = re.compile(r"[a-z0-9]+|[^a-z0-9 \t\n\r]")
_WORDS_CASED = re.compile(r"[A-Za-z0-9]+|[^A-Za-z0-9 \t\n\r]")
MAX_WORDS = 200_000  # cached words; the cache starts again when full (hostile vocabularies)
MAX_WORD_CHARS = 64  # longer words are tokenized each time, never kept

Encoded = tuple[list[int], bool]  # token ids (special tokens included), truncated


class Tokenizing:
    """``encode``: a window's texts to (ids, truncated), each text by its cheapest exact
    path. The tokenizer must already be configured (truncation set, no padding)."""

    def __init__(self, backend: Any) -> None:
        self.backend = backend
        self.twin = ascii_twin(backend)
        self.words = WordIds.build(backend, self.twin) if self.twin is not None else None
        # By route: 0 full, 1 twin, 2 words (only routed to when there is a word path).
        full = partial(_encode, backend)
        twin = partial(_encode, self.twin) if self.twin is not None else full
        self._paths: tuple[Callable[[Sequence[str]], list[Encoded]], ...] = (
            full,
            twin,
            self.words.encode if self.words is not None else twin,
        )

    def encode(self, texts: Sequence[str]) -> list[Encoded]:
        if self.twin is None:
            return self._paths[0](texts)
        words = self.words
        route = [
            (2 if words is not None and words.takes(t) else 1) if clean(t) else 0 for t in texts
        ]
        if len(set(route)) <= 1:  # the usual window: one path for all
            return self._paths[route[0] if route else 0](texts)
        out: list[Encoded] = [([], False)] * len(texts)
        for path in set(route):
            where = [i for i, r in enumerate(route) if r == path]
            found = self._paths[path]([texts[i] for i in where])
            for i, encoded in zip(where, found, strict=True):
                out[i] = encoded
        return out


def clean(text: str) -> bool:
    """ASCII with no control character but tab, newline and CR (``isprintable`` first: a
    C loop, where the pattern's search is not)."""
    return text.isascii() and (text.isprintable() or _CONTROL.search(text) is None)


class WordIds:
    """Clean ASCII texts tokenized from a cache of each word's ids (see the module)."""

    def __init__(
        self,
        twin: Any,
        *,
        lowercase: bool,
        prefix: list[int],
        suffix: list[int],
        budget: int | None,
        added: Sequence[str],
    ) -> None:
        self.twin = twin
        self.lowercase = lowercase
        self.split = (_WORDS_UNCASED if lowercase else _WORDS_CASED).findall
        self.prefix, self.suffix = prefix, suffix
        self.limit = None if budget is None else len(prefix) + budget  # ids kept before suffix
        pattern = "|".join(map(re.escape, added))
        self.added = re.compile(pattern, re.IGNORECASE) if added else None
        # A first character of an added token ("[" for BERT's): most texts hold none, and
        # looking for one character is cheaper than the pattern's case-blind search.
        self.starts = sorted({c for t in added for c in (t[0].lower(), t[0].upper())})
        self.cache: dict[str, list[int]] = {}

    @classmethod
    def build(cls, backend: Any, twin: Any) -> WordIds | None:
        """For ``backend`` (BERT's pipeline, ``twin`` its ASCII copy), or None where its
        post-processor or truncation is not the plain kind this reproduces."""
        truncation = backend.truncation
        if backend.padding is not None or (truncation and truncation["direction"] != "right"):
            return None
        empty, one = twin.encode("").ids, twin.encode("a").ids
        word = twin.encode("a", add_special_tokens=False).ids
        k = next((k for k in range(len(empty) + 1) if empty[:k] + word + empty[k:] == one), -1)
        if k < 0:
            return None
        added = [t.content for t in backend.get_added_tokens_decoder().values() if t.content]
        made = cls(
            twin,
            lowercase=twin.normalizer is not None,
            prefix=empty[:k],
            suffix=empty[k:],
            budget=None if not truncation else truncation["max_length"] - len(empty),
            added=added,
        )
        probes = ["Probe, with: punctuation (and) CAPS!", "word " * 600, "x" * 300, "a"]
        wanted = [(e.ids, bool(e.overflowing)) for e in twin.encode_batch(probes)]
        return made if made.encode(probes) == wanted else None

    def takes(self, text: str) -> bool:
        """A clean ASCII ``text`` that holds no added token (``[MASK]`` and the like are
        matched in the raw text, before any splitting)."""
        if self.added is not None:
            for c in self.starts:
                if c in text:
                    return self.added.search(text) is None
        return True

    def encode(self, texts: Sequence[str]) -> list[Encoded]:
        split = self.split
        words = [split(t.lower()) for t in texts] if self.lowercase else list(map(split, texts))
        lookup = self._learn(words)
        prefix, suffix, limit = self.prefix, self.suffix, self.limit
        out: list[Encoded] = []
        for ws in words:
            ids = [*prefix, *chain.from_iterable(map(lookup, ws))]
            truncated = limit is not None and len(ids) > limit
            if truncated:
                del ids[limit:]
            ids += suffix
            out.append((ids, truncated))
        return out

    def _learn(self, words: list[list[str]]) -> Callable[[str], list[int]]:
        """The ids of every word of a window, the new ones from the tokenizer in one call;
        returns the lookup for this window."""
        cache = self.cache
        new = {w for ws in words for w in ws if w not in cache}
        if not new:
            return cache.__getitem__
        if len(cache) + len(new) > MAX_WORDS:
            # A new dict, not clear(): a window another thread is looking up in keeps its
            # own; this window's words are all learnt again below.
            cache = self.cache = {}
            new = {w for ws in words for w in ws}
        ordered = list(new)
        found = self.twin.encode_batch_fast(ordered, add_special_tokens=False)
        local: dict[str, list[int]] = {}  # too long to keep, or past the cap in this window
        for word, encoding in zip(ordered, found, strict=True):
            keep = len(word) <= MAX_WORD_CHARS and len(cache) < MAX_WORDS
            (cache if keep else local)[word] = encoding.ids
        if not local:
            return cache.__getitem__
        return lambda w: cache[w] if w in cache else local[w]


def ascii_twin(backend: Any) -> Any | None:
    """A copy of the Rust tokenizer ``backend`` that gives clean ASCII texts the same ids
    without BERT's normalizer, or None where its pipeline is not BERT's."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers

    normalizer = backend.normalizer
    if not isinstance(normalizer, normalizers.BertNormalizer) or not isinstance(
        backend.pre_tokenizer, pre_tokenizers.BertPreTokenizer
    ):
        return None
    twin = Tokenizer.from_str(backend.to_str())  # model, post-processor, truncation, padding
    twin.normalizer = normalizers.Lowercase() if normalizer.lowercase else None
    return twin


def _encode(tokenizer: Any, texts: Sequence[str]) -> list[Encoded]:
    # Without the offsets nothing reads (tokenizers >= 0.20): less CPU per text (see
    # docs/benchmarks.md#what-changed-issue-13-and-why).
    call = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)
    return [(e.ids, bool(e.overflowing)) for e in call(list(texts), add_special_tokens=True)]


def serial() -> None:
    """Tokenize in the calling thread, not on the Rust tokenizer's own thread pool (an
    operator's ``TOKENIZERS_PARALLELISM`` wins).

    A worker tokenizes in its reader thread, beside its model and writer threads;
    parallelism comes from ``--procs-per-device``. The pool's threads spent more CPU than
    they saved there, and their time was missing from the tokenize stage's own count (see
    docs/benchmarks.md#what-changed-issue-13-and-why). Read by the tokenizer at each call,
    so setting it before the first batch is enough."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
