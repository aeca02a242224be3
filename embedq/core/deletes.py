"""The bound on bulk deletes, after rsync's ``--max-delete``.

A tool that deletes rows because a comparison says they should not be there (``verify
--repair`` against the index, ``enqueue --cleanup`` against the ledger) trusts that
comparison. When its evidence is wrong (Redis lost its data, a typo in a field name, a wrong
``--stream``) every row looks doomed. So such a tool deletes at most a bound: ``N`` rows,
``P%`` of what it compares against, or ``all`` (the operator lifts it); past the bound it
deletes nothing and exits ``ExitCode.REFUSED`` with one line saying why.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from embedq.core.errors import ConfigError, DeletesRefused

DEFAULT = "10%"
_SPEC = re.compile(r"^\s*(?:(?P<all>all)|(?P<count>\d+)|(?P<percent>\d+(?:\.\d+)?)\s*%)\s*$", re.I)


@dataclass(frozen=True)
class MaxDelete:
    """``count`` rows, or ``percent`` of the total; neither: no bound (``all``)."""

    count: int | None = None
    percent: float | None = None

    @classmethod
    def parse(cls, spec: str, flag: str = "--max-delete") -> MaxDelete:
        found = _SPEC.match(spec)
        if found is None:
            raise ConfigError(f"{flag} {spec!r}: give a number of rows (100), a share (10%) or all")
        if found["all"]:
            return cls()
        if found["count"] is not None:
            return cls(count=int(found["count"]))
        percent = float(found["percent"])
        if percent > 100:
            raise ConfigError(f"{flag} {spec!r}: a share is at most 100%")
        return cls(percent=percent)

    @property
    def unbounded(self) -> bool:
        return self.count is None and self.percent is None

    def limit(self, total: int) -> int | None:
        """How many of ``total`` may go (None: any number)."""
        if self.count is not None:
            return self.count
        if self.percent is not None:
            return math.floor(total * self.percent / 100)
        return None

    def check(self, doomed: int, total: int, what: str) -> None:
        """Raise ``DeletesRefused`` when deleting ``doomed`` of ``total`` passes the bound."""
        limit = self.limit(total)
        if limit is not None and doomed > limit:
            bound = f"{self.percent:g}% of {total}" if self.percent is not None else "the bound"
            raise DeletesRefused(
                f"refused to delete {doomed} of {total} {what}: more than --max-delete allows "
                f"({limit}, {bound}); nothing was deleted. Check the evidence, then rerun with "
                f"--max-delete {doomed} (or all)"
            )

    def __str__(self) -> str:
        if self.count is not None:
            return str(self.count)
        return "all" if self.percent is None else f"{self.percent:g}%"
