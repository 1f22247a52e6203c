"""MMEAConfig: the hyper-parameters of one MMEA adapter (what its file records)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from mmea_calc.adapter import PHI_CHOICES
from mmea_calc.errors import ConfigError

__all__ = ["MMEAConfig"]


@dataclass
class MMEAConfig:
    """Hyper-parameters of one MMEA adapter.

    Attributes:
        rank: width ``r`` of the SiLU bottleneck feeding the gates.
        phi: ``"exp"`` (default) or ``"1+x"``, the map from gate logit to scale.
        targets: ``None`` for every ``o3.Linear`` with internal weights, or module names / glob
            patterns (``"interactions.*.linear"``); each pattern must match something.
        shift_init_std: std of the normal init of ``W_s`` (0 keeps the adapter an exact identity).
        logit_bound: soft bound ``c`` on gate logits (``c tanh(g / c)``), so that ``exp`` cannot
            overflow far outside the training data; ``None`` for the paper's unbounded map.
    """

    rank: int = 16
    phi: str = "exp"
    targets: str | Sequence[str] | None = None
    shift_init_std: float = 0.0
    logit_bound: float | None = 10.0

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 1:
            raise ConfigError(f"rank must be a positive integer, got {self.rank!r}")
        if self.phi not in PHI_CHOICES:
            raise ConfigError(f"phi={self.phi!r} is not supported; valid: {list(PHI_CHOICES)}")
        if self.logit_bound is not None and not self.logit_bound > 0:
            raise ConfigError(f"logit_bound must be > 0 or None, got {self.logit_bound!r}")
        if not self.shift_init_std >= 0:
            raise ConfigError(f"shift_init_std must be >= 0, got {self.shift_init_std}")
        if isinstance(self.targets, str):
            self.targets = [self.targets]
        elif self.targets is not None:
            self.targets = list(self.targets)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
