"""How a writer process finds the staging arena (no torch: writer processes import it)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ArenaRef:
    """How a writer process attaches to the staging arena."""

    path: str
    size: int
    token: str
