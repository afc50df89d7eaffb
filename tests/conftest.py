"""Test setup shared by the whole suite.

Without CUDA, Triton kernels run on the CPU interpreter: ``TRITON_INTERPRET=1`` must be set before
triton is first imported, which is why it happens here, at collection time. Tests marked ``gpu`` skip
cleanly on machines without CUDA.
"""
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device; skipped without one")
    config.addinivalue_line("markers", "compile: AOT-compiles the Triton kernels for sm_90 with ptxas (no GPU needed)")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA (no GPU on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _no_tf32():
    """fp32 references are compared at 1e-5: TF32 matmuls would fail that honestly, so keep them off."""
    if HAS_CUDA:
        old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        yield
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old
    else:
        yield


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's tests on one torch thread (tiny shapes run fastest so), then restore the setting."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def lm_path(tmp_path_factory):
    """A tiny random Llama + tokenizer saved once per session; tests only read the directory."""
    from _tiny_lm import save_tiny_lm

    return save_tiny_lm(tmp_path_factory.mktemp("shared-tiny-lm"))
