"""``ckptstore.check(state)``: find what a save would refuse before training starts."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ckptstore.errors import UnsupportedTypeError
from ckptstore.plan.tree import flatten


@dataclass(frozen=True, slots=True)
class CheckReport:
    """What ``save(state, ...)`` would store: arrays, their bytes, and every problem."""

    arrays: int
    nbytes: int
    problems: tuple[tuple[str, str], ...]  #: (name, why) for each value a save would refuse

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        head = f"{self.arrays} arrays, {self.nbytes} bytes"
        if self.ok:
            return f"{head}; every value can be saved"
        return f"{head}; {len(self.problems)} cannot be saved: " + "; ".join(
            f"{name}: {why}" for name, why in self.problems)


def check(state: Any, *, raise_error: bool = True) -> CheckReport:
    """Walk ``state`` as ``save`` would (Stateful objects through ``state_dict()``),
    collecting every value that cannot be stored without pickle, not only the first.

    Raises :class:`UnsupportedTypeError` naming all of them unless
    ``raise_error=False``; returns a :class:`CheckReport` otherwise. Nothing is
    copied or written.
    """
    problems: list[tuple[str, str]] = []
    _skeleton, leaves = flatten(state, problems)
    nbytes = sum(int(v.nbytes) if isinstance(v, np.ndarray) else v.numel() * v.element_size()
                 for v in (leaf.value for leaf in leaves))
    report = CheckReport(len(leaves), nbytes, tuple(problems))
    if raise_error and not report.ok:
        raise UnsupportedTypeError(report.summary())
    return report
