"""Tiny MACE builders and assertion helpers, for our tests and for projects building on us.

Everything here is seeded and built in-process: no downloads, no files.
"""

from __future__ import annotations

import copy
import functools
import warnings
from collections.abc import Sequence
from typing import Any

import ase
import numpy as np
import torch

from mmea_calc._deps import mace, o3, torch_tools
from mmea_calc.data import atoms_to_graph, collate

__all__ = [
    "CHARGE_SPIN_EMBEDDING",
    "build_mace_variant",
    "build_tiny_mace",
    "evaluate",
    "mliap_batch",
    "pair_mace_inputs",
    "random_cluster",
    "random_rotation",
    "randomize_adapter",
    "write_demo_assets",
]


def build_tiny_mace(
    hidden_irreps: str = "8x0e+8x1o",
    *,
    residual: bool = True,
    scale_shift: bool = True,
    atomic_numbers: Sequence[int] = (1, 6, 8),
    r_max: float = 4.0,
    num_interactions: int = 2,
    pair_repulsion: bool = False,
    dtype: str | torch.dtype = torch.float64,
    seed: int = 0,
    heads: Sequence[str] | None = None,
) -> torch.nn.Module:
    """A small, randomly initialised (seeded) MACE or ScaleShiftMACE.

    ``heads`` builds a multi-head model (mace's multi-head fine-tuning layout: one readout
    column, E0 row, scale and shift per head).

    ``pair_repulsion=True`` adds mace's ZBL term, giving the random model a repulsive core so
    that relaxations (cell relaxations above all) have a finite-volume minimum. Models are built
    once per argument set and deep-copied (building takes seconds); the global RNG is untouched.

    Example:
        >>> model = build_tiny_mace("4x0e", residual=False, scale_shift=False)
        >>> type(model).__name__, str(model.products[0].linear.irreps_out)
        ('MACE', '4x0e')
    """
    dtype_name = str(dtype).replace("torch.", "")
    return copy.deepcopy(
        _build_tiny_mace(
            hidden_irreps,
            residual,
            scale_shift,
            tuple(int(z) for z in atomic_numbers),
            float(r_max),
            int(num_interactions),
            bool(pair_repulsion),
            dtype_name,
            int(seed),
            tuple(heads) if heads is not None else None,
        )
    )


def _tiny_kwargs(
    interaction: str,
    interaction_first: str,
    hidden_irreps: str,
    atomic_numbers: Sequence[int],
    r_max: float,
    num_interactions: int,
    rng: np.random.Generator,
) -> dict[str, Any]:
    """The constructor arguments every tiny test model shares."""
    blocks = mace.modules.interaction_classes
    return dict(
        r_max=r_max,
        num_bessel=6,
        num_polynomial_cutoff=5,
        max_ell=2,
        interaction_cls=blocks[interaction],
        interaction_cls_first=blocks[interaction_first],
        num_interactions=num_interactions,
        num_elements=len(atomic_numbers),
        hidden_irreps=o3.Irreps(hidden_irreps),
        MLP_irreps=o3.Irreps("8x0e"),
        gate=torch.nn.functional.silu,
        atomic_energies=rng.uniform(-5.0, -1.0, size=len(atomic_numbers)),
        avg_num_neighbors=6.0,
        atomic_numbers=list(atomic_numbers),
        correlation=3,
        radial_MLP=[16, 16],
    )


@functools.lru_cache(maxsize=32)
def _build_tiny_mace(
    hidden_irreps: str,
    residual: bool,
    scale_shift: bool,
    atomic_numbers: tuple[int, ...],
    r_max: float,
    num_interactions: int,
    pair_repulsion: bool,
    dtype: str,
    seed: int,
    heads: tuple[str, ...] | None = None,
) -> torch.nn.Module:
    name = "RealAgnosticResidualInteractionBlock" if residual else "RealAgnosticInteractionBlock"
    rng = np.random.default_rng(seed)
    kwargs = _tiny_kwargs(name, name, hidden_irreps, atomic_numbers, r_max, num_interactions, rng)
    kwargs["pair_repulsion"] = pair_repulsion
    scale, shift = 1.3, 0.1
    if heads is not None:
        kwargs["heads"] = list(heads)
        kwargs["atomic_energies"] = rng.uniform(-5.0, -1.0, size=(len(heads), len(atomic_numbers)))
        scale = [1.3 - 0.2 * i for i in range(len(heads))]  # every head differs
        shift = [0.1 * i for i in range(len(heads))]
    # mace builds buffers (e.g. Clebsch-Gordan U matrices) in the default dtype: scope it.
    with (
        torch.random.fork_rng(),
        torch_tools.default_dtype(dtype),
        warnings.catch_warnings(),  # e3nn's TorchScript codegen chatter while building
    ):
        warnings.filterwarnings("ignore", message="The TorchScript type system")
        torch.manual_seed(seed)
        if scale_shift:
            model = mace.modules.ScaleShiftMACE(
                atomic_inter_scale=scale, atomic_inter_shift=shift, **kwargs
            )
        else:
            model = mace.modules.MACE(**kwargs)
        with torch.no_grad():  # non-trivial symmetric-contraction weights, not just the init
            for pname, param in model.named_parameters():
                if "weights" in pname and "symmetric" in pname:
                    param.normal_(0.0, 0.5)
    return model.eval()


#: ``embedding_specs`` of :func:`build_mace_variant` with ``charge_spin_embedding``: the
#: structure's total charge and spin as categorical per-graph embeddings, read from the graph's
#: ``total_charge``/``total_spin`` (mmea_calc's graphs carry mace's defaults, 0 and 1).
CHARGE_SPIN_EMBEDDING: dict[str, dict[str, Any]] = {
    "total_charge": {"type": "categorical", "per": "graph", "num_classes": 11, "emb_dim": 4,
                     "offset": 5},
    "total_spin": {"type": "categorical", "per": "graph", "num_classes": 11, "emb_dim": 4},
}  # fmt: skip


def build_mace_variant(
    interaction: str = "RealAgnosticResidualInteractionBlock",
    *,
    interaction_first: str | None = None,
    readout: str = "NonLinearReadoutBlock",
    hidden_irreps: str = "8x0e+8x1o",
    edge_irreps: str | None = None,
    use_edge_irreps_first: bool = False,
    use_agnostic_product: bool = False,
    use_last_readout_only: bool = False,
    keep_last_layer_irreps: bool = False,
    charge_spin_embedding: bool = False,
    scale_shift: bool = True,
    dtype: str | torch.dtype = torch.float64,
    seed: int = 0,
) -> torch.nn.Module:
    """A small seeded H/C/O MACE (2 interactions, ``max_ell=2``) built with any of mace-torch's
    interaction blocks and readouts and the constructor options foundation models use.

    ``interaction`` and ``readout`` are keys of ``mace.modules.interaction_classes`` and
    ``readout_classes``; ``interaction_first`` defaults to ``interaction``;
    ``charge_spin_embedding`` adds :data:`CHARGE_SPIN_EMBEDDING` with
    ``use_embedding_readout``. The other options are the ``MACE`` constructor's own. Models are
    built once per argument set and deep-copied; the global RNG is untouched.

    Example:
        >>> model = build_mace_variant("RealAgnosticDensityInteractionBlock")
        >>> type(model.interactions[1]).__name__
        'RealAgnosticDensityInteractionBlock'
    """
    return copy.deepcopy(
        _build_mace_variant(
            interaction,
            interaction_first or interaction,
            readout,
            hidden_irreps,
            edge_irreps,
            bool(use_edge_irreps_first),
            bool(use_agnostic_product),
            bool(use_last_readout_only),
            bool(keep_last_layer_irreps),
            bool(charge_spin_embedding),
            bool(scale_shift),
            str(dtype).replace("torch.", ""),
            int(seed),
        )
    )


@functools.lru_cache(maxsize=32)
def _build_mace_variant(
    interaction: str,
    interaction_first: str,
    readout: str,
    hidden_irreps: str,
    edge_irreps: str | None,
    use_edge_irreps_first: bool,
    use_agnostic_product: bool,
    use_last_readout_only: bool,
    keep_last_layer_irreps: bool,
    charge_spin_embedding: bool,
    scale_shift: bool,
    dtype: str,
    seed: int,
) -> torch.nn.Module:
    rng = np.random.default_rng(seed)
    kwargs = _tiny_kwargs(interaction, interaction_first, hidden_irreps, (1, 6, 8), 4.0, 2, rng)
    kwargs.update(
        readout_cls=mace.modules.readout_classes[readout],
        edge_irreps=None if edge_irreps is None else o3.Irreps(edge_irreps),
        use_edge_irreps_first=use_edge_irreps_first,
        use_agnostic_product=use_agnostic_product,
        use_last_readout_only=use_last_readout_only,
        keep_last_layer_irreps=keep_last_layer_irreps,
    )
    if charge_spin_embedding:
        kwargs["embedding_specs"] = copy.deepcopy(CHARGE_SPIN_EMBEDDING)
        kwargs["use_embedding_readout"] = True
    with (  # mace reads the default dtype and draws from the global RNG: scope both
        torch.random.fork_rng(),
        torch_tools.default_dtype(dtype),
        warnings.catch_warnings(),
    ):
        warnings.filterwarnings("ignore", message="The TorchScript type system")
        torch.manual_seed(seed)
        if scale_shift:
            model = mace.modules.ScaleShiftMACE(
                atomic_inter_scale=1.3, atomic_inter_shift=0.1, **kwargs
            )
        else:
            model = mace.modules.MACE(**kwargs)
        with torch.no_grad():  # non-trivial weights where mace's init is (near) zero
            for pname, param in model.named_parameters():
                if "weights" in pname and "symmetric" in pname:
                    param.normal_(0.0, 0.5)
                elif pname.endswith(("source_embedding.weight", "target_embedding.weight")):
                    param.normal_(0.0, 1.0)
    return model.eval()


#: The graph-dict keys LAMMPS' ``pair_mace`` hands the model (besides ``unit_shifts``).
PAIR_MACE_KEYS = ("batch", "cell", "edge_index", "node_attrs", "positions", "ptr", "shifts")


def pair_mace_inputs(
    atoms: ase.Atoms, info: dict[str, Any], dtype: torch.dtype = torch.float64
) -> dict[str, torch.Tensor]:
    """The graph dict LAMMPS' ``pair_mace`` builds for an exported ``LAMMPS_MACE`` file
    (positions, edges, shifts, one-hot, batch, ptr, a ``[3, 3]`` cell), without LAMMPS: call
    the file as ``module(data, local_mask, True)``."""
    graph = collate([atoms_to_graph(atoms, info)], dtype=dtype)
    data = {key: graph[key] for key in PAIR_MACE_KEYS}
    data["unit_shifts"] = graph["unit_shifts"]
    data["cell"] = data["cell"].reshape(3, 3)  # pair_mace passes a [3, 3] cell
    return data


def mliap_batch(atoms: ase.Atoms, info: dict[str, Any]) -> dict[str, Any]:
    """What mace's ``LAMMPS_MLIAP_MACE._prepare_batch`` builds, without a LAMMPS data object:
    call an exported ML-IAP object as ``loaded.model(batch)`` (float64)."""
    graph = collate([atoms_to_graph(atoms, info)], dtype=torch.float64)
    edges, pos = graph["edge_index"], graph["positions"]
    return {
        "vectors": pos[edges[1]] - pos[edges[0]] + graph["shifts"],
        "node_attrs": graph["node_attrs"],
        "edge_index": edges,
        "batch": torch.zeros(len(atoms), dtype=torch.long),
        "lammps_class": None,
        "natoms": (len(atoms), 0),
    }


def random_cluster(
    n_atoms: int,
    symbols: Sequence[str] = ("H", "C", "O"),
    *,
    density: float = 0.08,
    min_distance: float = 0.9,
    cell: float | None = None,
    seed: int = 0,
) -> ase.Atoms:
    """Random atoms at a minimum separation: a cluster, or a periodic box with ``cell``."""
    rng = np.random.default_rng(seed)
    side = cell if cell is not None else (n_atoms / density) ** (1 / 3)
    positions: list[np.ndarray] = []
    while len(positions) < n_atoms:
        trial = rng.uniform(0, side, size=3)
        if cell is not None:
            deltas = np.asarray(positions) - trial if positions else np.zeros((0, 3))
            deltas -= side * np.round(deltas / side)
        else:
            deltas = np.asarray(positions) - trial if positions else np.zeros((0, 3))
        if len(deltas) == 0 or np.linalg.norm(deltas, axis=1).min() > min_distance:
            positions.append(trial)
    numbers = rng.choice([ase.data.atomic_numbers[s] for s in symbols], size=n_atoms)
    atoms = ase.Atoms(numbers=numbers, positions=np.asarray(positions))
    if cell is not None:
        atoms.set_cell([side, side, side])
        atoms.set_pbc(True)
    return atoms


def random_rotation(seed: int = 0, inversion: bool = False) -> np.ndarray:
    """A random 3x3 rotation (times -1 with ``inversion``), float64."""
    rng = np.random.default_rng(seed)
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] *= -1
    return -q if inversion else q


def randomize_adapter(model: Any, name: str, std: float = 0.1, seed: int = 0) -> None:
    """Fill every tensor of adapter ``name`` with N(0, std) values (seeded)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.adapter_parameters(name):
            noise = torch.randn(param.shape, generator=generator, dtype=torch.float64) * std
            param.copy_(noise.to(param.dtype))


def evaluate(
    model: torch.nn.Module,
    atoms_list: Sequence[ase.Atoms],
    *,
    adapters: Sequence[str | None] | None = None,
    compute_stress: bool = False,
    training: bool = False,
    head: str | None = None,
) -> dict[str, torch.Tensor]:
    """Run a (MACE or Adapted) model on a batch of structures; returns the output dict.

    With ``adapters`` (one name per structure, ``None`` = base), nodes are routed per structure.
    ``head``: the head of a multi-head base (default: its default head).
    """
    from mmea_calc.base import base_info

    base = getattr(model, "base_model", model)
    info = getattr(model, "base_info", None) or base_info(base)
    dtype = next(base.parameters()).dtype
    data = collate([atoms_to_graph(a, info, head=head) for a in atoms_list], dtype=dtype)
    if adapters is not None:
        model.route(data, adapters)
    return model(data, compute_stress=compute_stress, training=training)


def _labelled_frames(model: Any, name: str, frames: Sequence[ase.Atoms]) -> list[ase.Atoms]:
    """Copies of ``frames`` with REF_energy/REF_forces (REF_stress if periodic) from adapter
    ``name`` of ``model``."""
    out = []
    for atoms in frames:
        periodic = bool(atoms.pbc.all())
        res = evaluate(model, [atoms], adapters=[name], compute_stress=periodic)
        atoms = atoms.copy()
        atoms.info["REF_energy"] = float(res["energy"].detach()[0])
        atoms.arrays["REF_forces"] = res["forces"].detach().numpy().astype(np.float64)
        if periodic:
            atoms.info["REF_stress"] = res["stress"].detach()[0].numpy().astype(np.float64)
        out.append(atoms)
    return out


def write_demo_assets(
    root: Any,
    *,
    molecule: str = "CH3CH2OH",
    name: str = "ethanol",
    n_frames: int = 6,
    n_water: int = 8,
    seed: int = 0,
) -> Any:
    """Tiny stand-ins for the demo's assets: ``base/``, ``adapters/{water,NAME}/``, ``data/``.

    A tiny seeded H/C/N/O base (safe format) and two randomised MMEA adapters with stored
    environments (periodic water boxes; hot copies of ASE's ``molecule``), and held-out frames
    labelled *by those adapters*, so adapted errors are zero and the base's are not. For tests
    of :func:`mmea_calc.demo.run_demo` and the examples; the numbers mean nothing physically.

    Example:
        >>> import tempfile
        >>> from pathlib import Path
        >>> root = write_demo_assets(tempfile.mkdtemp(), n_frames=1, n_water=4)
        >>> sorted(p.name for p in (Path(root) / "adapters").iterdir())
        ['ethanol', 'water']
    """
    from pathlib import Path

    import ase.build
    import ase.io

    from mmea_calc.base_format import write_base_dir
    from mmea_calc.build import water_box
    from mmea_calc.model import AdaptedModel, MMEAConfig
    from mmea_calc.selection import describe_environment
    from mmea_calc.train import calibrate_adapter as calibrate

    root = Path(root)
    base = build_tiny_mace("8x0e+8x1o", atomic_numbers=(1, 6, 7, 8), pair_repulsion=True)
    write_base_dir(base, root / "base", verify=False)
    model = AdaptedModel(base)
    boxes = [water_box(n_water, seed=seed + s) for s in range(2 * n_frames)]
    hot = []
    for s in range(2 * n_frames):
        atoms = ase.build.molecule(molecule)
        atoms.rattle(0.08, seed=seed + s)
        atoms.info["temperature_K"] = 600.0
        hot.append(atoms)
    for index, (env, frames) in enumerate((("water", boxes), (name, hot))):
        model.add_adapter(env, MMEAConfig(rank=4), set_active=False)
        randomize_adapter(model, env, std=0.1, seed=seed + index + 1)
        environment = describe_environment(model, frames[:n_frames])
        calibrate(model, env, frames[:n_frames])
        model.save_adapter(env, root / "adapters" / env, environment=environment)
        (root / "data").mkdir(parents=True, exist_ok=True)
        test = _labelled_frames(model, env, frames[n_frames:])
        ase.io.write(root / "data" / f"{env}_test.xyz", test, format="extxyz")
    return root
