"""Everything this package knows about mace-torch's model internals, in one module.

This is the module most likely to need changes on a mace-torch upgrade: the constructor
arguments of ``MACE``/``ScaleShiftMACE`` and how to read them back from a built module
(:func:`base_config`, :func:`build_from_config`), attribute names (``products[i].linear``,
``atomic_energies_fn``, ...) and what makes a module a MACE model (:func:`check_mace`).
Nothing here reads or writes files.
"""

from __future__ import annotations

import contextlib
import importlib
import re
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from mmea_calc._deps import lora, mace, o3, torch_tools
from mmea_calc.errors import BaseFormatError, BaseModelError, ConfigError

__all__ = [
    "LAMMPS_ATTRS",
    "MODEL_CLASSES",
    "NODE_WISE_LINEARS",
    "atomic_energies",
    "base_config",
    "build_from_config",
    "check_mace",
    "float_dtype_name",
    "hidden_irreps",
    "invariant_feature_index",
    "load_state",
    "missing_attributes",
    "node_wise_linears",
]

MODEL_CLASSES = ("MACE", "ScaleShiftMACE")
_REQUIRED_ATTRS = ("atomic_numbers", "r_max", "interactions", "products", "readouts")
#: What mace's LAMMPS wrappers read from a model (``LAMMPS_MACE``, ``LAMMPS_MLIAP_MACE``).
LAMMPS_ATTRS = ("atomic_numbers", "r_max", "num_interactions", "atomic_energies_fn")


def missing_attributes(model: Any, names: tuple[str, ...]) -> list[str]:
    """The ``names`` that ``model`` lacks."""
    return [name for name in names if not hasattr(model, name)]


def check_mace(model: Any, origin: str) -> torch.nn.Module:
    """``model`` if it is a mace-torch MACE model; else a :class:`BaseModelError` naming
    ``origin``."""
    if not isinstance(model, torch.nn.Module):
        raise BaseModelError(
            f"{origin} holds a {type(model).__name__}, not a torch.nn.Module; "
            "expected a mace-torch MACE or ScaleShiftMACE model"
        )
    missing = missing_attributes(model, _REQUIRED_ATTRS)
    if missing:
        raise BaseModelError(
            f"{origin} is a {type(model).__name__} without {missing}; "
            "expected a mace-torch MACE or ScaleShiftMACE model"
        )
    return model


def hidden_irreps(model: torch.nn.Module) -> str:
    """The hidden irreps of the first layer, as mace-torch records them."""
    return str(o3.Irreps(str(model.products[0].linear.irreps_out)))


def invariant_feature_index(model: torch.nn.Module) -> torch.Tensor:
    """Positions of ``0e`` channels in MACE's concatenated per-layer ``node_feats`` output."""
    index, offset = [], 0
    for product in model.products:
        irreps = o3.Irreps(str(product.linear.irreps_out))
        for (_, ir), sl in zip(irreps, irreps.slices(), strict=True):
            if ir == o3.Irrep("0e"):
                index.extend(range(offset + sl.start, offset + sl.stop))
        offset += irreps.dim
    return torch.tensor(index, dtype=torch.long)


def atomic_energies(model: torch.nn.Module) -> torch.Tensor:
    """The per-element reference energies buffer (E0s) of a MACE model (``[n_el]`` or
    ``[n_heads, n_el]``), the tensor itself (writes change the model)."""
    return model.atomic_energies_fn.atomic_energies


def fold_e0_corrections(
    model: torch.nn.Module, e0s: dict[int, float] | None, head: str | None = None
) -> None:
    """Add per-element energy corrections (eV, by atomic number) to ``model``'s reference
    energies, in ``head``'s row of a multi-head table (``None``: the default head,
    :func:`resolve_head`). In place: the one way a correction enters a MACE module (a frozen
    export, a LoRA or full fine-tune); the adapted model adds the same numbers per node.

    Example:
        >>> from mmea_calc.testing import build_tiny_mace
        >>> model = build_tiny_mace()
        >>> before = atomic_energies(model).clone()
        >>> fold_e0_corrections(model, {6: 0.5})
        >>> (atomic_energies(model) - before).tolist()
        [0.0, 0.5, 0.0]
    """
    if not e0s:
        return
    table = atomic_energies(model)
    zs = [int(z) for z in model.atomic_numbers]
    shift = torch.tensor([e0s.get(z, 0.0) for z in zs], dtype=table.dtype, device=table.device)
    heads = model_heads(model)
    with torch.no_grad():
        row = table if table.dim() == 1 else table[heads.index(resolve_head(heads, head))]
        row.add_(shift)


def radial_features(model: torch.nn.Module, data: dict[str, torch.Tensor]) -> torch.Tensor:
    """The base's radial embedding of every edge, ``[n_edges, n_radial]``, from ``data``.

    Computed as mace's forward computes it (``get_edge_vectors_and_lengths`` on
    ``data["positions"]``/``data["shifts"]``, then ``model.radial_embedding``, cutoff envelope
    included), so inside a forward call, after mace's ``prepare_graph`` has written the strained
    positions and shifts back into ``data``, the result carries the gradients that forces and
    stress need. Adapters never change it.
    """
    _, lengths = mace.modules.utils.get_edge_vectors_and_lengths(
        positions=data["positions"], edge_index=data["edge_index"], shifts=data["shifts"]
    )
    radial = model.radial_embedding(
        lengths, data["node_attrs"], data["edge_index"], model.atomic_numbers
    )
    radial, cutoff = radial if isinstance(radial, tuple) else (radial, None)
    return radial if cutoff is None else radial * cutoff


def node_energy_module(model: torch.nn.Module) -> torch.nn.Module:
    """The module whose output is (a term of) each node's interaction energy before it is summed
    and differentiated: ``scale_shift`` of a ScaleShiftMACE, else the last readout. A forward
    hook adding a per-node term to its output adds it to the energy, forces and stress."""
    return model.scale_shift if hasattr(model, "scale_shift") else model.readouts[-1]


#: The ``o3.Linear`` children of mace-torch's own blocks that run once per node: their input and
#: output rows are the graph's nodes, in its node order (checked for every block of
#: ``mace.modules.interaction_classes`` and every readout that builds, mace-torch 0.3.16). The
#: ``edge_irreps`` of an interaction are the width of ``linear_up``'s output; it still runs on
#: nodes (the gather to edges comes after it).
NODE_WISE_LINEARS: dict[str, tuple[str, ...]] = {
    "LinearNodeEmbeddingBlock": ("linear",),
    "LinearReadoutBlock": ("linear",),
    "NonLinearReadoutBlock": ("linear_1", "linear_2"),
    "NonLinearBiasReadoutBlock": ("linear_1", "linear_mid", "linear_2"),
    "EquivariantProductBasisBlock": ("linear",),
    "RealAgnosticInteractionBlock": ("linear_up", "linear"),
    "RealAgnosticResidualInteractionBlock": ("linear_up", "linear"),
    "RealAgnosticDensityInteractionBlock": ("linear_up", "linear"),
    "RealAgnosticDensityResidualInteractionBlock": ("linear_up", "linear"),
    "RealAgnosticAttResidualInteractionBlock": (
        "linear_up",
        "linear_down",
        "linear",
        "skip_linear",
    ),
    "RealAgnosticResidualNonLinearInteractionBlock": (
        "source_embedding",
        "target_embedding",
        "linear_up",
        "skip_tp",
        "linear_res",
        "linear_1",
        "linear_2",
    ),
}


def _why_not_node_wise(
    name: str, linear: torch.nn.Module, parent_name: str, parent: torch.nn.Module
) -> str | None:
    """Why MMEA's per-node gates cannot be put on ``linear`` (``None``: they can)."""
    if not linear.internal_weights:
        return "its weights are an input of its forward (internal_weights=False), not its own"
    cls = type(parent).__name__
    if isinstance(parent, lora.LoRAO3Linear):
        return (
            f"it is part of mace's unmerged LoRA wrapper {cls} at {parent_name!r}, whose output "
            "adds a term the gates would not see; merge it first "
            "(mace.modules.lora.merge_lora_weights)"
        )
    known = getattr(_modules().blocks, cls, None) if cls in NODE_WISE_LINEARS else None
    if known is None or type(parent) is not known:
        return (
            f"it sits in a {type(parent).__module__}.{cls} ({parent_name or 'the model'!r}), "
            "not in one of mace-torch's blocks known to run it once per node; MMEA gates are "
            "computed per node from the node's own 0e input, so a linear whose rows may be "
            "edges (or anything but the graph's nodes) cannot carry them"
        )
    leaf = name.rpartition(".")[2]
    if leaf not in NODE_WISE_LINEARS[cls]:
        return (
            f"it is not one of the node-wise linears of mace's {cls} "
            f"({list(NODE_WISE_LINEARS[cls])})"
        )
    return None


def node_wise_linears(
    model: torch.nn.Module,
) -> tuple[dict[str, torch.nn.Module], dict[str, str]]:
    """Split the ``o3.Linear`` modules of a MACE model into those MMEA can gate and the rest.

    A linear can carry MMEA gates when it runs once per node (its rows are the graph's nodes)
    and owns its weights: the ``o3.Linear`` children listed in :data:`NODE_WISE_LINEARS` of
    mace-torch's own blocks (the exact classes, not subclasses, which may run them otherwise).
    Any other ``o3.Linear`` (in a block this module does not know, inside mace's unmerged LoRA
    wrapper, with external weights) is returned with the reason.

    Returns:
        ``({name: linear}, {name: why it cannot be gated})``, both in module order.

    Example:
        >>> from mmea_calc.testing import build_tiny_mace
        >>> gateable, other = node_wise_linears(build_tiny_mace())
        >>> list(gateable)[:3], other
        (['node_embedding.linear', 'interactions.0.linear_up', 'interactions.0.linear'], {})
    """
    modules = dict(model.named_modules())
    gateable: dict[str, torch.nn.Module] = {}
    other: dict[str, str] = {}
    for name, module in modules.items():
        if not isinstance(module, o3.Linear):
            continue
        parent_name = name.rpartition(".")[0]
        why = _why_not_node_wise(name, module, parent_name, modules[parent_name])
        if why is None:
            gateable[name] = module
        else:
            other[name] = why
    return gateable, other


def float_dtype_name(model: torch.nn.Module) -> str:
    """``"float32"`` or ``"float64"``: the one floating dtype of the model's parameters."""
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if len(dtypes) != 1 or next(iter(dtypes)) not in (torch.float32, torch.float64):
        raise BaseFormatError(f"model parameters must all be float32 or float64, got {dtypes}")
    return str(next(iter(dtypes))).replace("torch.", "")


_READOUT_CLASSES = ("NonLinearReadoutBlock", "NonLinearBiasReadoutBlock")
_GATES = ("silu", "tanh", "abs", "None")
_RADIAL_TYPES = {
    "BesselBasis": "bessel",
    "GaussianBasis": "gaussian",
    "ChebychevBasis": "chebyshev",
}
_TRANSFORMS = {"AgnesiTransform": "Agnesi", "SoftTransform": "Soft"}
_IRREPS_KEYS = ("hidden_irreps", "MLP_irreps", "edge_irreps")


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
    if cls not in MODEL_CLASSES or type(model) is not getattr(_modules(), cls):
        raise BaseFormatError(
            f"model class {type(model).__module__}.{cls} is not supported by the safe base "
            f"format; valid: mace.modules.{' / mace.modules.'.join(MODEL_CLASSES)}"
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
        "hidden_irreps": hidden_irreps(model),
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
    cls = _lookup({n: getattr(_modules(), n) for n in MODEL_CLASSES}, model_class, "model_class")
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
        load_state(model, state, f"this {model_class}")
    return model


def load_state(model: torch.nn.Module, state: dict[str, torch.Tensor], origin: str) -> None:
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise BaseFormatError(
            f"{origin}: tensors do not fit the model its config describes: "
            f"{' '.join(line.strip() for line in first[:3])}"
        ) from exc


# ---------------------------------------------------------------------------- heads
def model_heads(model: torch.nn.Module) -> list[str]:
    """A MACE model's heads, as mace lists them (a single-head model: ``["Default"]``)."""
    return list(getattr(model, "heads", None) or ["Default"])


def resolve_head(heads: list[str] | tuple[str, ...], head: str | None) -> str:
    """The head to evaluate on: ``head`` when it is one of ``heads``; without ``head``, the only
    head, else a ``Default``/``default`` head. Anything else raises
    :class:`~mmea_calc.errors.ConfigError` listing the heads (for an unknown name, mace's
    calculator would warn and take the last head: we do not).

    Example:
        >>> resolve_head(["Default"], None), resolve_head(["mp", "Default"], None)
        ('Default', 'Default')
        >>> resolve_head(["mp", "spice"], "spice")
        'spice'
    """
    heads = list(heads)
    if head is not None:
        if head not in heads:
            raise ConfigError(f"head {head!r} is not a head of the base model; its heads: {heads}")
        return head
    if len(heads) == 1:
        return heads[0]
    defaults = [h for h in heads if h.lower() == "default"]  # mace's rule, case-insensitive
    if defaults:
        return defaults[0]
    raise ConfigError(
        f"the base model has several heads {heads} and none is named 'Default': choose one "
        "with head=... (--head)"
    )
