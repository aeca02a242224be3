"""Listing every row of a collection, on any backend, whatever order it answers in.

No Milvus backend says *which* rows a limited query returns: the 2.3.5 server gives the
smallest ids, Milvus Lite any (issue 25: keyset pages that took a page's last id as the
cursor saw ~1,000 rows of a larger collection on Lite). Every backend does return all
matches when there are fewer than the limit, and counts a filter exactly: ``pages`` builds
on those two facts only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from embedq.core.errors import SinkUnavailable

Query = Callable[[str, list[str], int], list[dict[str, Any]]]  # (filter, fields, limit) -> rows
Count = Callable[[str], int]  # filter -> count(*)


def quoted(text: str) -> str:
    """``text`` inside a double-quoted Milvus filter string. A raw line break ends the
    string ("unterminated string literal") on Milvus Lite and the 2.3.5 server alike; both
    read ``\\n`` and ``\\r``, and take every other character as it is."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"')
    return escaped.replace("\n", "\\n").replace("\r", "\\r")


@dataclass(frozen=True)
class Span:
    """The ids from ``low`` (None: the first; excluded when ``after``) up to ``high``
    (excluded; None: the last): one part of a listing (``embedq.sink.milvus.Sink.rows``)."""

    low: str | None = None
    after: bool = False
    high: str | None = None

    def where(self, *, through: str | None = None) -> str:
        """The filter for the span's ids (``through``: only those up to that id)."""
        if self.low is None:
            bounds = ['id >= ""']
        else:
            bounds = [f'id {">" if self.after else ">="} "{quoted(self.low)}"']
        if self.high is not None:
            bounds.append(f'id < "{quoted(self.high)}"')
        if through is not None:
            bounds.append(f'id <= "{quoted(through)}"')
        return " and ".join(bounds)

    def split(self, cuts: Sequence[str]) -> list[Span]:
        """The span cut before each of ``cuts`` (ascending ids inside it)."""
        highs = [*cuts, self.high]
        return [Span(self.low, self.after, cuts[0])] + [
            Span(low, False, high) for low, high in zip(cuts, highs[1:], strict=True)
        ]


def cuts(ids: Sequence[str], rows: int, limit: int) -> list[str]:
    """Where to cut a span of ``rows`` rows sampled as ``ids`` (ascending, two or more): at
    the sample's quantiles, into parts of about three quarters of ``limit`` rows when the
    sample is spread like the span (Milvus Lite's), so that a part a little larger than
    its share of the sample still fits one query; never at the first id, so that every
    part holds a sampled id. A sample of the smallest ids makes small parts and a large
    last one, which is cut again."""
    parts = min(len(ids), max(2, -(-4 * rows // (3 * limit))))
    return [ids[len(ids) * i // parts] for i in range(1, parts)]


def pages(
    query: Query, count: Count, fields: list[str], limit: int, collection: str
) -> Iterator[list[dict[str, Any]]]:
    """Complete pages of disjoint id spans that cover every id, in id order.

    A span's query returns at most ``limit`` rows; fewer are all of the span. Else
    they are a sample: if ``count(*)`` says they are every row of the span up to the
    largest of them (the 2.3.5 server gives the smallest ids, in order), they are a
    page and the rest of the span follows (keyset paging, each page proven; not tried
    for a sample out of order, as Milvus Lite's are, where it would only spend a count
    of the whole span). If not, the span is cut at the sample's quantiles (``cuts``)
    and each part listed the same way. Each part holds a sampled id and lacks the
    others, so it is smaller than its span: the cutting ends."""
    todo = [Span()]
    while todo:
        span = todo.pop()
        found = query(span.where(), fields, limit)
        page = sorted({str(r["id"]): r for r in found}.values(), key=lambda r: str(r["id"]))
        if len(found) < limit:
            yield page
            continue
        sampled = [str(r["id"]) for r in page]
        arrived = [str(r["id"]) for r in found]
        top = sampled[-1]
        if arrived == sampled and count(span.where(through=top)) == len(page):
            yield page
            todo.append(Span(top, True, span.high))
            continue
        if len(sampled) < 2:
            raise SinkUnavailable(
                f"Milvus answered a query on {collection} with one id {limit} times"
            )
        todo.extend(reversed(span.split(cuts(sampled, count(span.where()), limit))))  # in id order
