"""Our exported files in real LAMMPS (``pair_style mace``, ACEsuit's fork) agree with
MMEACalculator.

LAMMPS is found through ``MMEA_LAMMPS`` (the path to an ``lmp`` binary) or ``lmp`` on PATH, and
must list pair style ``mace`` in ``lmp -h`` (``scripts/build_lammps.sh`` builds one). Without it
every test here skips with the reason, at once (CI has no LAMMPS).

With it, the embedded base and adapters are exported with ``mmea-calc export`` (float64) and run
by ``lmp`` in subprocesses, in temporary folders, on data files ASE writes:

* ``run 0`` energy, forces and virial equal MMEACalculator's to 1e-8 (eV, eV/Å) for a periodic
  water box (types H O) and a molecule in a vacuum box (types C H O: another order than the
  model's H C N O), with ``pair_style mace`` and ``pair_style mace no_domain_decomposition``;
* 2 MPI ranks give what 1 rank gives (domain decomposition; ``no_domain_decomposition`` is for
  one rank only);
* a short NVE run with the adapter baked in drifts no more than the bare exported base's;
* the input template ``mmea-calc export --input`` writes runs as written and gives the energy
  and pressure (atoms at rest: virial only).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from functools import cache
from pathlib import Path

import ase.io
import numpy as np
import pytest

from mmea_calc.export import find_lammps

TOL = 1e-8  # eV, eV/Å
NKTV2P_METAL = 1.6021765e6  # LAMMPS' bar per eV/Å³ (force->nktv2p, units metal)
ELEMENTS_WATER = ["H", "O"]
ELEMENTS_MOLECULE = ["C", "H", "O"]  # not the model's order (H C N O)
PAIR_STYLES = ["mace", "mace no_domain_decomposition"]
NVE_STEPS = 40  # 20 fs at 0.5 fs


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


LMP, WHY = find_lammps()  # mmea_calc.export.find_lammps
pytestmark = pytest.mark.skipif(LMP is None, reason=WHY)


# ----------------------------------------------------------------------------- helpers
def run_lammps(folder: Path, script: str, ranks: int = 1) -> str:
    """Run ``script`` (written to folder/in.lammps) in ``folder``; the log's text."""
    (folder / "in.lammps").write_text(script)
    command = [LMP, "-in", "in.lammps", "-log", "log.lammps", "-screen", "none"]
    if ranks > 1:
        command = ["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", str(ranks), *command]
    done = subprocess.run(
        command, cwd=folder, capture_output=True, text=True, timeout=300, env=_env()
    )
    log = (folder / "log.lammps").read_text() if (folder / "log.lammps").exists() else ""
    assert done.returncode == 0, f"lmp failed ({done.returncode}):\n{log[-3000:]}{done.stderr}"
    return log


def write_data(path: Path, atoms, elements: list[str]) -> None:
    ase.io.write(
        path, atoms, format="lammps-data", specorder=elements, atom_style="atomic", masses=True
    )


def run0_script(model: Path, elements: list[str], pair_style: str) -> str:
    """``run 0``: energy and virial (bar, no kinetic part) to result.txt, forces to forces.dump."""
    return f"""
units metal
atom_style atomic
atom_modify map yes
newton on
boundary p p p
read_data data.lammps
neighbor 0.0 bin
pair_style {pair_style}
pair_coeff * * {model} {" ".join(elements)}
compute vir all pressure NULL virial
thermo_style custom step pe c_vir[1] c_vir[2] c_vir[3] c_vir[4] c_vir[5] c_vir[6] vol
thermo_modify format float %.17g
dump forces all custom 1 forces.dump id type x y z fx fy fz
dump_modify forces sort id format float %.17g
run 0
print "$(pe:%.17g) $(c_vir[1]:%.17g) $(c_vir[2]:%.17g) $(c_vir[3]:%.17g) $(c_vir[4]:%.17g) $(c_vir[5]:%.17g) $(c_vir[6]:%.17g) $(vol:%.17g)" file result.txt
"""  # noqa: E501


def read_run0(folder: Path) -> dict[str, np.ndarray | float]:
    values = np.array(folder.joinpath("result.txt").read_text().split(), dtype=float)
    pe, pressure, volume = values[0], values[1:7], values[7]
    rows = folder.joinpath("forces.dump").read_text().splitlines()
    start = rows.index(next(r for r in rows if r.startswith("ITEM: ATOMS"))) + 1
    table = np.array([r.split() for r in rows[start:]], dtype=float)
    # LAMMPS pressure (bar) from the virial only: P_ab = W_ab / V * nktv2p (xx yy zz xy xz yz)
    virial = pressure * volume / NKTV2P_METAL
    return {
        "energy": pe,
        "positions": table[:, 2:5],
        "forces": table[:, 5:8],
        "virial": virial,
    }


def reference(atoms, positions, select: str) -> dict[str, np.ndarray | float]:
    """MMEACalculator (float64) at LAMMPS' positions; ASE stress -> virial -σV (Voigt order
    xx yy zz yz xz xy -> LAMMPS' xx yy zz xy xz yz)."""
    calc = reference_calculator()
    calc.set(select=select)
    ref = atoms.copy()
    ref.positions = positions
    ref.pbc = True  # the vacuum box of the molecule is wider than r_max: same graph as pbc=False
    ref.calc = calc
    stress = ref.get_stress(voigt=True)
    virial = -stress[[0, 1, 2, 5, 4, 3]] * ref.get_volume()
    return {"energy": ref.get_potential_energy(), "forces": ref.get_forces(), "virial": virial}


@cache
def reference_calculator():
    from mmea_calc.calculator import MMEACalculator

    return MMEACalculator(base="embedded", adapters="embedded", default_dtype="float64")


def differences(got, want) -> dict[str, float]:
    """|dE|, max |dF|, max |dW| (eV, eV/Å, eV)."""
    return {
        "energy": abs(got["energy"] - want["energy"]),
        "forces": float(np.abs(got["forces"] - want["forces"]).max()),
        "virial": float(np.abs(got["virial"] - want["virial"]).max()),
    }


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def structures():
    """A periodic water box and a molecule in a vacuum box.

    The water box is half as dense as water: with domain decomposition (``pair_style mace``)
    LAMMPS puts every ghost atom within num_interactions * r_max = 10 Å of the box into the
    graph, ~30 times the atoms of a dense 96-atom box (18 s for its run 0 here); at half the
    density and 48 atoms it is ~1300 nodes, and molecules still bond across the boundaries.
    """
    from mmea_calc.base_format import EMBEDDED_DIR
    from mmea_calc.build import water_box

    water = water_box(16, density=0.5, seed=1)
    molecule = ase.io.read(EMBEDDED_DIR / "data" / "aspirin_test.xyz", index=0)
    molecule.cell = np.ptp(molecule.positions, axis=0) + 2 * 6.0  # vacuum 6 Å > r_max 5 Å
    molecule.center()
    molecule.pbc = True
    return {"water": water, "aspirin": molecule}


def export(folder: Path, elements: list[str], adapter: str | None, name: str, **extra) -> Path:
    """``mmea-calc export`` (in process) of the embedded base with one embedded adapter."""
    from mmea_calc.base_format import embedded_adapter_dirs, embedded_base_dir
    from mmea_calc.cli import main

    out = folder / name
    args = ["export", "--base", str(embedded_base_dir()), "--out", str(out)]
    if adapter is not None:
        (directory,) = [d for d in embedded_adapter_dirs() if d.name == adapter]
        args += ["--adapter", str(directory)]
    args += ["--elements", *elements, "--dtype", "float64"]
    for key, value in extra.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    assert main(args) == 0
    return out


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The exported files; the water one with its input template (``--input``)."""
    folder = tmp_path_factory.mktemp("exported")
    template = folder / "in.lammps"
    return {
        "water": export(folder, ELEMENTS_WATER, "water", "water.pt", input=template),
        "aspirin": export(folder, ELEMENTS_MOLECULE, "aspirin", "aspirin.pt"),
        "base": export(folder, ELEMENTS_WATER, None, "base.pt"),
        "template": template,
    }


@pytest.fixture(scope="module")
def run0(tmp_path_factory, files, structures):
    """``run0(system, pair_style, ranks)``: LAMMPS' run 0 results, each case run once."""
    done = {}

    def run(system: str, pair_style: str, ranks: int = 1):
        key = (system, pair_style, ranks)
        if key not in done:
            elements = ELEMENTS_WATER if system == "water" else ELEMENTS_MOLECULE
            folder = tmp_path_factory.mktemp(f"{system}-{pair_style.replace(' ', '-')}-{ranks}")
            write_data(folder / "data.lammps", structures[system], elements)
            log = run_lammps(folder, run0_script(files[system], elements, pair_style), ranks)
            done[key] = {**read_run0(folder), "log": log}
        return done[key]

    return run


# ----------------------------------------------------------------------------- tests
@pytest.mark.parametrize("pair_style", PAIR_STYLES)
@pytest.mark.parametrize("system", ["water", "aspirin"])
def test_run0_matches_mmea_calculator(run0, structures, system, pair_style):
    got = run0(system, pair_style)
    atoms = structures[system]
    assert len(got["forces"]) == len(atoms)
    want = reference(atoms, got["positions"], select=system)
    diff = differences(got, want)
    print(f"{system} / pair_style {pair_style}: |dE|, max |dF|, max |dW| = {diff}")
    assert max(diff.values()) <= TOL, diff
    # the adapter is in the file: the bare base is far from it
    bare = reference(atoms, got["positions"], select="base")
    assert abs(bare["energy"] - got["energy"]) > 1e-4


@pytest.mark.skipif(shutil.which("mpirun") is None, reason="no mpirun on PATH")
def test_two_mpi_ranks_equal_one(run0):
    """Domain decomposition (pair_style mace) over 2 MPI ranks: what 1 rank gives."""
    one = run0("water", "mace", ranks=1)
    two = run0("water", "mace", ranks=2)
    assert "Loop time of" in two["log"] and " on 2 procs " in two["log"]
    diff = differences(two, one)
    print(f"2 ranks vs 1: {diff}")
    assert max(diff.values()) <= TOL, diff


NVE = """
units metal
atom_style atomic
atom_modify map yes
newton on
read_data data.lammps
pair_style mace no_domain_decomposition
pair_coeff * * {model} {elements}
velocity all create 300 4928459 mom yes rot yes dist gaussian
timestep 0.0005
fix nve all nve
thermo_style custom step temp pe etotal
thermo_modify format float %.17g
thermo 1
run {steps}
"""


def nve_energies(folder: Path, model: Path, data_atoms, steps: int) -> np.ndarray:
    folder.mkdir()
    write_data(folder / "data.lammps", data_atoms, ELEMENTS_WATER)
    script = NVE.format(model=model, elements=" ".join(ELEMENTS_WATER), steps=steps)
    log = run_lammps(folder, script)
    block = log.split("Step ")[-1].split("Loop time")[0].splitlines()[1:]
    table = np.array([row.split() for row in block if row.strip()], dtype=float)
    assert len(table) == steps + 1
    return table[:, 3]


def test_nve_with_the_adapter_drifts_no_more_than_the_bare_base(tmp_path, files, structures):
    steps = NVE_STEPS
    drift = {}
    for name in ("water", "base"):
        etotal = nve_energies(tmp_path / name, files[name], structures["water"], steps)
        drift[name] = float(np.abs(etotal - etotal[0]).max()) / len(structures["water"])
    print(f"NVE max |E_tot(t) - E_tot(0)| per atom over {steps} steps of 0.5 fs (eV): {drift}")
    assert drift["water"] <= 3 * drift["base"] + 1e-6, drift
    assert drift["water"] < 1e-3, drift


def test_the_printed_template_runs_as_written(tmp_path, files, structures):
    """``mmea-calc export --input`` writes an input LAMMPS runs unchanged on the data file."""
    folder = files["template"].parent
    template = files["template"].read_text()
    assert "pair_style      mace no_domain_decomposition" in template
    assert "pair_coeff      * * water.pt H O" in template  # relative to the input's folder
    atoms = structures["water"]
    write_data(folder / "data.lammps", atoms, ELEMENTS_WATER)
    done = subprocess.run(
        [LMP, "-in", files["template"].name], cwd=folder, capture_output=True, text=True,
        timeout=300, env=_env(),
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr
    rows = (folder / "log.lammps").read_text().splitlines()
    at = next(i for i, row in enumerate(rows) if row.split()[:1] == ["Step"])
    values = dict(zip(rows[at].split(), rows[at + 1].split(), strict=True))
    want = reference(atoms, atoms.positions, select="water")
    pressure = want["virial"][:3].sum() / 3 / atoms.get_volume() * NKTV2P_METAL
    print(f"template: PotEng {values['PotEng']} (want {want['energy']}), Press {values['Press']} "
          f"(want {pressure})")  # fmt: skip
    assert abs(float(values["PotEng"]) - want["energy"]) <= 1e-7 * abs(want["energy"])
    assert abs(float(values["Press"]) - pressure) <= 1e-6 * abs(pressure) + 1e-3
