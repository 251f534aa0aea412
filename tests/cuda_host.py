"""A pytest plugin that runs tests as a CUDA host sees them, on a machine without a GPU:

    PYTHONPATH=tests python -m pytest -p cuda_host tests/test_sampler.py tests/test_kernels.py ...

On a GPU machine two things differ before any test runs: torch.cuda.is_available() is True, so test modules add
their cuda cases and code takes its CUDA branches, and Triton's interpreter is off, so the kernels are compiled for
the GPU when imported and cannot run on CPU tensors. Four tests once failed for exactly that on every GPU machine
while the CPU suite passed. Here both are set up before conftest.py and the test modules are imported (-p loads this
first): is_available answers True and TRITON_INTERPRET is unset.

A test that then fails only because there is no GPU behind the pretence (creating a CUDA tensor, asking for a device)
is reported as skipped, "needs a real GPU: ...", and counted; every other failure stays a failure, so the exit status
is non-zero exactly when a test would fail on a GPU machine for a reason other than the GPU itself. Used by
scripts/gpu_checks.sh --cpu (its cuda-host step) and tests/test_gpu_check.py.
"""
import os
import re

import pytest
import torch

os.environ.pop("TRITON_INTERPRET", None)
torch.cuda.is_available = lambda: True

# What touching CUDA says on a machine without it (a CPU build of torch, or no driver): the test needed a real GPU
NO_GPU = re.compile(r"Torch not compiled with CUDA enabled|Found no NVIDIA driver|no CUDA GPUs are available|"
                    r"CUDA driver initialization failed|invalid device ordinal|No CUDA GPUs are available")


def pytest_report_header(config):
    return "cuda_host: torch.cuda.is_available() patched to True, TRITON_INTERPRET unset (a CUDA host's view)"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.failed and call.excinfo is not None and NO_GPU.search(str(call.excinfo.value)):
        report.outcome = "skipped"
        reason = f"needs a real GPU: {str(call.excinfo.value).splitlines()[0]}"
        report.longrepr = (str(item.path), item.location[1] or 0, reason)
    return report
