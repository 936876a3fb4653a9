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


def test_a_stale_build_lock_does_not_hang_a_later_start():
    """A process killed inside torch's build step leaves the build directory's `lock` file behind;
    torch's own loader then waits for it forever. heron imports a built library under a lock of its
    own (released by the kernel when its holder dies), so a later start still gets the kernels."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    if load_kernel() is None:
        pytest.skip(f"the kernels did not build here: {kernel_error()}")
    stale = Path(load_kernel().__file__).parent / "lock"
    stale.touch()
    try:
        code = ("from heron.ops.cpu import load_kernel, kernel_error\n"
                "assert load_kernel() is not None, kernel_error()\n")
        done = subprocess.run([sys.executable, "-c", code], env=dict(os.environ), capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
    finally:
        stale.unlink(missing_ok=True)
