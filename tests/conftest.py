"""Test set-up. Triton kernels run in Triton's interpreter on CPU tensors unless a GPU run asks
otherwise (INPLACE_ABN_GPU_TESTS=1); the variable must be set before triton is first imported."""

import os

if os.environ.get("INPLACE_ABN_GPU_TESTS") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _compiled_backend_compiles():
    """A failed Inductor compilation makes the compiled backend fall back to eager with a warning;
    in the tests it is an error, or the compiled-backend tests would silently test eager."""
    yield
    from inplace_abn.backends import compiled

    if compiled.available():  # without a C++ compiler the fallback is the expected path
        assert not compiled._broken, f"the compiled backend fell back to eager: {compiled._broken}"


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a test of several seconds on two cores (real-model conversions); "
                                       "deselect with -m 'not slow'")
