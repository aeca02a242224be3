"""Tokenizing a window of texts: clean ASCII texts skip BERT's normalizer.

BERT's ``BertNormalizer`` (clean control characters and whitespace, space out CJK, strip
accents by NFD, lowercase) was ~10 of the ~23 µs of CPU a short text cost the Rust
tokenizer (all-MiniLM-L6-v2, short.jsonl, one thread). On a text that is ASCII and has no
control character, every step but the lowercasing does nothing the pre-tokenizer does not
undo: there are no accents or CJK, and ``BertPreTokenizer`` splits on any whitespace, so
mapping tab, newline and carriage return to a space changes no token. Such texts go
through a twin of the tokenizer whose normalizer is only ``Lowercase`` (or none, for a
cased model); every other text, and every tokenizer not built that way, keeps the full
pipeline. The ids and truncation are the same (``tests/test_tokenizing.py`` compares both
corpora and hostile strings); 99.7 % of short.jsonl and 98.6 % of long.jsonl take the
cheaper path.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from typing import Any

# What BertNormalizer's clean_text removes from ASCII: control characters other than tab,
# newline and carriage return (it maps those to a space), NUL and DEL.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


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


def encode(backend: Any, twin: Any | None, texts: Sequence[str]) -> list[Any]:
    """The encodings of ``texts``, in order: clean ASCII ones through ``twin`` if any."""
    if twin is None:
        return _encode(backend, texts)
    plain = [t.isascii() and _CONTROL.search(t) is None for t in texts]
    if all(plain):
        return _encode(twin, texts)
    if not any(plain):
        return _encode(backend, texts)
    out: list[Any] = [None] * len(texts)
    for tokenizer, wanted in ((twin, True), (backend, False)):
        where = [i for i, p in enumerate(plain) if p is wanted]
        for i, encoding in zip(where, _encode(tokenizer, [texts[i] for i in where]), strict=True):
            out[i] = encoding
    return out


def _encode(tokenizer: Any, texts: Sequence[str]) -> list[Any]:
    # Without the offsets nothing reads (tokenizers >= 0.20): ~10 % less CPU per text.
    call = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)
    return list(call(list(texts), add_special_tokens=True))


def serial() -> None:
    """Tokenize in the calling thread, not on the Rust tokenizer's own thread pool (an
    operator's ``TOKENIZERS_PARALLELISM`` wins).

    A worker tokenizes in its reader thread, off the GIL, beside its model and writer
    threads; parallelism comes from ``--procs-per-device``. The pool's threads spent more
    CPU than they saved there: on short.jsonl (2,048 texts per call, 2 cores) ~23 µs of CPU
    per text against ~18 µs serially, and their time was missing from the tokenize stage's
    own count (5 µs shown, ~22 spent). Read by the tokenizer at each call, so setting it
    before the first batch is enough."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
