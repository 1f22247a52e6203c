"""GFN2-xTB reference data for the embedded base model and its two environment adapters.

Five sets, split train/valid/test (seeded; ``solvated``: test only), written as extxyz with
``REF_energy`` (eV), ``REF_forces`` (eV/Å), ``REF_stress`` (periodic cells only; ASE Voigt
order, eV/Å³) and ``config_type``:

* ``base``: gas-phase, closed-shell molecules of ``ase.collections.g2`` made only of H, C, N, O,
  plus water clusters (dimer..hexamer, pre-relaxed with xTB), displaced at several temperatures
  (independent Gaussian displacements, width ``0.025 Å * sqrt(T / 300 K)``, 1.3x for H);
* ``water``: periodic boxes of 32 H2O at 1 g/cm³ sampled with ASE's rigid TIP3P model (RATTLE
  bond constraints, short Langevin MD at 300 K and 350 K, one worker process each), then given
  thermal intramolecular displacements and a random isotropic compression/expansion of up to
  3 % (for stress);
* ``aspirin``: aspirin sampled hot with GFN2-xTB Langevin MD at 600 K and 800 K (0.5 fs steps);
* ``aspirin_distorted``: frames of the ``aspirin`` splits (read from ``--out``, so run ``aspirin``
  first) with every atom displaced by an independent Gaussian of width 0.05, 0.1, 0.15 or 0.2 Å,
  relabelled. Each split is drawn from the same split of ``aspirin``, so no test geometry leaks
  into training. They teach an adapter the compressed, off-equilibrium geometries that
  relaxations from rough starts and hot MD reach (the robust-gates issue);
* ``solvated``: aspirin in liquid water, periodic (21 + 3 x 56 = 189 atoms at 1 g/cm³, a cubic
  box of 12.54 Å), the benchmark of per-atom routing (solute atoms on the ``aspirin`` adapter,
  water on ``water``). Nothing is trained on it: every frame is in the ``test`` split. Aspirin
  geometries come from ``aspirin_train.xyz`` (read from ``--out``, so run ``aspirin`` first;
  train split only, so the benchmark shares no solute geometry with the aspirin test split).
  Each start: a hot aspirin frame, randomly rotated, at the centre of an equilibrated rigid
  TIP3P box of 66 H2O (the count that fills the box at 1 g/cm³; the box is randomly shifted,
  so the cavity falls in a different place each time); the waters closest to aspirin are
  deleted whole until 56 remain (clearance: minimum-image distance minus 2.2 Å for any pair,
  2.6 Å heavy atom-heavy atom; the 10 with the least clearance go, so the count is fixed).
  The interface is relaxed (BFGS, a few steps) and thermalised by Langevin MD at 300 K (0.5 fs
  steps, friction 0.01/fs: stronger than elsewhere, so the hot solute and the carved cavity
  settle quickly), 100 fs, then a frame every 40 fs. The MD force field (``--solvated-md``) is
  the package's own embedded model, by default split by atom (per-node adapter indices:
  aspirin atoms on ``aspirin``, water on ``water``), plus a harmonic wall between solute and
  water atoms (:data:`SOLVATED_CONTACTS`: 2.6 Å heavy-heavy, 1.6 Å for a hydrogen bond, 2.0 Å
  for other pairs with an H). Why both: driven by the whole-structure ``water`` adapter, whose
  aspirin forces are poor, the solute ends up strained (GFN2-xTB RMS force on the isolated
  solute 1.44 eV/Å, ``aspirin`` adapter error on it 281 meV/Å against 81 on its own test set),
  and the benchmark would measure that strain rather than the solvent's effect; the split
  keeps the solute near xTB's geometries (with the wall: 0.98 eV/Å and 97 meV/Å on the
  committed frames), but neither adapter ever saw a solute-water interface: without the wall
  the split MD let a water O bind to the carboxyl carbon (1.44 Å) and methyl H come within
  1.54 Å of water O. The model only picks the geometries; every label is GFN2-xTB. A frame is
  kept only if it is sane (no two atoms closer than 0.8 Å, aspirin's covalent bonds below
  1.7 Å, every water's O-H below 1.25 Å: no bond broke, no proton moved; no solute-water pair
  more than 0.25 Å inside its contact distance). Aspirin atoms come first; ``arrays["solute"]``
  marks them.

Every sampled geometry is labelled with GFN2-xTB through ``tblite`` (``pip install tblite``, works
offline). Frames whose SCF fails are dropped and counted. The test splits of the two environments
are also copied to ``mmea_calc/embedded/data/`` (the held-out frames shipped with the package),
and so are ``--solvated-shipped`` frames of the solvated set (about 20 kB a frame).

Usage::

    OMP_NUM_THREADS=1 python scripts/make_xtb_data.py --sets base --out data
    OMP_NUM_THREADS=1 python scripts/make_xtb_data.py --sets water aspirin --out data
    OMP_NUM_THREADS=1 python scripts/make_xtb_data.py --sets aspirin_distorted --out data
    OMP_NUM_THREADS=1 python scripts/make_xtb_data.py --sets solvated --out data
    python scripts/make_xtb_data.py --quick --out /tmp/xtb-quick   # a few frames of each
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import ClassVar

import ase.io
import numpy as np
from ase import Atoms, units
from ase.build import molecule
from ase.calculators.calculator import Calculator, all_changes
from ase.calculators.tip3p import TIP3P, angleHOH, rOH
from ase.collections import g2
from ase.constraints import FixBondLengths
from ase.data import covalent_radii
from ase.md.langevin import Langevin
from ase.md.velocitydistribution import MaxwellBoltzmannDistribution, Stationary
from ase.optimize import BFGS

ROOT = Path(__file__).resolve().parents[1]
EMBEDDED_DATA = ROOT / "mmea_calc" / "embedded" / "data"
ELEMENTS = set("HCNO")
SPLITS = ("train", "valid", "test")
WATER_VOLUME = 29.91  # Å^3 per H2O at 1 g/cm^3

#: aspirin starting geometry (Å; the first frame of rMD17's aspirin set, geometry only — it is
#: re-optimised with GFN2-xTB before sampling, and every label here is our own).
ASPIRIN = """\
C 2.21980801 -0.41692091 0.23932280
C 0.75781203 1.97394771 -0.15946657
C 2.85121599 0.80674557 0.45246548
C 2.13949274 1.96156144 0.12320392
C -3.58676876 0.46086798 -0.01797197
C 0.83210286 -0.53083021 -0.04480604
C 0.10574839 0.66218309 -0.21157102
O -0.89399542 -2.12603161 -0.50643944
O -1.80096314 1.35559036 1.32618608
O 1.29261459 -2.79600262 -0.41076854
C 0.30528815 -1.89351306 -0.34766192
C -2.08806353 0.80560647 0.27959149
O -1.16498184 0.51585772 -0.67991803
H 1.03803893 -3.72623539 -0.55691877
H 2.81016449 -1.35980257 0.45603959
H 0.18013378 2.87746337 -0.11178026
H 3.81913943 0.88022978 0.86798957
H 2.70220388 2.87129739 0.41480985
H -4.19310200 0.10857690 0.82530876
H -4.01741766 1.39669120 -0.46925264
H -3.72708349 -0.25458631 -0.85660884
"""


# ---------------------------------------------------------------------------- labelling
def xtb():
    """A fresh GFN2-xTB calculator (quiet)."""
    from tblite.ase import TBLite

    return TBLite(method="GFN2-xTB", verbosity=0, max_iterations=300)


def label(atoms: Atoms, config_type: str, **info) -> Atoms | None:
    """A clean copy of ``atoms`` with GFN2-xTB energy, forces (and stress); None if SCF fails."""
    out = Atoms(atoms.numbers, atoms.positions, cell=atoms.cell, pbc=atoms.pbc)
    work = out.copy()
    work.calc = xtb()
    try:
        energy = work.get_potential_energy()
        forces = work.get_forces()
        stress = work.get_stress(voigt=True) if out.pbc.all() else None
    except Exception as exc:  # tblite raises a plain RuntimeError when the SCF fails
        print(f"  dropped a {config_type} frame: {str(exc).splitlines()[0][:100]}")
        return None
    out.info["REF_energy"] = float(energy)
    out.arrays["REF_forces"] = np.asarray(forces, dtype=float)
    if stress is not None:
        out.info["REF_stress"] = np.asarray(stress, dtype=float)
    out.info["config_type"] = config_type
    out.info.update(info)
    return out


def from_results(atoms: Atoms, config_type: str, **info) -> Atoms:
    """A clean labelled copy of ``atoms`` from the results its xTB calculator already holds."""
    out = Atoms(atoms.numbers, atoms.positions, cell=atoms.cell, pbc=atoms.pbc)
    out.info["REF_energy"] = float(atoms.get_potential_energy())
    out.arrays["REF_forces"] = np.asarray(atoms.get_forces(), dtype=float)
    out.info["config_type"] = config_type
    out.info.update(info)
    return out


def label_all(frames: list[tuple[Atoms, str, dict]], what: str) -> list[Atoms]:
    start = time.perf_counter()
    out = []
    for i, (atoms, config_type, info) in enumerate(frames):
        labelled = label(atoms, config_type, **info)
        if labelled is not None:
            out.append(labelled)
        if (i + 1) % 50 == 0:
            print(f"  {what}: labelled {i + 1}/{len(frames)} ({time.perf_counter() - start:.0f} s)")
    seconds = time.perf_counter() - start
    print(f"{what}: {len(out)}/{len(frames)} frames labelled in {seconds:.1f} s")
    return out


def rattle(atoms: Atoms, temperature: float, rng: np.random.Generator) -> Atoms:
    """Independent Gaussian displacements of width ``0.025 Å sqrt(T/300 K)`` (1.3x for H)."""
    sigma = 0.025 * np.sqrt(temperature / 300.0) * np.where(atoms.numbers == 1, 1.3, 1.0)
    out = atoms.copy()
    out.positions += rng.normal(size=(len(atoms), 3)) * sigma[:, None]
    return out


def relax(atoms: Atoms, fmax: float, steps: int) -> Atoms:
    work = Atoms(atoms.numbers, atoms.positions)
    work.calc = xtb()
    BFGS(work, logfile=None).run(fmax=fmax, steps=steps)
    return Atoms(work.numbers, work.positions)


# ---------------------------------------------------------------------------- base set
def g2_molecules() -> list[tuple[str, Atoms]]:
    """Closed-shell g2 molecules made only of H, C, N, O (at least two atoms)."""
    out = []
    for name in g2.names:
        atoms = g2[name]
        closed = not atoms.get_initial_magnetic_moments().any() and atoms.numbers.sum() % 2 == 0
        if len(atoms) > 1 and set(atoms.get_chemical_symbols()) <= ELEMENTS and closed:
            out.append((name, Atoms(atoms.numbers, atoms.positions)))
    return out


def water_cluster(n: int, rng: np.random.Generator) -> Atoms:
    """``n`` randomly oriented H2O, each O 2.7-3.1 Å from an earlier O and >= 2.6 Å from all."""
    cluster = Atoms()
    centres: list[np.ndarray] = []
    while len(centres) < n:
        if centres:
            anchor = centres[rng.integers(len(centres))]
            direction = rng.normal(size=3)
            candidate = anchor + direction / np.linalg.norm(direction) * rng.uniform(2.7, 3.1)
            if min(np.linalg.norm(candidate - c) for c in centres) < 2.6:
                continue
        else:
            candidate = np.zeros(3)
        water = molecule("H2O")
        water.rotate(rng.uniform(0, 360), rng.normal(size=3))
        water.translate(candidate - water[0].position)
        cluster += water
        centres.append(candidate)
    return cluster


def base_frames(rng: np.random.Generator, quick: bool) -> list[tuple[Atoms, str, dict]]:
    temperatures = (300.0, 600.0, 900.0, 1200.0)
    per_temperature = 1 if quick else 2
    molecules = g2_molecules()[: 4 if quick else None]
    frames = []
    for name, atoms in molecules:
        frames.append((atoms, "base_molecule", {"source": name, "temperature_K": 0.0}))
        for temperature in temperatures:
            for _ in range(per_temperature):
                info = {"source": name, "temperature_K": temperature}
                frames.append((rattle(atoms, temperature, rng), "base_molecule", info))
    starts = 1 if quick else 2
    for n in range(2, 7):
        for start in range(starts):
            cluster = relax(water_cluster(n, rng), fmax=0.1, steps=8 if quick else 60)
            source = f"water_cluster_{n}_{start}"
            frames.append((cluster, "water_cluster", {"source": source, "temperature_K": 0.0}))
            for temperature in (100.0, 200.0, 300.0, 450.0, 600.0, 800.0)[: 2 if quick else 6]:
                info = {"source": source, "temperature_K": temperature}
                frames.append((rattle(cluster, temperature, rng), "water_cluster", info))
    print(f"base: {len(molecules)} g2 molecules, {5 * starts} water clusters, {len(frames)} frames")
    return frames


# ---------------------------------------------------------------------------- liquid water
def water_box(n_molecules: int, rng: np.random.Generator) -> Atoms:
    """TIP3P-geometry H2O (ordered O, H, H) on a jittered cubic grid at 1 g/cm^3, periodic."""
    side = (n_molecules * WATER_VOLUME) ** (1 / 3)
    per_side = int(np.ceil(n_molecules ** (1 / 3)))
    spacing = side / per_side
    half = np.radians(angleHOH) / 2
    template = np.array(
        [
            [0, 0, 0],
            [rOH * np.sin(half), rOH * np.cos(half), 0],
            [-rOH * np.sin(half), rOH * np.cos(half), 0],
        ]
    )
    grid = [np.array(ijk) for ijk in np.ndindex(per_side, per_side, per_side)]
    chosen = rng.choice(len(grid), size=n_molecules, replace=False)
    box = Atoms(cell=[side] * 3, pbc=True)
    for index in sorted(chosen):
        water = Atoms("OH2", positions=template)
        water.rotate(rng.uniform(0, 360), rng.normal(size=3))
        water.translate((grid[index] + 0.5) * spacing + rng.uniform(-0.2, 0.2, size=3))
        box += water
    return box


def tip3p_trajectory(
    n_molecules: int, temperature: float, n_frames: int, seed: int, quick: bool
) -> list[Atoms]:
    """Frames of rigid TIP3P water (RATTLE constraints) from Langevin MD, 2 fs steps.

    ASE's TIP3P and RATTLE are pure Python (about 0.4 s a step for 32 H2O), so the run is short:
    400 fs from a jittered grid, then a frame every 20 fs.
    """
    rng = np.random.default_rng(seed)
    atoms = water_box(n_molecules, rng)
    pairs = [(3 * i + j, 3 * i + (j + 1) % 3) for i in range(n_molecules) for j in range(3)]
    atoms.constraints = FixBondLengths(pairs, tolerance=1e-6)
    side = atoms.cell.lengths()[0]
    atoms.calc = TIP3P(rc=min(4.5, side / 2 - 0.2), width=1.0)
    MaxwellBoltzmannDistribution(atoms, temperature_K=temperature, rng=rng)
    Stationary(atoms)
    dyn = Langevin(atoms, 2.0 * units.fs, temperature_K=temperature, friction=0.02, rng=rng)
    dyn.run(20 if quick else 200)  # equilibrate
    frames = []
    for _ in range(n_frames):
        dyn.run(5 if quick else 10)
        frames.append(Atoms(atoms.numbers, atoms.positions, cell=atoms.cell, pbc=True))
    return frames


def flex(box: Atoms, temperature: float, rng: np.random.Generator) -> Atoms:
    """Thermal intramolecular displacements and an isotropic strain of the molecule centres."""
    out = rattle(box, temperature, rng)
    scale = rng.uniform(0.97, 1.03)
    positions = out.positions.reshape(-1, 3, 3)
    centres = positions[:, :1, :]
    out.positions = (positions - centres + centres * scale).reshape(-1, 3)
    out.set_cell(box.cell * scale, scale_atoms=False)
    out.wrap()
    return out


def _water_job(job: tuple) -> list[tuple[Atoms, str, dict]]:
    """One temperature: TIP3P trajectory, flexed and labelled (runs in a worker process)."""
    n_molecules, temperature, n_frames, seed, quick = job
    rng = np.random.default_rng(seed)
    trajectory = tip3p_trajectory(
        n_molecules, temperature, n_frames, int(rng.integers(2**31)), quick
    )
    info = {"source": f"tip3p_{n_molecules}", "temperature_K": temperature}
    frames = [(flex(box, temperature, rng), "liquid_water", info) for box in trajectory]
    return label_all(frames, f"water {temperature:.0f} K")


def water_set(rng: np.random.Generator, quick: bool, n_frames: int) -> list[Atoms]:
    """Labelled liquid-water frames, two temperatures in two worker processes."""
    from multiprocessing import get_context

    n_molecules = 8 if quick else 32
    jobs = [
        (n_molecules, temperature, n_frames // 2, int(rng.integers(2**31)), quick)
        for temperature in (300.0, 350.0)
    ]
    with get_context("fork").Pool(len(jobs)) as pool:
        return [frame for part in pool.map(_water_job, jobs) for frame in part]


# ---------------------------------------------------------------------------- hot aspirin
def aspirin_frames(rng: np.random.Generator, quick: bool, n_frames: int) -> list[Atoms]:
    """Labelled frames of GFN2-xTB Langevin MD (labels come from the MD's own xTB calls)."""
    symbols, positions = [], []
    for line in ASPIRIN.splitlines():
        symbol, *xyz = line.split()
        symbols.append(symbol)
        positions.append([float(v) for v in xyz])
    start = relax(Atoms(symbols, positions), fmax=0.05, steps=20 if quick else 200)
    frames = []
    t0 = time.perf_counter()
    for temperature in (600.0, 800.0):
        atoms = start.copy()
        atoms.calc = xtb()
        MaxwellBoltzmannDistribution(atoms, temperature_K=temperature, rng=rng)
        Stationary(atoms)
        seed = int(rng.integers(2**31))
        dyn = Langevin(
            atoms,
            0.5 * units.fs,
            temperature_K=temperature,
            friction=0.02,
            rng=np.random.default_rng(seed),
        )
        dyn.run(20 if quick else 400)  # equilibrate (200 fs)
        for _ in range(n_frames // 2):
            dyn.run(4 if quick else 20)  # 10 fs apart
            info = {"source": "aspirin_md", "temperature_K": temperature}
            frames.append(from_results(atoms, "aspirin_hot", **info))
        print(f"  aspirin {temperature:.0f} K done ({time.perf_counter() - t0:.0f} s)")
    print(f"aspirin: {len(frames)} frames in {time.perf_counter() - t0:.1f} s (MD included)")
    return frames


DISTORTION_SIGMAS = (0.05, 0.1, 0.15, 0.2)  # Å


def distorted_aspirin(source: Path, rng: np.random.Generator, quick: bool) -> dict:
    """Rattled, relabelled copies of the ``aspirin`` splits: ``{split: [labelled frames]}``.

    Per split, ``4/7`` as many frames as the source split, the displacement width cycling through
    :data:`DISTORTION_SIGMAS` (the same for H as for heavy atoms).
    """
    parts = {}
    for part in SPLITS:
        path = source / f"aspirin_{part}.xyz"
        if not path.is_file():
            raise SystemExit(f"{path} is missing: make the 'aspirin' set first (--sets aspirin)")
        frames = ase.io.read(path, ":")
        count = 2 if quick else max(1, round(len(frames) * 4 / 7))
        picked = rng.choice(len(frames), size=min(count, len(frames)), replace=False)
        jobs = []
        for i, index in enumerate(sorted(picked)):
            sigma = DISTORTION_SIGMAS[i % len(DISTORTION_SIGMAS)]
            atoms = Atoms(frames[index].numbers, frames[index].positions)
            atoms.positions += rng.normal(scale=sigma, size=atoms.positions.shape)
            info = {"source": f"aspirin_{part}_{index}", "sigma_A": sigma}
            jobs.append((atoms, "aspirin_distorted", info))
        parts[part] = label_all(jobs, f"aspirin_distorted {part}")
    return parts


# ---------------------------------------------------------------------------- solvated aspirin
SOLVATED_CLEARANCE = (2.2, 2.6)  # Å: water atom to aspirin atom, any pair / heavy-heavy
SOLVATED_TEMPERATURE = 300.0  # K


def solvate(aspirin: Atoms, box: Atoms, n_waters: int, rng: np.random.Generator) -> tuple:
    """``aspirin`` (randomly rotated) at the centre of ``box`` (H2O ordered O, H, H), shifted.

    Keeps the ``n_waters`` whole waters with the largest clearance from aspirin (minimum-image
    distance minus :data:`SOLVATED_CLEARANCE`, smallest over the pair of molecules). Returns the
    solvated box (aspirin first) and the smallest clearance kept (< 0: a contact closer than the
    thresholds, left to the relaxation).
    """
    from ase.geometry import get_distances

    side = box.cell.lengths()
    solute = Atoms(aspirin.numbers, aspirin.positions)
    solute.rotate(rng.uniform(0, 360), rng.normal(size=3), center="COM")
    solute.translate(side / 2 - solute.get_center_of_mass())
    water = Atoms(box.numbers, box.positions + rng.uniform(0, 1, size=3) * side)
    _, d = get_distances(water.positions, solute.positions, cell=box.cell, pbc=True)
    heavy = np.outer(water.numbers != 1, solute.numbers != 1)
    any_pair, heavy_pair = SOLVATED_CLEARANCE
    clearance = np.minimum(d - any_pair, np.where(heavy, d - heavy_pair, np.inf)).min(axis=1)
    per_water = clearance.reshape(-1, 3).min(axis=1)
    keep = np.sort(np.argsort(-per_water, kind="stable")[:n_waters])
    out = Atoms(solute.numbers, solute.positions, cell=box.cell, pbc=True)
    out += water[(3 * keep[:, None] + np.arange(3)).ravel()]
    return out, float(per_water[keep].min())


#: solute-water contact distances (Å) the MD's wall keeps: heavy atom-heavy atom, polar H (bound
#: to O) to O (a hydrogen bond), any other pair with an H (C-H...O, H...H, O-H...C)
SOLVATED_CONTACTS = {"heavy": 2.6, "hbond": 1.6, "other": 2.0}
SOLVATED_WALL = 50.0  # eV/Å^2, harmonic below the contact distance
CONTACT_SLACK = 0.25  # Å: a frame with a solute-water pair this much inside its contact is dropped


def contact_distances(atoms: Atoms, n_solute: int) -> np.ndarray:
    """``[n_solute, n_water_atoms]`` contact distances (:data:`SOLVATED_CONTACTS`); an H is polar
    when its nearest heavy atom is an O."""
    numbers = atoms.numbers
    heavy, oxygen = numbers != 1, numbers == 8
    d = atoms.get_all_distances(mic=True)
    nearest = np.where(heavy[None, :], d, np.inf).argmin(axis=1)
    polar = ~heavy & oxygen[nearest]
    solute, water = slice(None, n_solute), slice(n_solute, None)
    r0 = np.full((n_solute, len(atoms) - n_solute), SOLVATED_CONTACTS["other"])
    r0[np.outer(heavy[solute], heavy[water])] = SOLVATED_CONTACTS["heavy"]
    hbond = np.outer(polar[solute], oxygen[water]) | np.outer(oxygen[solute], polar[water])
    r0[hbond] = SOLVATED_CONTACTS["hbond"]
    return r0


def overlaps(atoms: Atoms, contacts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """How far each solute-water pair lies inside its contact distance (>= 0), and the
    minimum-image vectors from solute atom to water atom."""
    from ase.geometry import get_distances

    n_solute = contacts.shape[0]
    positions = atoms.positions
    vectors, d = get_distances(
        positions[:n_solute], positions[n_solute:], cell=atoms.cell, pbc=atoms.pbc
    )
    return np.clip(contacts - d, 0.0, None), vectors / d[..., None]


def insane(atoms: Atoms, bonds: np.ndarray, contacts: np.ndarray) -> str | None:
    """Why a solvated frame is broken (``None``: it is sane): atoms closer than 0.8 Å, an aspirin
    bond (``bonds``: index pairs) longer than 1.7 Å, a water O-H longer than 1.25 Å, or a
    solute-water pair more than :data:`CONTACT_SLACK` inside its contact distance."""
    n_solute = contacts.shape[0]
    d = atoms.get_all_distances(mic=True)
    np.fill_diagonal(d, np.inf)
    if d.min() < 0.8:
        return f"two atoms {d.min():.2f} Å apart"
    longest = d[bonds[:, 0], bonds[:, 1]].max()
    if longest > 1.7:
        return f"an aspirin bond stretched to {longest:.2f} Å"
    oxygens = np.arange(n_solute, len(atoms), 3)
    oh = max(d[oxygens, oxygens + 1].max(), d[oxygens, oxygens + 2].max())
    if oh > 1.25:
        return f"a water O-H stretched to {oh:.2f} Å"
    inside = overlaps(atoms, contacts)[0].max()
    if inside > CONTACT_SLACK:
        return f"a solute-water contact {inside:.2f} Å too close"
    return None


#: MD force fields of the solvated set: adapter of the solute atoms, adapter of the water atoms
SOLVATED_FORCE_FIELDS = {"split": ("aspirin", "water"), "water": ("water", "water"),
                         "base": (None, None)}  # fmt: skip


class SolvatedForceField(Calculator):
    """The package's embedded model (first ``n_solute`` atoms on adapter ``solute``, the others
    on ``solvent``: per-node adapter indices, ``None`` the bare base) plus a harmonic wall that
    keeps solute-water pairs at their ``contacts`` distances. The adapters never saw a
    solute-water interface; the wall only stops the unphysical contacts they allow."""

    implemented_properties: ClassVar[list[str]] = ["energy", "free_energy", "forces"]

    def __init__(self, model, solute: str | None, solvent: str | None) -> None:
        super().__init__()
        self.model = model
        index = {None: -1, **{n: i for i, n in enumerate(model.adapter_names)}}
        self.index = (index[solute], index[solvent])
        self.contacts: np.ndarray | None = None  # set per start

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        import torch

        from mmea_calc.data import atoms_to_graph, collate
        from mmea_calc.model import ADAPTER_INDEX_KEY

        Calculator.calculate(self, atoms, properties, system_changes)
        n_solute = self.contacts.shape[0]
        graph = atoms_to_graph(self.atoms, self.model.base_info)
        data = collate([graph], dtype=self.model.dtype, device=self.model.device)
        index = torch.full((len(self.atoms),), self.index[1], dtype=torch.long)
        index[:n_solute] = self.index[0]
        data[ADAPTER_INDEX_KEY] = index.to(self.model.device)
        out = self.model(data, compute_stress=False, training=False)
        energy = float(out["energy"].detach().cpu()[0])
        forces = out["forces"].detach().cpu().double().numpy()
        inside, unit = overlaps(self.atoms, self.contacts)
        push = (SOLVATED_WALL * inside)[..., None] * unit  # on the water atom, away from solute
        forces[:n_solute] -= push.sum(axis=1)
        forces[n_solute:] += push.sum(axis=0)
        energy += 0.5 * SOLVATED_WALL * float((inside**2).sum())
        self.results = {"energy": energy, "free_energy": energy, "forces": forces}


def solvated_force_field(kind: str) -> SolvatedForceField:
    """The MD force field of the solvated set (a key of :data:`SOLVATED_FORCE_FIELDS`)."""
    import contextlib
    import sys

    with contextlib.redirect_stdout(sys.stderr):
        from mmea_calc import MMEACalculator

        model = MMEACalculator("embedded", adapters="embedded", select=None).model
    return SolvatedForceField(model, *SOLVATED_FORCE_FIELDS[kind])


def solvated_frames(
    source: Path, rng: np.random.Generator, quick: bool, n_frames: int, n_starts: int,
    n_waters: int, md_model: str = "split",
) -> tuple[list[tuple[Atoms, str, dict]], dict]:  # fmt: skip
    """Unlabelled solvated-aspirin frames (``n_frames`` from ``n_starts`` independent starts),
    and a record of how they were made."""
    path = source / "aspirin_train.xyz"
    if not path.is_file():
        raise SystemExit(f"{path} is missing: make the 'aspirin' set first (--sets aspirin)")
    pool = ase.io.read(path, ":")
    per_start = -(-n_frames // n_starts)
    aspirin = Atoms(pool[0].numbers, pool[0].positions)
    # the box: aspirin + n_waters H2O at 1 g/cm^3, filled with as many TIP3P waters as fit it
    volume = (aspirin.get_masses().sum() + n_waters * 18.015) / (units._Nav * 1e-24)
    n_box = round(volume / WATER_VOLUME)
    picked = rng.choice(len(pool), size=n_starts, replace=False)
    calc = solvated_force_field(md_model)
    frames, record, dropped = [], {"starts": [], "dropped": 0}, []
    t0 = time.perf_counter()
    for start, index in enumerate(picked):
        box = tip3p_trajectory(n_box, SOLVATED_TEMPERATURE, 1, int(rng.integers(2**31)), quick)[0]
        aspirin = Atoms(pool[index].numbers, pool[index].positions)
        radii = covalent_radii[aspirin.numbers]
        bonded = aspirin.get_all_distances() < 1.25 * (radii[:, None] + radii[None, :])
        bonds = np.argwhere(np.triu(bonded, k=1))
        atoms, clearance = solvate(aspirin, box, n_waters, rng)
        calc.contacts = contacts = contact_distances(atoms, len(aspirin))
        atoms.calc = calc
        BFGS(atoms, logfile=None).run(fmax=1.0, steps=10 if quick else 50)
        MaxwellBoltzmannDistribution(atoms, temperature_K=SOLVATED_TEMPERATURE, rng=rng)
        Stationary(atoms)
        dyn = Langevin(
            atoms,
            0.5 * units.fs,
            temperature_K=SOLVATED_TEMPERATURE,
            friction=0.01 / units.fs,
            fixcm=False,
            rng=np.random.default_rng(int(rng.integers(2**31))),
        )
        dyn.run(20 if quick else 200)  # thermalise (100 fs)
        for _ in range(min(per_start, n_frames - len(frames) - len(dropped))):
            dyn.run(10 if quick else 80)  # 40 fs apart
            frame = Atoms(atoms.numbers, atoms.positions, cell=atoms.cell, pbc=True)
            problem = insane(frame, bonds, contacts)
            if problem is not None:
                print(f"  dropped a solvated frame of start {start}: {problem}")
                dropped.append(start)
                continue
            info = {
                "source": f"aspirin_train_{index}",
                "start": start,
                "time_fs": round(dyn.nsteps * 0.5, 1),
                "temperature_K": SOLVATED_TEMPERATURE,
            }
            frames.append((frame, "solvated_aspirin", info))
        record["starts"].append(
            {"aspirin_train_frame": int(index), "clearance_A": round(clearance, 3)}
        )
        print(
            f"  solvated start {start}: aspirin_train[{index}], {n_box} -> {n_waters} H2O, "
            f"least clearance {clearance:+.2f} Å ({time.perf_counter() - t0:.0f} s)"
        )
    solute, solvent = (name or "base" for name in SOLVATED_FORCE_FIELDS[md_model])
    record.update(
        atoms=len(aspirin) + 3 * n_waters,
        side_A=round(float(box.cell.lengths()[0]), 3),
        tip3p_waters=n_box,
        dropped=len(dropped),
        md_model={
            "solute": solute,
            "water": solvent,
            "wall_eV_per_A2": SOLVATED_WALL,
            "contacts_A": SOLVATED_CONTACTS,
        },
        sampling_seconds=round(time.perf_counter() - t0, 1),
    )
    print(f"solvated: {len(frames)} frames sampled in {record['sampling_seconds']} s")
    return frames, record


def solvated_set(
    source: Path, rng: np.random.Generator, quick: bool, n_frames: int, n_starts: int,
    n_waters: int, md_model: str = "split",
) -> tuple[list[Atoms], dict]:  # fmt: skip
    """Labelled solvated-aspirin frames (``arrays["solute"]`` marks aspirin) and their record."""
    frames, record = solvated_frames(source, rng, quick, n_frames, n_starts, n_waters, md_model)
    start = time.perf_counter()
    labelled = label_all(frames, "solvated")
    seconds = time.perf_counter() - start
    record["label_seconds_per_frame"] = round(seconds / max(1, len(frames)), 1)
    for atoms in labelled:
        atoms.arrays["solute"] = np.arange(len(atoms)) < len(atoms) - 3 * n_waters
    return labelled, record


# ---------------------------------------------------------------------------- splits, output
def split(frames: list[Atoms], n_valid: int, n_test: int, rng: np.random.Generator) -> dict:
    order = rng.permutation(len(frames))
    test = [frames[i] for i in sorted(order[:n_test])]
    valid = [frames[i] for i in sorted(order[n_test : n_test + n_valid])]
    train = [frames[i] for i in sorted(order[n_test + n_valid :])]
    return {"train": train, "valid": valid, "test": test}


def write_set(
    name: str, parts: dict, out: Path, ship: bool, seconds: float, n_ship: int | None = None
) -> dict:
    """Write the splits ``parts`` holds; ``ship``: copy the test split into the package (only
    ``n_ship`` frames of it, evenly spread, when given)."""
    out.mkdir(parents=True, exist_ok=True)
    summary = {"seconds": round(seconds, 1)}
    for part in (p for p in SPLITS if p in parts):
        path = out / f"{name}_{part}.xyz"
        ase.io.write(path, parts[part], format="extxyz")
        summary[part] = {"frames": len(parts[part]), "atoms": int(sum(len(a) for a in parts[part]))}
        print(f"wrote {path} ({len(parts[part])} frames)")
    if ship and n_ship is None:
        EMBEDDED_DATA.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(out / f"{name}_test.xyz", EMBEDDED_DATA / f"{name}_test.xyz")
        print(f"copied the test split to {EMBEDDED_DATA / f'{name}_test.xyz'}")
    elif ship:
        EMBEDDED_DATA.mkdir(parents=True, exist_ok=True)
        test = parts["test"]
        keep = np.unique(np.linspace(0, len(test) - 1, min(n_ship, len(test))).round().astype(int))
        path = EMBEDDED_DATA / f"{name}_test.xyz"
        ase.io.write(path, [test[i] for i in keep], format="extxyz")
        summary["shipped"] = {"frames": len(keep), "indices": keep.tolist()}
        print(f"copied {len(keep)} test frames to {path} ({path.stat().st_size / 1e3:.0f} kB)")
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sets",
        nargs="+",
        default=["base", "water", "aspirin"],
        choices=["base", "water", "aspirin", "aspirin_distorted", "solvated"],
    )
    parser.add_argument("--out", default=str(ROOT / "data"), help="output folder")
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--water-frames", type=int, default=80)
    parser.add_argument("--aspirin-frames", type=int, default=120)
    parser.add_argument("--n-test", type=int, default=24, help="test frames per environment set")
    parser.add_argument("--n-valid", type=int, default=12, help="valid frames per environment set")
    parser.add_argument("--solvated-frames", type=int, default=24, help="all in the test split")
    parser.add_argument("--solvated-starts", type=int, default=6, help="independent starts")
    parser.add_argument("--solvated-waters", type=int, default=56, help="H2O around aspirin")
    parser.add_argument(
        "--solvated-md", default="split", choices=sorted(SOLVATED_FORCE_FIELDS),
        help="MD force field of the solvated set (the package's embedded model)",
    )  # fmt: skip
    parser.add_argument(
        "--solvated-shipped", type=int, default=6, help="solvated frames copied to the package"
    )
    parser.add_argument(
        "--quick", action="store_true", help="a few frames of each set (a smoke test)"
    )
    parser.add_argument(
        "--no-ship", action="store_true", help="do not copy test splits into the package"
    )
    args = parser.parse_args()
    out = Path(args.out)
    quick = args.quick
    ship = not (quick or args.no_ship)
    n_test, n_valid = (2, 2) if quick else (args.n_test, args.n_valid)
    summary = {}
    names = ("base", "water", "aspirin", "aspirin_distorted", "solvated")  # append only: seeds
    for offset, name in enumerate(names):
        if name not in args.sets:
            continue
        rng = np.random.default_rng([args.seed, offset])  # each set reproducible on its own
        start = time.perf_counter()
        if name == "base":
            frames = label_all(base_frames(rng, quick), "base")
            n = len(frames)
            parts = split(frames, n // 10, n // 10, rng)
        elif name == "water":
            n_frames = 8 if quick else args.water_frames
            frames = water_set(rng, quick, n_frames)
            parts = split(frames, n_valid, n_test, rng)
        elif name == "aspirin":
            frames = aspirin_frames(rng, quick, 8 if quick else args.aspirin_frames)
            parts = split(frames, n_valid, n_test, rng)
        elif name == "aspirin_distorted":
            parts = distorted_aspirin(out, rng, quick)
        else:
            frames, record = solvated_set(
                out,
                rng,
                quick,
                2 if quick else args.solvated_frames,
                1 if quick else args.solvated_starts,
                args.solvated_waters,
                args.solvated_md,
            )
            parts = {"test": frames}
        summary[name] = write_set(
            name,
            parts,
            out,
            ship and name in ("water", "aspirin", "solvated"),
            time.perf_counter() - start,
            args.solvated_shipped if name == "solvated" else None,
        )
        if name == "solvated":
            summary[name].update(record)
    (out / f"summary_{'_'.join(args.sets)}.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
