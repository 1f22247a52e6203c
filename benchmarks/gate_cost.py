"""Where an adapter's per-step time goes inside the model (issue 23): the gates' forward, their
backward, the hooks, and how much slower the same gate code runs inside a step than alone.

SPICE-small base (``../shared/assets``; skips with a message when absent) with the calibrated
rank-16 ``water`` adapter of ``benchmarks/speed.py``, one water box, ``AdaptedModel`` called
directly (no calculator, no graph building). Variants, timed in interleaved rounds (the order
rotates each round), with forces and stress (an MD step) and forward only:

* ``base``: the bare base (no adapter routed);
* ``adapted``: the adapter, as the calculator runs it;
* ``hooks``: the hooks and routing, the gates replaced by ``out`` unchanged;
* ``gates_no_grad``: the gates computed without recording autograd (constants for the
  backward; the modulation itself is recorded): what the gates' forward costs without the
  bookkeeping their backward needs.

Then the gates' forward alone: summed inside a step (timed around each gated linear's
modulation), on the same inputs in a tight loop, and in the same loop with 16 MB of other data
touched between two gates (as the base's tensors do in a step): the cost of running many small
operations with cold caches.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/gate_cost.py --molecules 10 67 --dtypes float64,float32 \\
        --rounds 100 --out benchmarks/results/gate_cost.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("base", "adapted", "hooks", "gates_no_grad")


def _speed():
    """``benchmarks/speed.py`` (registered as the tests load it)."""
    name = "_bench_speed"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("speed.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def _variants(adapter: str) -> dict:
    """``MMEALayer.forward`` replacements per variant (``None``: the layer's own)."""
    import torch

    from mmea_calc.adapter import MMEALayer, modulate

    def hooks_only(self, x, out, route):
        return out

    def gates_no_grad(self, x, out, route):
        gate = self.gates[adapter]
        with torch.no_grad():
            scale, shift, weight, _ = gate.terms(gate.bottleneck(self.scalars(x)))
        return modulate(out, scale, shift, weight, self.layout.blocks)

    return {
        "base": None,
        "adapted": MMEALayer.forward,
        "hooks": hooks_only,
        "gates_no_grad": gates_no_grad,
    }


def measure(model, data, adapter: str, rounds: int, forces: bool) -> dict:
    """Median ms per call of each variant and the median per-round ratio to ``base``."""
    from mmea_calc.adapter import MMEALayer

    own = MMEALayer.forward
    variants = _variants(adapter)

    def call(variant):
        model.set_adapter(None if variant == "base" else adapter)
        if variants[variant] is not None:
            MMEALayer.forward = variants[variant]
        try:
            return model(dict(data), compute_stress=forces, compute_force=forces, training=False)
        finally:
            MMEALayer.forward = own

    order = list(VARIANTS)
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for i in range(rounds + 3):
        order = order[1:] + order[:1]
        for variant in order:
            start = time.perf_counter()
            call(variant)
            if i >= 3:  # warm-up
                times[variant].append(time.perf_counter() - start)
    base = times["base"]
    return {
        v: {
            "ms": 1e3 * statistics.median(times[v]),
            "ratio_to_base": statistics.median(t / b for t, b in zip(times[v], base, strict=True)),
        }
        for v in VARIANTS
    }


def gate_forward(model, data, adapter: str, steps: int) -> dict:
    """The gates' forward per step (ms): inside the step, alone, and alone with 16 MB of other
    data touched between two gates."""
    import torch

    from mmea_calc.adapter import MMEALayer

    own = MMEALayer.forward
    spent = [0.0]
    captured: list = []

    def timed(self, x, out, route):
        start = time.perf_counter()
        result = own(self, x, out, route)
        spent[0] += time.perf_counter() - start
        return result

    def capture(self, x, out, route):
        captured.append((self, x, out, route))
        return own(self, x, out, route)

    model.set_adapter(adapter)
    try:
        MMEALayer.forward = timed
        for _ in range(3):
            model(dict(data), compute_stress=True, training=False)
        spent[0] = 0.0
        for _ in range(steps):
            model(dict(data), compute_stress=True, training=False)
        in_step = 1e3 * spent[0] / steps
        MMEALayer.forward = capture
        model(dict(data), compute_stress=True, training=False)
    finally:
        MMEALayer.forward = own
    other = torch.zeros(2 * 2**20, dtype=torch.float64)  # 16 MB

    def alone(touch: bool) -> float:
        total = 0.0
        for layer, x, out, route in captured:
            if touch:
                other.add_(1.0)
            start = time.perf_counter()
            own(layer, x, out, route)
            total += time.perf_counter() - start
        return total

    for _ in range(10):
        alone(False)
    hot = 1e3 * statistics.median(alone(False) for _ in range(steps))
    cold = 1e3 * statistics.median(alone(True) for _ in range(steps))
    return {
        "gated_linears": len(captured),
        "in_step_ms": in_step,
        "alone_ms": hot,
        "alone_16MB_between_ms": cold,
    }


def run(args) -> dict:
    import torch

    from mmea_calc import AdaptedModel, load_base
    from mmea_calc.data import atoms_to_graph, collate

    speed = _speed()
    torch.set_num_threads(1)
    results: dict = {
        "command": "python benchmarks/gate_cost.py " + shlex.join(args.argv),
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "threads": 1,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "mmea_calc": speed._code_version(),
            "malloc": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")},
        },
        "rounds": args.rounds,
        "rows": [],
    }
    with tempfile.TemporaryDirectory(prefix="mmea-gate-cost-") as tmp:
        ns = argparse.Namespace(preset="gates", adapter_std=args.adapter_std)
        speed._spice_adapters(ns, Path(tmp))  # saves calibrated "water" and "organic"
        for dtype in args.dtypes:
            model = AdaptedModel(load_base(speed.MODEL, dtype=dtype))
            model.load_adapter(Path(tmp) / "water", "water")
            for n in args.molecules:
                atoms = speed.water_box(n, seed=5)
                data = collate([atoms_to_graph(atoms, model.base_info)], dtype=model.dtype)
                row = {"dtype": dtype, "atoms": len(atoms)}
                row["step"] = measure(model, data, "water", args.rounds, forces=True)
                row["forward_only"] = measure(model, data, "water", args.rounds, forces=False)
                row["gate_forward"] = gate_forward(model, data, "water", args.rounds)
                results["rows"].append(row)
                step, fwd = row["step"], row["gate_forward"]
                print(
                    f"{dtype} {len(atoms)} atoms: base {step['base']['ms']:.2f} ms; adapted "
                    f"x{step['adapted']['ratio_to_base']:.3f}, hooks only "
                    f"x{step['hooks']['ratio_to_base']:.3f}, gates without grad "
                    f"x{step['gates_no_grad']['ratio_to_base']:.3f}; gates' forward "
                    f"{fwd['in_step_ms']:.2f} ms in a step, {fwd['alone_ms']:.2f} alone, "
                    f"{fwd['alone_16MB_between_ms']:.2f} alone with 16 MB touched between",
                    file=sys.stderr,
                    flush=True,
                )
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--molecules", type=int, nargs="+", default=[10, 67])
    parser.add_argument("--dtypes", default="float64,float32")
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--adapter-std", type=float, default=0.05)
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/gate_cost.json"))
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.dtypes = [d for d in args.dtypes.split(",") if d]
    bad = set(args.dtypes) - {"float64", "float32"}
    if bad:
        parser.error(f"unknown dtypes {sorted(bad)}; valid: float64, float32")
    if not _speed().MODEL.exists():
        print(f"skipping: {_speed().MODEL} is absent (see ../shared/assets)", file=sys.stderr)
        return 0
    results = run(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(results, indent=1))
    os.replace(tmp, out)
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
