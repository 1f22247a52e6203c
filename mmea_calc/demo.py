"""``mmea-calc demo``: the package's main job end to end, on the assets shipped with it.

Loads the embedded base model and its environment adapters, builds a periodic water box and the
hot molecule, lets automatic selection pick an adapter for each (and checks the pick), runs a
short Langevin MD of each, relaxes a distorted copy of the molecule with BFGS, and compares the
base model with the adapted one on the held-out test frames. When the assets hold solvated
frames (the molecule in water, ``data/solvated_test.xyz``), per-atom routing serves them: which
adapter the solute and the water atoms lean on, a short MD, and its errors against each single
adapter's. Every step is checked; anything wrong raises :class:`~mmea_calc.errors.DemoError`
(the CLI turns it into a non-zero exit).

Assets (``root``, default ``mmea_calc/embedded/``): ``base/`` (a safe base directory),
``adapters/<name>/`` (one adapter per environment; the periodic one is the water environment,
the other the molecule, named after it) and ``data/<name>_test.xyz`` (held-out reference frames
with ``REF_energy``/``REF_forces``; the molecule's first frame gives its geometry and its
``temperature_K`` the MD temperature); optionally ``data/solvated_test.xyz`` (the molecule in
water, labelled the same way, with a boolean ``solute`` per-atom array).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import ase
import ase.data
import ase.io
import numpy as np
from ase import units

from mmea_calc.build import water_box
from mmea_calc.errors import DemoError

__all__ = ["FULL", "QUICK", "DemoReport", "DemoSettings", "run_demo"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoSettings:
    """How much the demo does (see :data:`FULL` and :data:`QUICK`)."""

    water_steps: int = 200
    molecule_steps: int = 400
    test_frames: int | None = None  # per environment; None: all
    n_water: int = 32
    water_temperature_K: float = 300.0
    molecule_temperature_K: float | None = None  # None: the test frames' temperature_K (or 500)
    timestep_fs: float = 0.5
    friction_per_fs: float = 0.01
    prerelax_steps: int = 60
    relax_fmax: float = 0.05
    relax_steps: int = 500
    rattle: float = 0.1
    blowup_factor: float = 3.0
    reports: int = 4
    solvated_steps: int = 40
    solvated_frames: int | None = None  # None: all shipped


FULL = DemoSettings()
QUICK = DemoSettings(
    water_steps=20,
    molecule_steps=40,
    test_frames=6,
    prerelax_steps=30,
    solvated_steps=4,
    solvated_frames=2,
)


@dataclass
class DemoReport:
    """What the demo measured (also printed as it goes)."""

    selections: dict[str, dict[str, Any]] = field(default_factory=dict)
    md: dict[str, dict[str, Any]] = field(default_factory=dict)
    relax: dict[str, Any] = field(default_factory=dict)
    errors: dict[str, dict[str, Any]] = field(default_factory=dict)
    per_atom: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


class _Say:
    """Prints to ``out`` (the CLI's stdout) or logs at INFO when no stream is given."""

    def __init__(self, out: TextIO | None) -> None:
        self.out = out

    def __call__(self, message: str) -> None:
        if self.out is None:
            logger.info(message)
        else:
            print(message, file=self.out, flush=True)


# ---------------------------------------------------------------------------- assets
@dataclass
class _Environment:
    role: str  # "water" or "molecule"
    adapter: str
    test_file: Path
    frames: list[ase.Atoms]
    first: ase.Atoms  # the first test frame as read (with its info, e.g. temperature_K)


def _base_parameters(model: Any) -> int:
    return sum(p.numel() for p in model.base_model.parameters())


def _roles(calc: Any) -> dict[str, str]:
    """Which adapter serves water (the periodic environment) and which the molecule."""
    roles: dict[str, list[str]] = {"water": [], "molecule": []}
    for name in calc.adapter_names:
        env = calc.model.adapter_metadata(name).get("environment") or {}
        if "periodic_fraction" not in env:
            raise DemoError(f"adapter {name!r} stores no environment description")
        roles["water" if env["periodic_fraction"] >= 0.5 else "molecule"].append(name)
    if len(roles["water"]) != 1 or len(roles["molecule"]) != 1:
        raise DemoError(
            "the demo needs one periodic (water) and one molecular adapter; found periodic "
            f"{roles['water']} and molecular {roles['molecule']}"
        )
    return {role: names[0] for role, names in roles.items()}


def _test_file(root: Path, name: str) -> Path:
    data = root / "data"
    candidates = [data / f"{name}_test.xyz", data / name / "test.xyz"]
    candidates += sorted(data.glob(f"*{name}*test*.xyz"))
    for path in candidates:
        if path.is_file():
            return path
    raise DemoError(
        f"no held-out test frames for adapter {name!r}: expected {data / f'{name}_test.xyz'}"
    )


def _environment(root: Path, role: str, name: str, calc: Any, limit: int | None) -> _Environment:
    from mmea_calc.data import read_structures

    path = _test_file(root, name)
    frames = read_structures(path, atomic_numbers=calc.model.base_info["atomic_numbers"])
    first = ase.io.read(path, index=0)
    return _Environment(role, name, path, frames[:limit] if limit else frames, first)


def _load(root: Path, settings: DemoSettings, say: _Say) -> tuple[Any, dict[str, _Environment]]:
    from mmea_calc.base_format import embedded_adapter_dirs, embedded_base_dir
    from mmea_calc.calculator import MMEACalculator

    start = time.perf_counter()
    base_dir, adapter_dirs = embedded_base_dir(root), embedded_adapter_dirs(root)
    calc = MMEACalculator(base_dir, adapters=adapter_dirs, select="auto")
    info = calc.model.base_info
    say(
        f"base model: {info['model_class']}, hidden {info['hidden_irreps']}, elements "
        f"{' '.join(ase.data.chemical_symbols[z] for z in info['atomic_numbers'])}, "
        f"{_base_parameters(calc.model):,} parameters "
        f"({base_dir})"
    )
    say(
        f"adapters: {', '.join(calc.adapter_names)} (loaded in {time.perf_counter() - start:.1f} s)"
    )
    roles = _roles(calc)
    envs = {
        role: _environment(root, role, name, calc, settings.test_frames)
        for role, name in roles.items()
    }
    return calc, envs


# ---------------------------------------------------------------------------- steps
def _select(calc: Any, label: str, atoms: ase.Atoms, expected: str, say: _Say) -> dict[str, Any]:
    choice = calc.choose(atoms)
    distance = "" if choice.distance is None else f", router distance {choice.distance:.2f}"
    say(f"{label}: adapter {choice.name!r} ({choice.reason}{distance})")
    if choice.name != expected:
        raise DemoError(f"automatic selection chose {choice.name!r} for {label}, not {expected!r}")
    return {"adapter": choice.name, "reason": choice.reason, "distance": choice.distance}


def _check_finite(atoms: ase.Atoms, where: str) -> float:
    energy = atoms.get_potential_energy()
    if not (np.isfinite(energy) and np.isfinite(atoms.get_forces()).all()):
        raise DemoError(f"non-finite energy or forces during {where}")
    return float(energy)


def _md(
    atoms: ase.Atoms,
    label: str,
    expected: str,
    steps: int,
    temperature: float,
    settings: DemoSettings,
    say: _Say,
    progress: TextIO | None,
    seed: int,
) -> dict[str, Any]:
    from ase.md.langevin import Langevin
    from tqdm import tqdm

    try:  # ASE >= 3.29
        from ase.md.velocitydistribution import thermalize_momenta
    except ImportError:  # older ASE
        from ase.md.velocitydistribution import MaxwellBoltzmannDistribution as thermalize_momenta

    rng = np.random.default_rng(seed)
    thermalize_momenta(atoms, temperature_K=temperature, rng=rng)
    dyn = Langevin(
        atoms,
        settings.timestep_fs * units.fs,
        temperature_K=temperature,
        friction=settings.friction_per_fs / units.fs,
        fixcm=False,
        rng=rng,
    )
    every = max(1, steps // settings.reports)
    record: dict[str, Any] = {
        "steps": steps,
        "target_K": temperature,
        "max_K": 0.0,
        "max_extrapolation": 0.0,
    }
    say(f"Langevin MD of {label}: {steps} steps of {settings.timestep_fs} fs at {temperature} K")
    say(f"  {'step':>6s} {'time/fs':>8s} {'E_pot/eV':>12s} {'T/K':>8s} {'extrapolation':>13s}")
    bar = tqdm(total=steps, desc=label, unit="step", file=progress, disable=progress is None)

    def observe() -> None:
        energy = _check_finite(atoms, f"MD of {label}")
        temp = float(atoms.get_temperature())
        record["max_K"] = max(record["max_K"], temp)
        if temp > settings.blowup_factor * temperature:
            raise DemoError(
                f"temperature blow-up in MD of {label}: {temp:.0f} K at step {dyn.nsteps} "
                f"(target {temperature:.0f} K)"
            )
        if atoms.calc.results.get("adapter") != expected:
            raise DemoError(f"MD of {label} switched to adapter {atoms.calc.results['adapter']!r}")
        grade = atoms.calc.results.get("adapter_extrapolation")
        if grade is not None:
            record["max_extrapolation"] = max(record["max_extrapolation"], grade)
        if dyn.nsteps % every == 0:
            time_fs = dyn.nsteps * settings.timestep_fs
            shown = "–" if grade is None else f"{grade:.3f}"
            with tqdm.external_write_mode():  # the line goes above the bar, not through it
                say(f"  {dyn.nsteps:6d} {time_fs:8.1f} {energy:12.4f} {temp:8.1f} {shown:>13s}")
        bar.update(dyn.nsteps - bar.n)

    dyn.attach(observe, interval=1)
    try:
        dyn.run(steps)
    finally:
        bar.close()
    record["final_K"] = float(atoms.get_temperature())
    return record


def _relax(molecule: ase.Atoms, label: str, settings: DemoSettings, say: _Say, seed: int) -> dict:
    from ase.optimize import BFGS

    atoms = molecule.copy()
    atoms.calc = molecule.calc
    atoms.rattle(settings.rattle, seed=seed)
    start = _check_finite(atoms, "the relaxation")
    fmax0 = float(np.linalg.norm(atoms.get_forces(), axis=1).max())
    opt = BFGS(atoms, logfile=None)
    converged = bool(opt.run(fmax=settings.relax_fmax, steps=settings.relax_steps))
    final = _check_finite(atoms, "the relaxation")
    fmax = float(np.linalg.norm(atoms.get_forces(), axis=1).max())
    say(
        f"BFGS relaxation of a distorted {label} (rattled {settings.rattle} Å): "
        f"{opt.nsteps} steps, E {start:.4f} -> {final:.4f} eV, max force {fmax0:.3f} -> "
        f"{fmax:.3f} eV/Å"
    )
    if not converged:
        raise DemoError(
            f"BFGS relaxation of {label} did not converge in {settings.relax_steps} steps "
            f"(max force {fmax:.3f} eV/Å > {settings.relax_fmax})"
        )
    if final > start:
        raise DemoError(f"relaxation of {label} raised the energy ({start:.4f} -> {final:.4f} eV)")
    return {"steps": opt.nsteps, "start_eV": start, "final_eV": final, "fmax": fmax}


def _errors(calc: Any, env: _Environment) -> dict[str, Any]:
    from mmea_calc.data import reference_values
    from mmea_calc.train import error_metrics

    ref = reference_values(env.frames)
    out: dict[str, Any] = {"frames": len(env.frames), "file": str(env.test_file)}
    try:
        for label, select in (("base", None), ("adapted", env.adapter)):
            calc.set_adapter(select)
            results = calc.calculate_batch(env.frames, properties=("energy", "forces"))
            pred = {
                "energy": np.array([r["energy"] for r in results]),
                "forces": np.concatenate([r["forces"] for r in results]),
            }
            out[label] = error_metrics(pred, ref)
    finally:
        calc.set_adapter("auto")
    return out


def _error_table(errors: dict[str, dict[str, Any]], say: _Say) -> None:
    say("errors on held-out reference frames (MAE; energy meV/atom, forces meV/Å):")
    say(f"  {'environment':14s}{'frames':>7s}{'E base':>10s}{'E adapted':>11s}"
        f"{'F base':>10s}{'F adapted':>11s}")  # fmt: skip
    for name, row in errors.items():
        e = [row[k]["energy_mae_meV_per_atom"] for k in ("base", "adapted")]
        f = [row[k]["forces_mae_meV_per_A"] for k in ("base", "adapted")]
        say(f"  {name:14s}{row['frames']:7d}{e[0]:10.2f}{e[1]:11.2f}{f[0]:10.1f}{f[1]:11.1f}")


def _check_errors(errors: dict[str, dict[str, Any]]) -> None:
    for name, row in errors.items():
        for key, what in (("energy_mae_meV_per_atom", "energy"), ("forces_mae_meV_per_A", "force")):
            base, adapted = row["base"][key], row["adapted"][key]
            if not (np.isfinite(adapted) and adapted < base):
                raise DemoError(
                    f"adapter {name!r} does not improve the {what} error on its held-out "
                    f"frames: adapted {adapted:.3g} vs base {base:.3g}"
                )


# ---------------------------------------------------------------------------- main
def _molecule(env: _Environment, calc: Any) -> tuple[ase.Atoms, str, float | None]:
    first = env.first
    atoms = ase.Atoms(numbers=first.numbers, positions=first.positions, cell=first.cell)
    atoms.pbc = first.pbc
    atoms.calc = calc
    label = f"{env.adapter} ({atoms.get_chemical_formula()}, {len(atoms)} atoms)"
    temperature = first.info.get("temperature_K")
    return atoms, label, None if temperature is None else float(temperature)


def _water(settings: DemoSettings, calc: Any, seed: int) -> tuple[ase.Atoms, str]:
    atoms = water_box(settings.n_water, seed=seed)
    atoms.calc = calc
    label = f"water box ({atoms.get_chemical_formula()}, {atoms.cell.lengths()[0]:.2f} Å)"
    return atoms, label


def run_demo(
    root: str | os.PathLike | None = None,
    *,
    quick: bool = False,
    settings: DemoSettings | None = None,
    out: TextIO | None = None,
    progress: TextIO | None = None,
    seed: int = 0,
) -> DemoReport:
    """Run the demo (see the module docstring); raises :class:`DemoError` if a step misbehaves.

    Args:
        root: asset directory with ``base/``, ``adapters/`` and ``data/``; ``None`` for the
            package's embedded assets (``mmea_calc/embedded/``).
        quick: fewer MD steps and test frames (:data:`QUICK` instead of :data:`FULL`).
        settings: explicit settings (overrides ``quick``).
        out: stream for the report lines (``None``: log them at INFO).
        progress: stream for the MD progress bars (``None``: no bars).
        seed: seeds the water box, velocities, thermostat noise and the distortion.

    Returns:
        The measurements, also printed as the demo runs.
    """
    from mmea_calc.base_format import EMBEDDED_DIR

    started = time.perf_counter()
    settings = settings or (QUICK if quick else FULL)
    say, report = _Say(out), DemoReport()
    calc, envs = _load(Path(root) if root is not None else EMBEDDED_DIR, settings, say)
    water, water_label = _water(settings, calc, seed)
    molecule, mol_label, mol_temp = _molecule(envs["molecule"], calc)
    mol_temp = settings.molecule_temperature_K or mol_temp or 500.0
    systems = [
        (
            water,
            water_label,
            envs["water"].adapter,
            settings.water_steps,
            settings.water_temperature_K,
        ),
        (molecule, mol_label, envs["molecule"].adapter, settings.molecule_steps, mol_temp),
    ]
    for atoms, label, expected, _, _ in systems:
        report.selections[label] = _select(calc, label, atoms, expected, say)
    _prerelax(water, water_label, settings, say)
    for index, (atoms, label, expected, steps, temperature) in enumerate(systems):
        report.md[label] = _md(
            atoms, label, expected, steps, temperature, settings, say, progress, seed + index
        )
    report.relax = _relax(molecule, mol_label, settings, say, seed)
    report.errors = {env.adapter: _errors(calc, env) for env in envs.values()}
    _error_table(report.errors, say)
    _check_errors(report.errors)
    root_dir = Path(root) if root is not None else EMBEDDED_DIR
    report.per_atom = _per_atom(root_dir, calc, envs, settings, say, progress, seed + 2)
    report.seconds = time.perf_counter() - started
    say(f"demo passed in {report.seconds:.0f} s")
    return report


def _per_atom(
    root: Path,
    calc: Any,
    envs: dict[str, _Environment],
    settings: DemoSettings,
    say: _Say,
    progress: TextIO | None,
    seed: int,
) -> dict[str, Any]:
    """Per-atom routing on the solvated frames (skipped when the assets have none)."""
    from mmea_calc.calculator import MMEACalculator
    from mmea_calc.data import read_structures, reference_values

    path = root / "data" / "solvated_test.xyz"
    if not path.is_file():
        say(f"no solvated frames ({path}): per-atom routing step skipped")
        return {}
    frames = read_structures(path, atomic_numbers=calc.model.base_info["atomic_numbers"])
    frames = frames[: settings.solvated_frames] if settings.solvated_frames else frames
    raw = ase.io.read(path, index=f":{len(frames)}")  # labels aside: the per-atom arrays
    if not frames or any("solute" not in a.arrays for a in raw):
        raise DemoError(f"{path} must hold frames with a boolean 'solute' per-atom array")
    masks = [a.arrays["solute"].astype(bool) for a in raw]
    per_atom = MMEACalculator(calc.model, select="per-atom")  # the same model, shared
    names = per_atom.adapter_names
    serving = {"solute": envs["molecule"].adapter, "water": envs["water"].adapter}
    first = frames[0].copy()
    first.calc = per_atom
    first.get_potential_energy()
    weights = per_atom.results["adapter_weights"]
    solute = masks[0]
    label = (
        f"solvated {envs['molecule'].adapter} ({first.get_chemical_formula()}, {len(first)} atoms)"
    )
    say(f"per-atom routing, {label}: mean weight per adapter ({', '.join(names)})")
    summary = {}
    for part, mask in (("solute", solute), ("water", ~solute)):
        mean = weights[mask].mean(axis=0)
        summary[part] = dict(zip(names, mean.round(4).tolist(), strict=True))
        shown = "  ".join(f"{n} {w:.3f}" for n, w in zip(names, mean, strict=True))
        say(f"  {part:7s} ({int(mask.sum()):3d} atoms): {shown}")
        if names[int(mean.argmax())] != serving[part]:
            raise DemoError(
                f"per-atom routing serves the {part} atoms mostly with "
                f"{names[int(mean.argmax())]!r}, not {serving[part]!r}"
            )
    record = _md(first, label, "per-atom", settings.solvated_steps, 300.0, settings, say,
                 progress, seed)  # fmt: skip
    references = [reference_values([atoms])["forces"] for atoms in frames]
    errors = {}
    for model_label, select in (("base", None), *((n, n) for n in names), ("per-atom", "per-atom")):
        per_atom.set_adapter(select)
        results = per_atom.calculate_batch(frames, properties=("energy", "forces"))
        rows: dict[str, list[np.ndarray]] = {"all": [], "solute": [], "water": []}
        for reference, result, mask in zip(references, results, masks, strict=True):
            error = np.abs(result["forces"] - reference).mean(axis=1)
            rows["all"].append(error)
            rows["solute"].append(error[mask])
            rows["water"].append(error[~mask])
        errors[model_label] = {k: 1000 * float(np.concatenate(v).mean()) for k, v in rows.items()}
    say(f"force MAE (meV/Å) on {len(frames)} solvated frames ({path.name}):")
    say(f"  {'model':12s}{'all':>9s}{'solute':>9s}{'water':>9s}")
    for model_label, row in errors.items():
        say(f"  {model_label:12s}{row['all']:9.1f}{row['solute']:9.1f}{row['water']:9.1f}")
    best_single = min(errors[n]["all"] for n in names)
    if not errors["per-atom"]["all"] < best_single:
        raise DemoError(
            f"per-atom routing ({errors['per-atom']['all']:.1f} meV/Å) does not beat the best "
            f"single adapter ({best_single:.1f} meV/Å) on the solvated frames"
        )
    return {"weights": summary, "md": record, "errors": errors, "frames": len(frames)}


def _prerelax(atoms: ase.Atoms, label: str, settings: DemoSettings, say: _Say) -> None:
    """Take the randomly packed box out of its worst contacts before MD (FIRE, loose)."""
    from ase.optimize import FIRE

    start = _check_finite(atoms, "the pre-relaxation")
    opt = FIRE(atoms, logfile=None)
    opt.run(fmax=0.5, steps=settings.prerelax_steps)
    final = _check_finite(atoms, "the pre-relaxation")
    say(f"pre-relaxed the {label} ({opt.nsteps} FIRE steps): E {start:.3f} -> {final:.3f} eV")
