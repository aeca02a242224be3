"""``--dimensions N``: Matryoshka truncation, as sentence-transformers' ``truncate_dim``.

The first N dimensions of the model's (pooled, dense-projected, normalised) vector, then
L2-normalised again: what ``SentenceTransformer(..., truncate_dim=N).encode(...,
normalize_embeddings=True)`` returns. Only a model trained with a Matryoshka loss keeps its
quality when cut; sentence-transformers' model cards say so in their tags
(``loss:MatryoshkaLoss``, ``loss:Matryoshka2dLoss``, or ``matryoshka``), which is where this
looks. Any other model is refused unless ``--force-dimensions``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from embedq.core.errors import ConfigError

_FRONT_MATTER = re.compile(r"\A---\s*\n(.*?)\n---\s*\n", re.S)


def declared(model_dir: Path) -> bool:
    """Whether the model card (README.md's YAML front matter) tags Matryoshka training."""
    card = model_dir / "README.md"
    if not card.is_file():
        return False
    found = _FRONT_MATTER.match(card.read_text(encoding="utf-8", errors="replace"))
    if found is None:
        return False
    tags = _tags(found.group(1))
    return any("matryoshka" in tag.lower() for tag in tags)


def _tags(front_matter: str) -> list[str]:
    """The ``tags:`` list of a model card's front matter (block or flow style)."""
    tags: list[str] = []
    lines = front_matter.splitlines()
    for i, line in enumerate(lines):
        if not line.startswith("tags:"):
            continue
        inline = line[len("tags:") :].strip()
        if inline.startswith("["):
            return [t.strip().strip("'\"") for t in inline.strip("[]").split(",") if t.strip()]
        for item in lines[i + 1 :]:
            if not item.lstrip().startswith("- "):
                break
            tags.append(item.lstrip()[2:].strip().strip("'\""))
    return tags


def check(dimensions: int, native: int, model_dir: Path, force: bool) -> int:
    """The dimensions to truncate to (0: none); refuses ``--dimensions`` the model cannot
    give: wider than it, below 1, or a model not trained for truncation (unless forced)."""
    if not dimensions:
        return 0
    if native == 0:
        raise ConfigError("--dimensions: this model makes sparse vectors only; nothing to truncate")
    if dimensions < 1 or dimensions > native:
        raise ConfigError(
            f"--dimensions {dimensions}: the model makes {native}-dimensional vectors; "
            f"give 1 to {native}, or 0 for all of them"
        )
    if dimensions < native and not force and not declared(model_dir):
        raise ConfigError(
            f"--dimensions {dimensions}: {model_dir.name} does not declare Matryoshka training "
            "(no matryoshka tag in its model card, README.md), so its truncated vectors may "
            "lose much of their quality; pass --force-dimensions to truncate anyway"
        )
    return dimensions if dimensions < native else 0


def truncate(pooled: Any, dimensions: int) -> Any:
    """The first ``dimensions`` columns, L2-normalised (as ``truncate_dim`` + normalize)."""
    import torch

    return torch.nn.functional.normalize(pooled[:, :dimensions], p=2, dim=1)
