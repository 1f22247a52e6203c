"""MMEAConfig: the hyper-parameters of one MMEA adapter (what its file records)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from mmea_calc.adapter import PHI_CHOICES
from mmea_calc.errors import ConfigError

__all__ = ["PRESETS", "MMEAConfig"]

#: ``gates``: the gates alone. ``paper``: the gates plus what the MMEA authors' code also trains
#: (see :mod:`mmea_calc.paper`).
PRESETS = ("gates", "paper")


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
        preset: ``"gates"`` (default): the gates alone. ``"paper"``: also the parts the MMEA
            authors' code trains (:mod:`mmea_calc.paper`: LoRA of rank ``rank`` on the radial
            MLPs, the skip tensor products and the symmetric contractions' highest-order
            weights; updates of the lower-order contraction weights and the Bessel
            frequencies), all held by the adapter.
        lora_alpha: scaling numerator of the ``paper`` preset's LoRA parts (``alpha / rank``);
            ``None`` (default) means ``alpha = rank``, scaling 1, as the authors' alpha 16 at
            rank 16. Unused by ``gates``.
    """

    rank: int = 16
    phi: str = "exp"
    targets: str | Sequence[str] | None = None
    shift_init_std: float = 0.0
    logit_bound: float | None = 10.0
    preset: str = "gates"
    lora_alpha: float | None = None

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ConfigError(f"preset {self.preset!r} is not known; valid: {list(PRESETS)}")
        if self.lora_alpha is not None and not self.lora_alpha > 0:
            raise ConfigError(f"lora_alpha must be > 0 or None, got {self.lora_alpha!r}")
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

    @property
    def lora_scaling(self) -> float:
        """``lora_alpha / rank`` (1 when ``lora_alpha`` is ``None``)."""
        return 1.0 if self.lora_alpha is None else float(self.lora_alpha) / self.rank

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
