import os

import numpy as np
import pytest
import torch

import hetero

# PoCL compiles each kernel variant once per machine; keep hypothesis' budget modest so the
# suite stays well inside CI's time on 2 cores.
from hypothesis import HealthCheck, settings

settings.register_profile("hetero", max_examples=int(os.environ.get("HETERO_EXAMPLES", "25")), deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile("hetero")


def device_ids(backend=None):
    return [d.id for d in hetero.devices() if backend is None or d.backend == backend]


@pytest.fixture(scope="session")
def opencl_device():
    ids = device_ids("opencl")
    if not ids:
        pytest.skip(f"no OpenCL device present ({hetero.backend_problems().get('opencl', 'no platform')})")
    return ids[0]


def dyadic(rng: np.random.Generator, shape, levels: int = 9) -> torch.Tensor:
    """Values in {-2, -1.5, ..., 2}: every product and sum the relevancy step forms is exact in
    float32, so every backend computes identical scores and ties are real ties."""
    return torch.from_numpy((rng.integers(0, levels, size=shape) - levels // 2).astype(np.float32) / 2)
