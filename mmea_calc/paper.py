"""The ``paper`` preset: what the MMEA authors' code trains besides the gates.

The authors' public code (github.com/CLaSLoVe/MMEA, a patched e3nn 0.4.4 + mace 0.3.5) selects
its trainable tensors by name: besides the gates on every ``o3.Linear`` it trains

* equivariant LoRA on the radial MLPs (``interactions.*.conv_tp_weights``) and on every tensor
  product with internal weights (MACE's ``skip_tp``; one ``A [mul1*mul2, r] @ B [r, mul_out]`` per
  weighted path, so each path's weight block is a rank-``r`` update: this keeps equivariance,
  since only path weights change);
* LoRA on the symmetric contractions' highest-order weights ``weights_max``
  (``A [elements, params, r] @ B [r, channels]``);
* the lower-order contraction ``weights`` in full, and the Bessel frequencies of the radial
  embedding (``bessel_weights``; a buffer in most bases).

Here each of those is an *update* of a base tensor held by the adapter (:class:`PaperParts`):
the base module is never modified. The updated tensors are substituted for the call
(:func:`torch.func.functional_call`) or, when one batch mixes adapters, the touched modules are
re-evaluated per adapter on their own rows (:func:`mixed_hooks`): edge-level parts (radial MLP,
Bessel) follow the structure of their edge's sender, node-level parts (skip TP, contraction)
their node's.

Differences from the authors, chosen on purpose: every update is zero at initialisation (their
``B`` is zero too, so their LoRA parts also start at the base; their gates do not), the LoRA
``A`` factors start with the root-mean-square of the tensor they update (theirs: 1 for the MLP
and TP, ``1/params`` for the contraction, which are the base tensors' own init scales), and
``alpha`` defaults to the rank (their 16 at rank 16).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from mmea_calc._deps import o3

__all__ = ["PARTS", "PaperParts", "PaperTensor", "mixed_hooks", "paper_tensors"]

#: The parts of the ``paper`` preset, in the order ``info`` reports them.
PARTS = ("radial_lora", "skip_tp_lora", "contraction_lora", "contraction_weights", "bessel")


@dataclass(frozen=True)
class PaperTensor:
    """One base tensor the ``paper`` preset updates.

    Attributes:
        name: the tensor's name in the base (``interactions.0.skip_tp.weight``).
        part: one of :data:`PARTS`.
        module: the name of the module whose forward reads it (re-evaluated in mixed batches).
        rows: ``"edge"`` or ``"node"``: what the first dimension of that module's inputs and
            output indexes.
    """

    name: str
    part: str
    module: str
    rows: str

    @property
    def local_name(self) -> str:
        """The tensor's name inside :attr:`module`."""
        return self.name[len(self.module) + 1 :] if self.module else self.name


def paper_tensors(base: torch.nn.Module) -> list[PaperTensor]:
    """The tensors of a MACE ``base`` that the ``paper`` preset updates, in module order."""
    found: list[PaperTensor] = []
    for name, module in base.named_modules():
        leaf = name.rpartition(".")[2]
        if leaf == "conv_tp_weights":  # the radial MLP (e3nn FullyConnectedNet or torch layers)
            for pname, param in module.named_parameters():
                if param.dim() == 2:
                    found.append(PaperTensor(f"{name}.{pname}", "radial_lora", name, "edge"))
        elif (
            isinstance(module, o3.TensorProduct)
            and module.internal_weights
            and module.weight_numel > 0
        ):
            found.append(PaperTensor(f"{name}.weight", "skip_tp_lora", name, "node"))
        elif isinstance(getattr(module, "weights_max", None), torch.nn.Parameter):
            found.append(PaperTensor(f"{name}.weights_max", "contraction_lora", name, "node"))
            for index, _ in enumerate(getattr(module, "weights", ())):
                found.append(
                    PaperTensor(f"{name}.weights.{index}", "contraction_weights", name, "node")
                )
        elif isinstance(getattr(module, "bessel_weights", None), torch.Tensor):
            found.append(PaperTensor(f"{name}.bessel_weights", "bessel", name, "edge"))
    return found


def _tensor(base: torch.nn.Module, name: str) -> torch.Tensor:
    module_name, _, attr = name.rpartition(".")
    return getattr(base.get_submodule(module_name), attr)


class _LowRank(torch.nn.Module):
    """``scaling * lora_A @ lora_B``; ``lora_B`` starts at zero (no change at init)."""

    def __init__(
        self, lead: tuple[int, ...], cols: int, rank: int, like: torch.Tensor, init: bool = True
    ) -> None:
        super().__init__()
        std = float(like.detach().pow(2).mean().sqrt()) or 1.0
        kwargs = {"dtype": like.dtype, "device": like.device}
        a = torch.randn(*lead, rank, **kwargs) * std if init else torch.zeros(*lead, rank, **kwargs)
        self.lora_A = torch.nn.Parameter(a)
        self.lora_B = torch.nn.Parameter(torch.zeros(rank, cols, **kwargs))

    def forward(self) -> torch.Tensor:
        return self.lora_A @ self.lora_B


class _Update(torch.nn.Module):
    """The change of one base tensor (same shape): low-rank factors or a full delta."""

    def __init__(self, spec: PaperTensor, tensor: torch.Tensor, module: Any, rank: int,
                 scaling: float, init: bool = True) -> None:  # fmt: skip
        super().__init__()
        self.scaling = scaling
        self.shape = tuple(tensor.shape)
        self.factors = torch.nn.ModuleList()
        self.delta: torch.nn.Parameter | None = None
        if spec.part == "radial_lora":  # a matrix
            self.factors.append(_LowRank((self.shape[0],), self.shape[1], rank, tensor, init))
        elif spec.part == "skip_tp_lora":  # one block [mul1 * mul2, mul_out] per weighted path
            offset = 0
            for ins in module.instructions:
                if not ins.has_weight:
                    continue
                size = math.prod(ins.path_shape)
                block = tensor.detach()[offset : offset + size]
                lead = ins.path_shape[0] * ins.path_shape[1]
                self.factors.append(_LowRank((lead,), ins.path_shape[2], rank, block, init))
                offset += size
        elif spec.part == "contraction_lora":  # [elements, params, channels]
            self.factors.append(_LowRank(self.shape[:-1], self.shape[-1], rank, tensor, init))
        else:  # contraction_weights, bessel: the whole tensor
            self.delta = torch.nn.Parameter(torch.zeros_like(tensor.detach()))

    def forward(self) -> torch.Tensor:
        if self.delta is not None:
            return self.delta
        blocks = [factor().reshape(-1) for factor in self.factors]
        flat = blocks[0] if len(blocks) == 1 else torch.cat(blocks)
        return self.scaling * flat.reshape(self.shape)


def _key(name: str) -> str:
    return name.replace(".", "-")  # ModuleDict keys cannot hold "."


class PaperParts(torch.nn.Module):
    """One adapter's ``paper`` parts: an update for every tensor of :func:`paper_tensors`.

    Args:
        base: the MACE base (read, never modified).
        rank: LoRA rank of the low-rank parts.
        scaling: ``alpha / rank`` of the low-rank parts.
        init_weights: ``False`` draws no random numbers (``lora_A`` zero too: to be loaded).

    Tensors are created with each base tensor's dtype and device, from the global RNG.
    """

    def __init__(
        self, base: torch.nn.Module, rank: int, scaling: float, init_weights: bool = True
    ) -> None:
        super().__init__()
        self.specs = {spec.name: spec for spec in paper_tensors(base)}
        self.updates = torch.nn.ModuleDict()
        for name, spec in self.specs.items():
            module = base.get_submodule(spec.module)
            tensor = _tensor(base, name)
            self.updates[_key(name)] = _Update(spec, tensor, module, rank, scaling, init_weights)

    def named_tensors(self) -> Iterator[tuple[str, torch.nn.Parameter]]:
        """``(base tensor name + "." + factor, tensor)``: the keys of the adapter file."""
        for name in self.specs:
            for pname, param in self.updates[_key(name)].named_parameters():
                yield f"{name}.{pname}", param

    def parameters_per_part(self) -> dict[str, int]:
        counts = dict.fromkeys(PARTS, 0)
        for name, spec in self.specs.items():
            counts[spec.part] += sum(p.numel() for p in self.updates[_key(name)].parameters())
        return counts

    def deltas(self) -> dict[str, torch.Tensor]:
        """``{base tensor name: change}``."""
        return {name: self.updates[_key(name)]() for name in self.specs}

    def substitutions(self, base: torch.nn.Module) -> dict[str, torch.Tensor]:
        """``{base tensor name: base tensor + change}`` (for :func:`torch.func.functional_call`
        on the whole base)."""
        return {name: _tensor(base, name) + delta for name, delta in self.deltas().items()}

    def merge_into(self, model: torch.nn.Module) -> None:
        """Add the changes to ``model``'s own tensors (a copy of the base: :meth:`freeze`)."""
        with torch.no_grad():
            for name, delta in self.deltas().items():
                _tensor(model, name).add_(delta.to(_tensor(model, name)))


def _reevaluate(
    busy: list[bool],
    per_slot: list[Callable[[], dict[str, torch.Tensor]] | None],
    rows: list[torch.Tensor],
    module: torch.nn.Module,
    args: tuple,
    kwargs: dict[str, Any],
    output: torch.Tensor,
) -> torch.Tensor | None:
    """A forward hook: the module's output on each slot's rows, recomputed with that slot's
    tensors (the base's output stays on the other rows)."""
    if busy[0]:  # the re-evaluation below calls the module (and so this hook) again
        return None
    out = output
    for substitutions, index in zip(per_slot, rows, strict=True):
        if substitutions is None or index.numel() == 0:
            continue
        sub_args = tuple(a.index_select(0, index) if torch.is_tensor(a) else a for a in args)
        sub_kwargs = {
            k: v.index_select(0, index) if torch.is_tensor(v) else v for k, v in kwargs.items()
        }
        busy[0] = True
        try:
            values = torch.func.functional_call(module, substitutions(), sub_args, sub_kwargs)
        finally:
            busy[0] = False
        out = out.index_copy(0, index, values)
    return out


def mixed_hooks(
    base: torch.nn.Module,
    parts: list[PaperParts | None],
    node_rows: list[torch.Tensor],
    edge_rows: list[torch.Tensor],
) -> list[Any]:
    """Register forward hooks on ``base`` that apply each slot's ``paper`` parts (``None``: a
    gates-only adapter) to that slot's node or edge rows; returns the handles (remove them)."""
    modules: dict[str, str] = {}
    for slot in parts:
        for spec in slot.specs.values() if slot is not None else ():
            modules[spec.module] = spec.rows
    handles = []
    for module_name, kind in modules.items():
        module = base.get_submodule(module_name)
        per_slot = []
        for slot in parts:
            names = [] if slot is None else [
                n for n, s in slot.specs.items() if s.module == module_name
            ]  # fmt: skip
            per_slot.append(_local_substitutions(slot, base, module_name, names) if names else None)
        rows = node_rows if kind == "node" else edge_rows
        hook = functools.partial(_reevaluate, [False], per_slot, rows)
        handles.append(module.register_forward_hook(hook, with_kwargs=True))
    return handles


def _local_substitutions(
    parts: PaperParts | None, base: torch.nn.Module, module_name: str, names: list[str]
) -> Callable[[], dict[str, torch.Tensor]]:
    def compute() -> dict[str, torch.Tensor]:
        assert parts is not None
        return {
            parts.specs[n].local_name: _tensor(base, n) + parts.updates[_key(n)]() for n in names
        }

    return compute
