"""Batched NVT MD, then FIRE, of a mixed batch in TorchSim: each system served by its own adapter.

Water boxes (300 K) and hot aspirin molecules (600 K, each in a periodic vacuum box: TorchSim's
periodicity is one setting for the whole batch) run in ONE batched forward per step, with
MMEAModel choosing each system's adapter by the calculator's rule (select="auto"). Then FIRE
relaxes the positions of every system at once (the molecules' vacuum boxes keep their cells).
Needs torch-sim-atomistic >= 0.6 (Python >= 3.12): pip install "mmea-calc[torchsim]".

    python examples/torchsim_md.py [--water-boxes 4] [--molecules 4] [--steps 100]
                                   [--relax-steps 50] [--dtype float64] [--traj DIR]
                                   [--base embedded] [--adapters embedded | DIR ...]
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import ase.io
import torch
import torch_sim as ts

from mmea_calc.base_format import embedded_base_dir
from mmea_calc.build import water_box
from mmea_calc.torchsim import MMEAModel


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="embedded", help="base dir, .model file or 'embedded'")
    parser.add_argument("--adapters", nargs="+", default=["embedded"], help="adapter dirs")
    parser.add_argument("--water-boxes", type=int, default=4)
    parser.add_argument("--water", type=int, default=16, help="molecules per water box")
    parser.add_argument("--molecules", type=int, default=4, help="aspirin frames")
    parser.add_argument("--molecule-file", help="extxyz of molecules (default: embedded aspirin)")
    parser.add_argument("--box", type=float, default=20.0, help="vacuum box of a molecule, Å")
    parser.add_argument("--steps", type=int, default=100, help="NVT Langevin steps")
    parser.add_argument("--timestep", type=float, default=0.5, help="fs")
    parser.add_argument("--relax-steps", type=int, default=50, help="FIRE steps at most")
    parser.add_argument("--dtype", default="float64", choices=["float64", "float32"])
    parser.add_argument("--traj", help="folder for one TorchSim .h5 trajectory per system")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    return parser.parse_args()


def systems(args: argparse.Namespace) -> tuple[list[ase.Atoms], list[float]]:
    """The batch and each system's temperature (K)."""
    water = [water_box(args.water, seed=args.seed + i) for i in range(args.water_boxes)]
    source = args.molecule_file or embedded_base_dir().parent / "data" / "aspirin_test.xyz"
    molecules = ase.io.read(source, f":{args.molecules}")
    for atoms in molecules:
        atoms.cell = [args.box] * 3
        atoms.pbc = True
        atoms.center()
    return water + molecules, [300.0] * len(water) + [600.0] * len(molecules)


def report(model: MMEAModel, atoms_list: list[ase.Atoms], out: dict, what: str) -> None:
    print(f"\n{what}")
    print(f"{'system':>6}  {'formula':<10} {'adapter':<10} {'grade':>7} {'E (eV)':>14} "
          f"{'max |F| (eV/Å)':>15}")  # fmt: skip
    ptr = [0]
    for atoms in atoms_list:
        ptr.append(ptr[-1] + len(atoms))
    for i, (atoms, name) in enumerate(zip(atoms_list, model.served(out), strict=True)):
        grade = out["adapter_extrapolation"][i].item()
        forces = out["forces"][ptr[i] : ptr[i + 1]]
        print(
            f"{i:>6}  {atoms.get_chemical_formula():<10} {name!s:<10} "
            f"{'-' if math.isnan(grade) else f'{grade:.3f}':>7} {out['energy'][i].item():14.4f} "
            f"{forces.norm(dim=1).max().item():15.4f}"
        )


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)  # TorchSim draws the initial momenta and Langevin noise
    adapters = "embedded" if args.adapters == ["embedded"] else args.adapters
    model = MMEAModel(args.base, adapters, select="auto", dtype=args.dtype)
    atoms_list, temperatures = systems(args)
    state = ts.io.atoms_to_state(atoms_list, dtype=model.dtype, device=model.device)
    report(model, atoms_list, model(state), "start")

    reporter = None
    if args.traj:
        folder = Path(args.traj)
        folder.mkdir(parents=True, exist_ok=True)
        reporter = ts.TrajectoryReporter(
            [folder / f"system_{i}.h5" for i in range(len(atoms_list))],
            state_frequency=10,
            prop_calculators={10: {"adapter_extrapolation": _grade}},
        )
    state = ts.integrate(
        system=state,
        model=model,
        integrator=ts.Integrator.nvt_langevin,
        n_steps=args.steps,
        temperature=torch.tensor(temperatures, dtype=model.dtype),  # one per system
        timestep=args.timestep / 1000.0,  # ps
        trajectory_reporter=reporter,
        pbar={"desc": f"NVT Langevin, {len(atoms_list)} systems"},
    )
    report(model, atoms_list, model(state), f"after {args.steps} NVT steps")
    relaxed = ts.optimize(
        system=state,
        model=model,
        optimizer=ts.Optimizer.fire,
        max_steps=args.relax_steps,
        convergence_fn=ts.generate_force_convergence_fn(force_tol=0.05),
    )
    report(model, atoms_list, model(relaxed), f"after FIRE (at most {args.relax_steps} steps)")


def _grade(state: ts.SimState, model: MMEAModel) -> torch.Tensor:
    """Each system's extrapolation grade: TorchSim keeps the model's per-system outputs as the
    state's extras, so the reporter reads the last step's value without another forward."""
    return state.adapter_extrapolation


if __name__ == "__main__":
    main()
