"""The CPU kernels must build wherever a C++ compiler is installed: the kernel tests skip when
load_kernel() is None, so without this a compile error (code valid only on some CPUs, say)
would show up as skips instead of a failure."""
import shutil

import pytest

from heron.ops.cpu import kernel_error, load_kernel


def test_kernels_build_where_a_compiler_exists():
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler on this machine")
    assert load_kernel() is not None, f"heron's CPU kernels failed to build: {kernel_error()}"
    assert load_kernel().paged_part_supported()
