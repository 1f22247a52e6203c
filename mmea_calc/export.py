"""Export an adapted model to LAMMPS: ``pair_style mace`` (TorchScript) and ML-IAP files.

One adapter is baked into each file (:meth:`~mmea_calc.AdaptedModel.freeze`): LAMMPS pads every
domain with ghost atoms that carry no structure index, so per-node routing between adapters
cannot survive there. The frozen model goes through mace-torch's own wrappers:

* :func:`export_lammps`: ``LAMMPS_MACE`` + ``e3nn.util.jit.compile`` + ``torch.jit.save``, the
  file ``pair_style mace`` loads (as ``mace/cli/create_lammps_model.py`` writes it);
* :func:`export_mliap`: ``LAMMPS_MLIAP_MACE``, ``torch.save``-d, for ``pair_style mliap
  unified``. Unlike mace's script it is **not** converted to cuEquivariance: that converter
  matches weights by key name and would silently corrupt (or drop) the adapted linears. Loading
  the file unpickles Python classes, so LAMMPS' Python needs mmea_calc (and mace) installed.

Each export writes a sidecar ``FILE.json`` recording the adapter, the base fingerprint, the
element order, the dtype, the versions and the LAMMPS input lines. Writes are atomic.

An :class:`~mmea_calc.AdaptedModel` itself must never reach mace's exporters or converters: its
adapters act through per-call hooks that TorchScript, ``LAMMPS_MACE`` and the cuEquivariance
converter do not see. :func:`check_exportable` refuses it.
"""

from __future__ import annotations

import copy
import io
import os
import platform
import re
import shutil
import subprocess
import warnings
from pathlib import Path
from typing import Any

import ase.data
import torch

from mmea_calc._deps import LAMMPS_MACE, LAMMPS_MLIAP_MACE, e3nn_jit, mace
from mmea_calc._version import __version__
from mmea_calc.adapter import MMEALayer
from mmea_calc.errors import ConfigError, ExportError
from mmea_calc.files import atomic_write_bytes, atomic_write_json, sha256_hex
from mmea_calc.mace_model import LAMMPS_ATTRS, missing_attributes, resolve_head
from mmea_calc.model import BASE_NAMES, AdaptedModel

__all__ = [
    "EXPORT_DTYPES",
    "EXPORT_FORMATS",
    "SIDECAR_FORMAT_VERSION",
    "check_elements_order",
    "check_exportable",
    "export_lammps",
    "export_mliap",
    "find_lammps",
    "lammps_input_lines",
    "lammps_module",
    "sidecar_path",
]

EXPORT_FORMATS = ("lammps", "mliap")
EXPORT_DTYPES = {"float32": torch.float32, "float64": torch.float64}
SIDECAR_FORMAT_VERSION = 1


def check_exportable(module: Any) -> torch.nn.Module:
    """``module`` if it is a plain MACE model that mace's LAMMPS wrappers can export whole.

    An :class:`~mmea_calc.AdaptedModel` (or any module holding one, or an MMEA layer) is refused:
    its adapters act through forward hooks registered per call, which ``LAMMPS_MACE``,
    TorchScript and mace's cuEquivariance converter never see, so the export would silently be
    the bare base. Freeze one adapter first (:meth:`~mmea_calc.AdaptedModel.freeze`).

    Raises:
        ExportError: ``module`` holds adapters or is not a MACE model.

    Example:
        >>> from mmea_calc import AdaptedModel
        >>> from mmea_calc.testing import build_tiny_mace
        >>> check_exportable(AdaptedModel(build_tiny_mace()))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        mmea_calc.errors.ExportError: an AdaptedModel cannot be exported as is...
    """
    if not isinstance(module, torch.nn.Module):
        raise ExportError(f"cannot export a {type(module).__name__}: expected a MACE module")
    for sub_name, sub in module.named_modules():
        if isinstance(sub, AdaptedModel | MMEALayer):
            where = f" (at {sub_name!r})" if sub_name else ""
            raise ExportError(
                f"an AdaptedModel cannot be exported as is{where}: its adapters act through "
                "per-call hooks that LAMMPS_MACE, TorchScript and mace's cuEquivariance "
                "converter drop silently; export model.freeze(name) (one adapter) or use "
                "mmea_calc.export.export_lammps(model, name, path)"
            )
    missing = missing_attributes(module, LAMMPS_ATTRS)
    if missing:
        raise ExportError(
            f"a {type(module).__name__} without {missing} is not a MACE model mace's LAMMPS "
            "wrappers can export"
        )
    return module


def _dtype(dtype: str | torch.dtype) -> tuple[str, torch.dtype]:
    for key, value in EXPORT_DTYPES.items():
        if dtype in (key, value):
            return key, value
    raise ExportError(f"dtype {dtype!r} cannot be exported; valid: {list(EXPORT_DTYPES)}")


def _head(module: torch.nn.Module, head: str | None) -> dict[str, str]:
    heads = list(getattr(module, "heads", None) or [None])
    if head is None:
        return {}
    if head not in heads:
        raise ExportError(f"head {head!r} is not in the model; valid heads: {heads}")
    return {"head": head}


def lammps_module(
    module: torch.nn.Module, *, dtype: str | torch.dtype = "float64", head: str | None = None
) -> torch.jit.ScriptModule:
    """``e3nn.util.jit.compile(LAMMPS_MACE(copy))``: what ``pair_style mace`` runs.

    ``module`` is a plain MACE model (a base, or a :meth:`~mmea_calc.AdaptedModel.freeze`
    result); it is deep-copied, put on the CPU in ``dtype`` and left untouched. ``head``
    defaults to the model's last head, as in mace.

    Raises:
        ExportError: an AdaptedModel (see :func:`check_exportable`), a bad dtype or head.

    Example:
        >>> from mmea_calc.testing import build_tiny_mace
        >>> scripted = lammps_module(build_tiny_mace())
        >>> [int(z) for z in scripted.atomic_numbers]
        [1, 6, 8]
    """
    check_exportable(module)
    _, torch_dtype = _dtype(dtype)
    kwargs = _head(module, head)
    copied = copy.deepcopy(module).to(device="cpu", dtype=torch_dtype).eval()
    with warnings.catch_warnings():  # torch deprecates the jit APIs e3nn and LAMMPS rely on
        warnings.filterwarnings(
            "ignore", message=".*torch.jit.*deprecated", category=DeprecationWarning
        )
        warnings.filterwarnings("ignore", message="The TorchScript type system")
        return e3nn_jit.compile(LAMMPS_MACE(copied, **kwargs))


#: The environment variable naming the LAMMPS binary our LAMMPS tests and benchmarks use.
LAMMPS_ENV = "MMEA_LAMMPS"


def find_lammps(path: str | os.PathLike | None = None) -> tuple[str | None, str]:
    """A LAMMPS binary with ``pair_style mace``: ``path``, else ``$MMEA_LAMMPS``, else ``lmp``
    on PATH. Returns ``(path, "")``, or ``(None, why not)`` (absent, does not run, or built
    without ML-MACE: ``lmp -h`` lists no pair style mace)."""
    found = str(path) if path else os.environ.get(LAMMPS_ENV) or shutil.which("lmp")
    if not found:
        return None, (
            f"no LAMMPS: set {LAMMPS_ENV}=/path/to/lmp or put lmp on PATH (ACEsuit's fork with "
            "ML-MACE; scripts/build_lammps.sh builds it)"
        )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    try:
        done = subprocess.run([found, "-h"], capture_output=True, text=True, timeout=60, env=env)
    except (OSError, subprocess.SubprocessError) as exc:
        return None, f"LAMMPS {found!r} does not run: {exc}"
    section = re.search(r"\* Pair styles:(.*?)(?:\n\* |\Z)", done.stdout, re.S)
    if section is None or "mace" not in section.group(1).split():
        return None, f"LAMMPS {found!r} has no pair style mace (lmp -h): build it with ML-MACE"
    return found, ""


def sidecar_path(path: str | os.PathLike) -> Path:
    """Where the JSON description of an exported file goes: ``FILE.json`` beside ``FILE``."""
    path = Path(path)
    return path.with_name(path.name + ".json")


def lammps_input_lines(
    fmt: str,
    path: str | os.PathLike,
    elements: list[str],
    *,
    data_file: str = "data.lammps",
    pair_style: str | None = None,
) -> list[str]:
    """A complete LAMMPS input that runs an exported file on a data file (``run 0``).

    ``elements`` are the data file's atom types 1..N in order: ``pair_coeff`` maps type ``i``
    to ``elements[i - 1]`` (LAMMPS itself never checks that the count matches). ASE writes data
    files without masses, so the ``mass`` lines are here. ``pair_style``: ``"mace
    no_domain_decomposition"`` (default for ``lammps``: one MPI rank, ghosts folded into
    periodic shifts, much faster for boxes of a few hundred atoms) or ``"mace"`` (several MPI
    ranks, domain decomposition; ``no_domain_decomposition`` fails there).

    Example:
        >>> print("\\n".join(lammps_input_lines("lammps", "water.pt", ["H", "O"])[2:]))
        units           metal
        atom_style      atomic
        atom_modify     map yes
        newton          on
        read_data       data.lammps
        mass            1 1.008
        mass            2 15.999
        # one MPI rank: 'mace no_domain_decomposition' (fast); several ranks: 'mace'
        pair_style      mace no_domain_decomposition
        pair_coeff      * * water.pt H O
        thermo_style    custom step pe press
        run             0
    """
    if fmt not in EXPORT_FORMATS:
        raise ExportError(f"export format {fmt!r} is not supported; valid: {list(EXPORT_FORMATS)}")
    masses = [
        f"mass            {i} {float(ase.data.atomic_masses[ase.data.atomic_numbers[e]]):.6g}"
        for i, e in enumerate(elements, start=1)
    ]
    if fmt == "lammps":
        style = pair_style or "mace no_domain_decomposition"
        pair = [
            "# one MPI rank: 'mace no_domain_decomposition' (fast); several ranks: 'mace'",
            f"pair_style      {style}",
            f"pair_coeff      * * {path} " + " ".join(elements),
        ]
    else:
        pair = [
            f"pair_style      mliap unified {path} 0",
            "pair_coeff      * * " + " ".join(elements),
        ]
    return [
        f"# LAMMPS input for {Path(path).name} (mmea-calc export); atom types 1..{len(elements)} "
        f"= {' '.join(elements)}",
        f"# the data file must list exactly {len(elements)} atom types, in this order",
        "units           metal",
        "atom_style      atomic",
        "atom_modify     map yes",
        "newton          on",
        f"read_data       {data_file}",
        *masses,
        *pair,
        "thermo_style    custom step pe press",
        "run             0",
    ]


def check_elements_order(model: AdaptedModel, elements: list[str] | None) -> list[str]:
    """The LAMMPS type order to export: ``elements`` (a data file's types, any subset of the
    model's elements, each once) or, by default, every element of the model in its order."""
    known = [ase.data.chemical_symbols[z] for z in model.base_info["atomic_numbers"]]
    if elements is None:
        return known
    elements = [str(e) for e in elements]
    unknown = [e for e in elements if e not in known]
    if unknown or not elements:
        raise ExportError(
            f"elements {unknown or elements} are not known to the base model; it knows {known} "
            "(give the data file's atom types in order, e.g. --elements H O)"
        )
    repeated = sorted({e for e in elements if elements.count(e) > 1})
    if repeated:
        raise ExportError(f"elements {repeated} appear more than once in {elements}")
    return elements


def _adapter_head(model: AdaptedModel, name: str | None, head: str | None) -> str:
    """The head to export: the adapter's (it is what the adapter was trained on); for the bare
    base, ``head`` or the base's default head."""
    if name is None:
        try:
            return resolve_head(model.heads, head)
        except ConfigError as exc:
            raise ExportError(str(exc)) from None
    own = model.adapter_head(name)
    if head is not None and head != own:
        raise ExportError(
            f"adapter {name!r} belongs to head {own!r}, not {head!r}: export it on its own head "
            "(its gates and E0 corrections were trained there)"
        )
    return own


def _check_request(model: Any, name: str | None, path: str | os.PathLike, overwrite: bool) -> Path:
    if not isinstance(model, AdaptedModel):
        raise ExportError(
            f"export_lammps/export_mliap take an AdaptedModel and an adapter name, got a "
            f"{type(model).__name__}; export a bare MACE model with lammps_module or mace's "
            "create_lammps_model"
        )
    if name not in BASE_NAMES and name not in model.adapter_names:
        raise ExportError(
            f"adapter name {name!r} cannot be exported: name one adapter to bake in (or None "
            f"for the bare base); loaded adapters: {model.adapter_names or 'none'}"
        )
    path = Path(path)
    if not path.parent.is_dir():
        raise ExportError(f"cannot write {str(path)!r}: folder {str(path.parent)!r} is absent")
    if path.is_dir():
        raise ExportError(f"cannot write {str(path)!r}: it is a directory")
    if path.exists() and not overwrite:
        raise ExportError(f"{str(path)!r} exists; pass overwrite=True (--overwrite) to replace it")
    return path


def _describe(
    model: AdaptedModel, name: str | None, path: Path, request: dict[str, Any], data: bytes
) -> dict[str, Any]:
    info = model.base_info
    fmt, elements = request["fmt"], request["elements"]
    adapter: dict[str, Any] = {"adapter": name}
    if name is not None:
        config = model.adapter_config(name)
        e0s = model.adapter_e0s(name)
        adapter.update(
            adapter_rank=config.rank,
            adapter_phi=config.phi,
            adapter_logit_bound=config.logit_bound,
            adapter_preset=config.preset,
            adapter_targets=model.adapter_targets(name),
            adapter_e0s_folded={str(z): v for z, v in sorted(e0s.items())} if e0s else None,
        )
    return {
        "format_version": SIDECAR_FORMAT_VERSION,
        "format": fmt,
        "file": path.name,
        "sha256": sha256_hex(data),
        **adapter,
        "base": info,
        # the LAMMPS atom types 1..N, in order (the data file's), and the model's own elements
        "elements": elements,
        "model_elements": [ase.data.chemical_symbols[z] for z in info["atomic_numbers"]],
        "atomic_numbers": info["atomic_numbers"],
        "r_max": info["r_max"],
        "num_interactions": info["num_interactions"],
        "head": request["head"],
        "dtype": request["dtype"],
        "cuequivariance": False,
        "lammps_input": lammps_input_lines(fmt, path.name, elements),
        "mmea_calc_version": __version__,
        "mace_torch_version": getattr(mace, "__version__", None),
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
    }


def _write(
    model: AdaptedModel, name: str | None, path: Path, request: dict[str, Any], data: bytes
) -> dict[str, Any]:
    description = _describe(model, name, path, request, data)
    # never a sidecar describing another file: the old one goes first, the new one last (a
    # crash in between leaves the new file without a description, not with a wrong one)
    sidecar_path(path).unlink(missing_ok=True)
    atomic_write_bytes(path, data)
    atomic_write_json(sidecar_path(path), description)
    return description


def _frozen(model: AdaptedModel, name: str | None) -> torch.nn.Module:
    """The plain MACE module to export: ``name`` baked in, or a frozen copy of the bare base."""
    if name is not None:
        return model.freeze(name)
    bare = copy.deepcopy(model.base_model).eval()
    for param in bare.parameters():
        param.requires_grad_(False)
    return bare


def export_lammps(
    model: AdaptedModel,
    name: str | None,
    path: str | os.PathLike,
    *,
    elements: list[str] | None = None,
    dtype: str | torch.dtype = "float64",
    head: str | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write a TorchScript file for LAMMPS ``pair_style mace`` with adapter ``name`` baked in.

    Args:
        model: the adapted model (left untouched).
        name: the adapter to bake in (one per file); ``None``/``"base"``: the bare base (a
            control run).
        path: the output file; its description goes to ``FILE.json`` (:func:`sidecar_path`).
        elements: the LAMMPS atom types 1..N in order (the data file's), any subset of the
            model's elements; default: every element of the model in its order. They make the
            ``pair_coeff`` line of the input the sidecar records (:func:`lammps_input_lines`).
        dtype: ``"float64"`` (default, as mace) or ``"float32"`` (faster, ~1e-6 relative).
        head: the head of a multi-head base (default, and the only one accepted: the
            adapter's own head; mace's own export would take the last head).
        overwrite: replace an existing file.

    Returns:
        The sidecar's content (adapter, base fingerprint, elements, dtype, LAMMPS input lines).

    Raises:
        ExportError: not an AdaptedModel, an unknown adapter name, bad dtype/head/elements,
            the file exists (without ``overwrite``) or its folder does not.

    Example:
        >>> import tempfile
        >>> from mmea_calc import AdaptedModel, MMEAConfig
        >>> from mmea_calc.testing import build_tiny_mace
        >>> model = AdaptedModel(build_tiny_mace())
        >>> model.add_adapter("water", MMEAConfig(rank=4))
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     info = export_lammps(model, "water", f"{tmp}/water.pt")
        >>> info["adapter"], info["elements"], info["lammps_input"][-3]
        ('water', ['H', 'C', 'O'], 'pair_coeff      * * water.pt H C O')
    """
    name = None if name in BASE_NAMES else name
    path = _check_request(model, name, path, overwrite)
    request = _request(model, name, "lammps", dtype, head, elements)
    compiled = lammps_module(_frozen(model, name), dtype=request["dtype"], head=request["head"])
    buffer = io.BytesIO()
    torch.jit.save(compiled, buffer)
    return _write(model, name, path, request, buffer.getvalue())


def _request(
    model: AdaptedModel,
    name: str | None,
    fmt: str,
    dtype: str | torch.dtype,
    head: str | None,
    elements: list[str] | None,
) -> dict[str, Any]:
    """The checked settings of one export (dtype name, head, LAMMPS type order)."""
    dtype_name, _ = _dtype(dtype)
    return {
        "fmt": fmt,
        "dtype": dtype_name,
        "head": _adapter_head(model, name, head),
        "elements": check_elements_order(model, elements),
    }


def export_mliap(
    model: AdaptedModel,
    name: str | None,
    path: str | os.PathLike,
    *,
    elements: list[str] | None = None,
    dtype: str | torch.dtype = "float64",
    head: str | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write an ML-IAP object (``pair_style mliap unified``) with adapter ``name`` baked in.

    The file is mace's ``LAMMPS_MLIAP_MACE`` around :meth:`~mmea_calc.AdaptedModel.freeze`,
    ``torch.save``-d (a pickle: LAMMPS' Python must import mace and mmea_calc to load it), in
    plain e3nn: **no** cuEquivariance conversion, which would corrupt the adapted linears.
    Arguments, return value and errors as :func:`export_lammps`.

    Example:
        >>> import tempfile
        >>> from mmea_calc import AdaptedModel, MMEAConfig
        >>> from mmea_calc.testing import build_tiny_mace
        >>> model = AdaptedModel(build_tiny_mace())
        >>> model.add_adapter("water", MMEAConfig(rank=4))
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     info = export_mliap(model, "water", f"{tmp}/water-mliap.pt")
        >>> info["format"], info["cuequivariance"], info["lammps_input"][-4]
        ('mliap', False, 'pair_style      mliap unified water-mliap.pt 0')
    """
    name = None if name in BASE_NAMES else name
    path = _check_request(model, name, path, overwrite)
    request = _request(model, name, "mliap", dtype, head, elements)
    torch_dtype = EXPORT_DTYPES[request["dtype"]]
    frozen = check_exportable(_frozen(model, name)).to(device="cpu", dtype=torch_dtype)
    wrapped = LAMMPS_MLIAP_MACE(frozen, **_head(frozen, request["head"]))
    buffer = io.BytesIO()
    torch.save(wrapped, buffer)
    return _write(model, name, path, request, buffer.getvalue())
