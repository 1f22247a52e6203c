from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

warnings.filterwarnings("ignore", message=".*TorchScript type system.*")

from mmea_calc.testing import build_tiny_mace  # noqa: E402

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
SPICE_MODEL = SHARED / "assets" / "models" / "mace-spice-small.model"

# (hidden irreps, residual, scale_shift): with and without l > 0, both interaction and model kinds
MODEL_KINDS = {
    "l1-residual-scaleshift": ("8x0e+8x1o", True, True),
    "scalar-plain-mace": ("8x0e", False, False),
}


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """One torch thread for the whole run: tiny models gain nothing from threads and lose a lot
    on a busy 2-core machine (the NVE test took 261 s with 2 threads, 19 s with 1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def default_dtype_restored():
    """Every test leaves torch's process-wide default dtype as it found it (mace's own
    ``MACECalculator(default_dtype=...)`` sets it for the whole process)."""
    dtype = torch.get_default_dtype()
    yield
    torch.set_default_dtype(dtype)


@pytest.fixture(params=sorted(MODEL_KINDS))
def tiny_kind(request):
    """(hidden irreps, residual, scale_shift) of one tiny model kind."""
    return MODEL_KINDS[request.param]


@pytest.fixture
def tiny_base(tiny_kind):
    hidden, residual, scale_shift = tiny_kind
    return build_tiny_mace(hidden, residual=residual, scale_shift=scale_shift)


@pytest.fixture
def spice_model_path():
    if not SPICE_MODEL.is_file():
        pytest.skip(f"shared asset {SPICE_MODEL} is absent (only on the project's machines)")
    return SPICE_MODEL


@pytest.fixture(scope="session")
def demo_assets(tmp_path_factory):
    """Tiny stand-ins for the embedded assets (base/, adapters/{water,ethanol}/, data/)."""
    from mmea_calc.testing import write_demo_assets

    return write_demo_assets(tmp_path_factory.mktemp("demo-assets"), n_frames=4, n_water=8)
