"""Structures the demo, the tests, the examples and the benchmarks build."""

from __future__ import annotations

import ase
import numpy as np
from ase import units

from mmea_calc.errors import ConfigError

__all__ = ["water_box"]


def water_box(
    n_molecules: int = 32,
    density: float = 0.997,
    seed: int = 0,
    min_oo: float = 2.6,
    min_other: float = 1.6,
) -> ase.Atoms:
    """A periodic cubic box of randomly placed and oriented water molecules at ``density`` g/cm³.

    Molecules are added one at a time at random positions, rejecting any that would put two
    oxygens closer than ``min_oo`` or any other pair of molecules' atoms closer than
    ``min_other`` (minimum image). Relax it briefly before MD.

    Example:
        >>> box = water_box(8, seed=1)
        >>> box.get_chemical_formula(), bool(box.pbc.all()), len(box)
        ('H16O8', True, 24)
    """
    side = (n_molecules * 18.015 / units.mol / density) ** (1 / 3) * 1e8  # g/cm³ -> Å
    rng = np.random.default_rng(seed)
    local = np.array([[0.0, 0.0, 0.0], [0.7572, 0.5865, 0.0], [-0.7572, 0.5865, 0.0]])
    placed = np.zeros((0, 3))
    for index in range(n_molecules):
        for _ in range(20000):
            q, r = np.linalg.qr(rng.normal(size=(3, 3)))
            xyz = local @ (q * np.sign(np.diag(r))).T + rng.uniform(0, side, 3)
            delta = placed[None, :, :] - xyz[:, None, :]
            delta -= side * np.round(delta / side)
            dist = np.linalg.norm(delta, axis=-1)
            if dist.size == 0 or (dist[0, 0::3].min() >= min_oo and dist.min() >= min_other):
                placed = np.vstack([placed, xyz])
                break
        else:
            raise ConfigError(
                f"could not place water molecule {index + 1} of {n_molecules} at {density} g/cm³ "
                f"with min_oo={min_oo} Å, min_other={min_other} Å; lower the density or distances"
            )
    atoms = ase.Atoms("OH2" * n_molecules, positions=placed, cell=[side] * 3, pbc=True)
    atoms.wrap()
    return atoms
