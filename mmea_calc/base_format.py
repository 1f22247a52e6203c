"""A safe on-disk format for base MACE models: ``model.safetensors`` + ``config.json``, no pickle.

``config.json`` holds the constructor arguments of the mace-torch model class (class names,
irreps as strings, the gate activation by name, atomic energies, scale/shift, ...), from which
:func:`read_base_dir` rebuilds the module with mace-torch's own classes and then loads the
state dict from ``model.safetensors``. Only whitelisted classes can be named: a config that
names anything else is refused (:class:`~mmea_calc.errors.BaseFormatError`), so reading a base
directory never runs code from the file. :func:`write_base_dir` rebuilds the model from the
config it is about to write and checks that energies and forces agree (to float rounding) before
writing anything, so a model with features this format does not capture is refused instead of
saved wrong. The state dict itself round-trips exactly (same fingerprint).

The package may ship its own base in this format (``mmea_calc/embedded/base/``), loaded by
``load_base("embedded")``, with adapters in ``mmea_calc/embedded/adapters/<name>/``.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import logging
import os
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ase
import numpy as np
import torch
from safetensors.torch import save

from mmea_calc._deps import mace, o3
from mmea_calc.errors import BaseFormatError, EmbeddedAssetsMissingError, OutputExistsError
from mmea_calc.io import (
    atomic_write_bytes,
    atomic_write_json,
    read_checked_safetensors,
    read_json_config,
)

__all__ = [
    "BASE_CONFIG_NAME",
    "BASE_FORMAT_VERSION",
    "BASE_WEIGHTS_NAME",
    "EMBEDDED_DIR",
    "base_config",
    "build_from_config",
    "embedded_adapter_dirs",
    "embedded_base_dir",
    "is_base_dir",
    "read_base_dir",
    "write_base_dir",
]

logger = logging.getLogger(__name__)

BASE_FORMAT_VERSION = 1
BASE_CONFIG_NAME = "config.json"
BASE_WEIGHTS_NAME = "model.safetensors"
#: Assets shipped inside the package: ``base/``, ``adapters/<name>/``, ``data/``.
EMBEDDED_DIR = Path(__file__).resolve().parent / "embedded"

_MODEL_CLASSES = ("MACE", "ScaleShiftMACE")
_READOUT_CLASSES = ("NonLinearReadoutBlock", "NonLinearBiasReadoutBlock")
_GATES = ("silu", "tanh", "abs", "None")
_RADIAL_TYPES = {
    "BesselBasis": "bessel",
    "GaussianBasis": "gaussian",
    "ChebychevBasis": "chebyshev",
}
_TRANSFORMS = {"AgnesiTransform": "Agnesi", "SoftTransform": "Soft"}
_IRREPS_KEYS = ("hidden_irreps", "MLP_irreps", "edge_irreps")
_REQUIRED_KEYS = (
    "format_version",
    "model_class",
    "dtype",
    "config",
    "fingerprint",
    "tensors_sha256",
)


def _modules() -> Any:
    return mace.modules


_U_KEY = re.compile(
    r"^products\.(\d+)\.symmetric_contractions\.contractions\.(\d+)\.U_matrix_(\d+)$"
)


def _stored_u_matrices(state: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """The symmetric contractions' U matrices of a state dict, in the order mace builds them."""
    found = []
    for key, value in state.items():
        match = _U_KEY.match(key)
        if match:
            found.append((tuple(int(g) for g in match.groups()), value))
    return [value for _, value in sorted(found, key=lambda item: item[0])]


@contextlib.contextmanager
def _u_matrices_from(stored: list[torch.Tensor] | None) -> Iterator[None]:
    """Hand mace's symmetric contractions their stored U matrices instead of recomputing them.

    Computing the Clebsch-Gordan ``U_matrix_real`` is most of a build's time, yet the result
    is a buffer that the state dict overwrites anyway. Contractions use only the tensor (the
    last item) and ask in build order, so we answer from the stored list; a wrong shape makes
    the strict state-dict load fail. The patch is scoped to the ``with`` block.
    """
    module = importlib.import_module("mace.modules.symmetric_contraction")
    original = module.U_matrix_real
    queue = list(stored or [])

    def from_state(*args: Any, **kwargs: Any) -> Any:
        if not queue:
            return original(*args, **kwargs)
        return [None, queue.pop(0).clone()]

    module.U_matrix_real = from_state
    try:
        yield
    finally:
        module.U_matrix_real = original


# ---------------------------------------------------------------------------- module -> config
def _gate_name(model: torch.nn.Module) -> str:
    acts = getattr(getattr(model.readouts[-1], "non_linearity", None), "acts", None)
    if not acts:
        return "None"
    func = getattr(acts[0], "f", acts[0])
    for name, known in _modules().gate_dict.items():
        if known is not None and func is known:
            return name
    raise BaseFormatError(
        f"the readout's gate activation {func!r} is not one of mace's gates {list(_GATES)}"
    )


def _correlation(product: torch.nn.Module) -> int:
    contractions = product.symmetric_contractions
    try:
        return len(contractions.contractions[0].weights) + 1
    except AttributeError:
        return int(contractions.contraction_degree)


def _radial(model: torch.nn.Module) -> dict[str, Any]:
    radial = model.radial_embedding
    basis = type(radial.bessel_fn).__name__
    if basis not in _RADIAL_TYPES:
        raise BaseFormatError(
            f"radial basis {basis!r} is not supported; valid: {list(_RADIAL_TYPES)}"
        )
    transform = getattr(radial, "distance_transform", None)
    name = "None" if transform is None else _TRANSFORMS.get(type(transform).__name__)
    if name is None:
        raise BaseFormatError(f"distance transform {type(transform).__name__!r} is not supported")
    mlp = model.interactions[0].conv_tp_weights
    return {
        "num_bessel": int(radial.out_dim),
        "num_polynomial_cutoff": int(radial.cutoff_fn.p.item()),
        "radial_type": _RADIAL_TYPES[basis],
        "distance_transform": name,
        "apply_cutoff": bool(getattr(radial, "apply_cutoff", True)),
        "radial_MLP": [int(h) for h in mlp.hs[1:-1]],
    }


def _check_supported(model: torch.nn.Module) -> str:
    cls = type(model).__name__
    if cls not in _MODEL_CLASSES or type(model) is not getattr(_modules(), cls):
        raise BaseFormatError(
            f"model class {type(model).__module__}.{cls} is not supported by the safe base "
            f"format; valid: mace.modules.{' / mace.modules.'.join(_MODEL_CLASSES)}"
        )
    for attr in ("embedding_specs", "cueq_config", "oeq_config"):
        if getattr(model, attr, None) is not None:
            raise BaseFormatError(f"models with {attr} are not supported by the safe base format")
    interactions = {type(i).__name__ for i in model.interactions}
    unknown = interactions - set(_modules().interaction_classes)
    if unknown:
        raise BaseFormatError(f"interaction classes {sorted(unknown)} are not mace's own")
    avg = {float(i.avg_num_neighbors) for i in model.interactions}
    if len(avg) != 1:
        raise BaseFormatError(f"interactions disagree on avg_num_neighbors: {sorted(avg)}")
    return cls


def base_config(model: torch.nn.Module) -> dict[str, Any]:
    """The JSON-ready constructor arguments of a mace ``MACE``/``ScaleShiftMACE`` module.

    Mirrors ``mace.tools.scripts_utils.extract_config_mace_model`` (which handles only
    ``ScaleShiftMACE``), with classes, irreps and the gate stored by name.

    Example:
        >>> from mmea_calc.testing import build_tiny_mace
        >>> cfg = base_config(build_tiny_mace("8x0e+8x1o"))
        >>> cfg["hidden_irreps"], cfg["interaction_cls"], cfg["gate"]
        ('8x0e+8x1o', 'RealAgnosticResidualInteractionBlock', 'silu')
    """
    cls = _check_supported(model)
    heads = list(getattr(model, "heads", None) or ["Default"])
    readout = model.readouts[-1]
    readout_cls = type(readout).__name__
    if readout_cls == "LinearReadoutBlock":  # one interaction: no non-linear readout is built
        readout_cls = "NonLinearReadoutBlock"
    if readout_cls not in _READOUT_CLASSES:
        raise BaseFormatError(f"readout class {readout_cls!r} is not supported")
    mlp_irreps = o3.Irreps(str(getattr(readout, "hidden_irreps", "1x0e")))
    mlp_scalars = max(1, mlp_irreps.count(o3.Irrep("0e")) // len(heads))
    edge_irreps = getattr(model, "edge_irreps", None)
    config: dict[str, Any] = {
        "r_max": float(model.r_max.item()),
        "max_ell": int(model.spherical_harmonics._lmax),
        "interaction_cls": type(model.interactions[-1]).__name__,
        "interaction_cls_first": type(model.interactions[0]).__name__,
        "num_interactions": int(model.num_interactions.item()),
        "num_elements": len(model.atomic_numbers),
        "hidden_irreps": str(o3.Irreps(str(model.products[0].linear.irreps_out))),
        "MLP_irreps": f"{mlp_scalars}x0e",
        "edge_irreps": None if edge_irreps is None else str(o3.Irreps(str(edge_irreps))),
        "gate": _gate_name(model),
        "atomic_energies": model.atomic_energies_fn.atomic_energies.cpu().double().tolist(),
        "avg_num_neighbors": float(model.interactions[0].avg_num_neighbors),
        "atomic_numbers": [int(z) for z in model.atomic_numbers],
        "correlation": [_correlation(p) for p in model.products],
        "pair_repulsion": hasattr(model, "pair_repulsion_fn"),
        "use_reduced_cg": bool(getattr(model, "use_reduced_cg", False)),
        "use_so3": bool(getattr(model, "use_so3", False)),
        "use_agnostic_product": bool(getattr(model, "use_agnostic_product", False)),
        "use_last_readout_only": bool(getattr(model, "use_last_readout_only", False)),
        "use_embedding_readout": hasattr(model, "embedding_readout"),
        "use_edge_irreps_first": bool(getattr(model, "use_edge_irreps_first", False)),
        "keep_last_layer_irreps": bool(getattr(model, "keep_last_layer_irreps", False)),
        "heads": heads,
        "readout_cls": readout_cls,
        **_radial(model),
    }
    if cls == "ScaleShiftMACE":
        config["atomic_inter_scale"] = model.scale_shift.scale.cpu().double().tolist()
        config["atomic_inter_shift"] = model.scale_shift.shift.cpu().double().tolist()
    return config


# ---------------------------------------------------------------------------- config -> module
def _lookup(table: dict[str, Any], name: Any, what: str, allowed: Any = None) -> Any:
    allowed = list(allowed if allowed is not None else table)
    if not isinstance(name, str) or name not in allowed or name not in table:
        raise BaseFormatError(f"{what} {name!r} is not allowed; valid: {allowed}")
    return table[name]


def _constructor_kwargs(config: dict[str, Any]) -> dict[str, Any]:
    modules = _modules()
    kwargs = dict(config)
    try:
        for key in ("interaction_cls", "interaction_cls_first"):
            kwargs[key] = _lookup(modules.interaction_classes, config[key], key)
        kwargs["readout_cls"] = _lookup(
            modules.readout_classes, config["readout_cls"], "readout_cls", _READOUT_CLASSES
        )
        kwargs["gate"] = _lookup(modules.gate_dict, config["gate"], "gate", _GATES)
        for key in _IRREPS_KEYS:
            if config.get(key) is not None:
                kwargs[key] = o3.Irreps(config[key])
        kwargs["atomic_energies"] = np.asarray(config["atomic_energies"], dtype=np.float64)
    except (KeyError, TypeError, ValueError, AssertionError) as exc:
        if isinstance(exc, BaseFormatError):
            raise
        raise BaseFormatError(f"base config is invalid: {exc!r}") from exc
    return kwargs


def build_from_config(
    model_class: str,
    config: dict[str, Any],
    dtype: str = "float64",
    state: dict[str, torch.Tensor] | None = None,
) -> torch.nn.Module:
    """Build a ``MACE``/``ScaleShiftMACE`` from :func:`base_config`'s output.

    Only mace-torch's own classes named in its registries (interaction, readout, gate) can be
    named; anything else raises :class:`~mmea_calc.errors.BaseFormatError`. With ``state``,
    the state dict is loaded (strictly) and its stored Clebsch-Gordan matrices are used
    instead of recomputing them (much faster); without, the weights are mace's random init.
    """
    from mace.tools import torch_tools

    cls = _lookup({n: getattr(_modules(), n) for n in _MODEL_CLASSES}, model_class, "model_class")
    if dtype not in ("float32", "float64"):
        raise BaseFormatError(f"dtype {dtype!r} is not supported; valid: 'float32', 'float64'")
    kwargs = _constructor_kwargs(config)
    # mace builds buffers in the default dtype and draws random initial weights: scope both
    with (
        torch.random.fork_rng(),
        torch_tools.default_dtype(dtype),
        _u_matrices_from(_stored_u_matrices(state) if state is not None else None),
        warnings.catch_warnings(),
    ):
        warnings.filterwarnings("ignore", message="The TorchScript type system")
        try:
            model = cls(**kwargs).eval()
        except (TypeError, ValueError, KeyError, AssertionError, RuntimeError) as exc:
            raise BaseFormatError(f"cannot build {model_class} from its config: {exc}") from exc
    if state is not None:
        _load_state(model, state, f"this {model_class}")
    return model


def _float_dtype(model: torch.nn.Module) -> str:
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if len(dtypes) != 1 or next(iter(dtypes)) not in (torch.float32, torch.float64):
        raise BaseFormatError(f"model parameters must all be float32 or float64, got {dtypes}")
    return str(next(iter(dtypes))).replace("torch.", "")


def _load_state(model: torch.nn.Module, state: dict[str, torch.Tensor], origin: str) -> None:
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise BaseFormatError(
            f"{origin}: tensors do not fit the model its config describes: "
            f"{' '.join(line.strip() for line in first[:3])}"
        ) from exc


def _probe_outputs(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Energy and forces on a small fixed cluster holding every element of the model."""
    from mmea_calc.base import base_info
    from mmea_calc.data import atoms_to_graph, collate

    numbers = [int(z) for z in model.atomic_numbers]
    numbers = (numbers * 4)[: max(4, len(numbers))]
    grid = np.array([[i % 3, (i // 3) % 3, i // 9] for i in range(len(numbers))], dtype=float)
    offsets = np.random.default_rng(0).normal(scale=0.1, size=grid.shape)
    atoms = ase.Atoms(numbers=numbers, positions=1.4 * grid + offsets)
    dtype = next(model.parameters()).dtype
    data = collate([atoms_to_graph(atoms, base_info(model))], dtype=dtype)
    out = model(data, training=False)
    return out["energy"].detach(), out["forces"].detach()


def _state_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------------------- files
def write_base_dir(
    model: torch.nn.Module,
    directory: str | os.PathLike,
    *,
    overwrite: bool = False,
    verify: bool = True,
) -> Path:
    """Write ``model`` as a safe base directory (``model.safetensors`` + ``config.json``).

    Args:
        model: a mace-torch ``MACE`` or ``ScaleShiftMACE`` (not an AdaptedModel).
        directory: created if needed; an existing non-empty one needs ``overwrite=True``.
        overwrite: replace the files of an existing base directory.
        verify: rebuild the model from the config first and require identical energies and
            forces on a probe structure (nothing is written if they differ).

    Returns:
        The directory.

    Example:
        >>> import tempfile
        >>> from mmea_calc import fingerprint
        >>> from mmea_calc.testing import build_tiny_mace
        >>> model = build_tiny_mace()
        >>> path = write_base_dir(model, tempfile.mkdtemp() + "/base")
        >>> fingerprint(read_base_dir(path)) == fingerprint(model)
        True
    """
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise OutputExistsError(f"{str(directory)!r} exists and is not a directory")
    if directory.is_dir() and any(directory.iterdir()) and not overwrite:
        raise OutputExistsError(
            f"{str(directory)!r} is not empty; pass overwrite=True (--overwrite) to replace it"
        )
    from mmea_calc import __version__
    from mmea_calc.base import base_info, fingerprint

    model_class = type(model).__name__
    config, dtype = base_config(model), _float_dtype(model)
    state = _state_tensors(model)
    if verify:
        _verify_rebuild(model, model_class, config, dtype, state)
    data = save(state, metadata={"format": "pt", "mmea_base_format_version": "1"})
    document = {
        "format_version": BASE_FORMAT_VERSION,
        "mmea_calc_version": __version__,
        "mace_torch_version": getattr(mace, "__version__", None),
        "model_class": model_class,
        "dtype": dtype,
        "config": config,
        "fingerprint": fingerprint(model),
        "info": base_info(model),
        "tensors_sha256": hashlib.sha256(data).hexdigest(),
    }
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(directory / BASE_WEIGHTS_NAME, data)
    atomic_write_json(directory / BASE_CONFIG_NAME, document)
    logger.info(
        "wrote base %s (%s, %s) to %s", model_class, dtype, document["fingerprint"][:12], directory
    )
    return directory


def _verify_rebuild(
    model: torch.nn.Module,
    model_class: str,
    config: dict[str, Any],
    dtype: str,
    state: dict[str, torch.Tensor],
) -> None:
    rebuilt = build_from_config(model_class, config, dtype, state)
    device = next(model.parameters()).device
    rebuilt = rebuilt.to(device)
    energy, forces = _probe_outputs(model)
    energy2, forces2 = _probe_outputs(rebuilt)
    # equal up to rounding: TorchScript's profiling executor changes the last bits between a
    # module's first calls (the same pickle loaded twice differs by ~1e-16 eV/Å in float64)
    tol = 1e-10 if energy.dtype == torch.float64 else 1e-4
    scale = 1.0 + float(forces.abs().max()) if forces.numel() else 1.0
    close_e = torch.allclose(energy, energy2, rtol=tol, atol=tol)
    if not (close_e and torch.allclose(forces, forces2, rtol=tol, atol=tol * scale)):
        delta = float((forces - forces2).abs().max())
        raise BaseFormatError(
            f"this {model_class} cannot be stored in the safe base format: the model rebuilt "
            f"from its config differs (max |dF| {delta:.3g} eV/Å, energy {float(energy[0]):.10g} "
            f"vs {float(energy2[0]):.10g} eV)"
        )


def is_base_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a directory holding a safe base's ``config.json``."""
    return Path(path).is_dir() and (Path(path) / BASE_CONFIG_NAME).is_file()


def _read_document(directory: Path) -> dict[str, Any]:
    if not directory.is_dir():
        raise BaseFormatError(f"base directory {str(directory)!r} does not exist")
    for name in (BASE_CONFIG_NAME, BASE_WEIGHTS_NAME):
        if not (directory / name).is_file():
            raise BaseFormatError(
                f"{str(directory)!r} is not a base directory: {name} is missing (a base holds "
                f"{BASE_CONFIG_NAME} and {BASE_WEIGHTS_NAME}; make one with mmea-calc convert-base)"
            )
    return read_json_config(
        directory / BASE_CONFIG_NAME, _REQUIRED_KEYS, BASE_FORMAT_VERSION, BaseFormatError, "bases"
    )


def read_base_dir(
    directory: str | os.PathLike, device: str | torch.device = "cpu"
) -> torch.nn.Module:
    """Rebuild a base model from a safe base directory (see :func:`write_base_dir`).

    Validates the format version, the whitelisted class names, the tensor file's checksum,
    every tensor's name and shape (strict state-dict load) and the model fingerprint; raises
    :class:`~mmea_calc.errors.BaseFormatError` for each. Returns the model in eval mode in the
    dtype it was saved in (use :func:`mmea_calc.load_base` for a frozen, converted copy).
    """
    from mmea_calc.base import fingerprint

    directory = Path(directory)
    document = _read_document(directory)
    state = read_checked_safetensors(
        directory / BASE_WEIGHTS_NAME,
        document["tensors_sha256"],
        BaseFormatError,
        BASE_CONFIG_NAME,
    )
    if not isinstance(document["config"], dict):
        raise BaseFormatError(f"{directory / BASE_CONFIG_NAME}: 'config' must be a JSON object")
    try:
        model = build_from_config(
            document["model_class"], document["config"], document["dtype"], state
        )
    except BaseFormatError as exc:
        raise BaseFormatError(f"base {str(directory)!r}: {exc}") from exc
    if fingerprint(model) != document["fingerprint"]:
        raise BaseFormatError(
            f"base {str(directory)!r} rebuilt to fingerprint {fingerprint(model)[:12]}…, but its "
            f"config records {str(document['fingerprint'])[:12]}…"
        )
    return model.to(device).eval()


def embedded_adapter_dirs(root: str | os.PathLike | None = None) -> list[Path]:
    """The adapter directories under ``ROOT/adapters/`` (default: the package's embedded ones).

    Raises :class:`~mmea_calc.errors.EmbeddedAssetsMissingError` when there are none.
    """
    folder = Path(root if root is not None else EMBEDDED_DIR) / "adapters"
    found = sorted(p.parent for p in folder.glob("*/adapter_config.json"))
    if not found:
        raise EmbeddedAssetsMissingError(
            f"no embedded adapters: {str(folder)!r} holds no adapter directories (this build of "
            "mmea_calc ships without them; pass adapter directories explicitly)"
        )
    return found


def embedded_base_dir(root: str | os.PathLike | None = None) -> Path:
    """The base directory under ``ROOT/base/`` (default: the package's embedded one)."""
    folder = Path(root if root is not None else EMBEDDED_DIR) / "base"
    if not is_base_dir(folder):
        raise EmbeddedAssetsMissingError(
            f"no embedded base model: {str(folder)!r} holds no {BASE_CONFIG_NAME} (this build of "
            "mmea_calc ships without it; pass a .model file or a base directory instead)"
        )
    return folder
