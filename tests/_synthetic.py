"""Small synthetic training sets for the training and CLI tests (seeded, in-process).

Labels come from a *teacher*: the same tiny base with a randomised MMEA adapter, so the target
is reachable by a student adapter and a short fit must close most of the gap.
"""

from __future__ import annotations

import ase
import numpy as np
import torch

from mmea_calc import AdaptedModel, MMEAConfig
from mmea_calc.testing import build_tiny_mace, evaluate, random_cluster, randomize_adapter


def teacher(std: float = 0.3, seed: int = 1) -> AdaptedModel:
    model = AdaptedModel(build_tiny_mace())
    model.add_adapter("teacher", MMEAConfig(rank=4))
    randomize_adapter(model, "teacher", std=std, seed=seed)
    return model


def label(model: torch.nn.Module, structures: list[ase.Atoms], shift_per_atom: float = 0.0):
    """Write REF_energy/REF_forces (and REF_stress for periodic structures) from ``model``.

    The energy is shifted by ``shift_per_atom`` times the number of atoms.
    """
    for atoms in structures:
        periodic = bool(atoms.pbc.all())
        out = evaluate(model, [atoms], compute_stress=periodic)
        atoms.info["REF_energy"] = float(out["energy"].detach()[0]) + shift_per_atom * len(atoms)
        atoms.arrays["REF_forces"] = out["forces"].detach().numpy().astype(np.float64)
        if periodic:
            atoms.info["REF_stress"] = out["stress"].detach()[0].numpy().astype(np.float64)
    return structures


def teacher_data(n: int = 24, n_atoms: int = 8, std: float = 0.3) -> list[ase.Atoms]:
    """Random H/C/O clusters labelled by a teacher adapter."""
    return label(teacher(std), [random_cluster(n_atoms, seed=s) for s in range(n)])


def one_molecule(n: int = 20, rattle: float = 0.08) -> list[ase.Atoms]:
    """Rattled copies of one cluster: a single-composition dataset (like one molecule's MD)."""
    start = random_cluster(9, seed=11, min_distance=1.1)
    frames = []
    for s in range(n):
        atoms = start.copy()
        atoms.rattle(rattle, seed=s)
        frames.append(atoms)
    return frames
