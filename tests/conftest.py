"""Shared pytest configuration for the adam_jax test suite.

* Eight host CPU devices (``XLA_FLAGS``) so that sharding tests can build a mesh; this must be
  set before jax is imported anywhere, hence at the very top of this file.
* XLA:CPU's older fusion code generator (``--xla_cpu_use_fusion_emitters=false``; jaxlib 0.11
  has only the new one and aborts on the flag): the suite is compile-bound (thousands of small
  programs run for a few steps), and the default emitters take about 2.3 times as long to
  compile them. Both generators are XLA:CPU's, for the same
  HLO; a program's float results may differ between them in the last bits, which no test
  depends on: the references are compared with tolerances, and the bit-for-bit tests compare
  programs compiled alike. With it, 128-bit vectors (``--xla_cpu_prefer_vector_width=128``;
  the default, 256, is AVX's): the older generator's vectorized reduction of some shapes
  compiles for seconds at 256 bits (``jnp.sum`` of a 32 x 96 array, a batch's loss: 5.8 s
  against 0.26 s; ``tests/test_memory_combinations.py`` and ``test_quantization.py`` 112 s
  against 49 s). The width changes the order of a reduction's partial sums, not what is
  computed. The example programs that the tests start as processes inherit
  it; ``XLA_FLAGS`` set by hand wins.
* LLVM at ``-O1`` (``--xla_backend_optimization_level=1``) and one LLVM module a program
  (``--xla_cpu_parallel_codegen_split_count=1``; XLA otherwise splits each into parts that it
  compiles on threads, and the xdist workers already keep both cores busy): together they take
  ``tests/test_variants_compat.py`` from 82 s to 50 s. One module gives the same bits as the
  split (44 trainings of ``tests/test_zero1.py`` compared); ``-O1`` changes the last bits of
  some results against ``-O2``, like the emitters above, and keeps every relation the tests
  check between programs compiled alike. ``-O0`` does not: ZeRO-1's 8-bit and SPAM steps then
  round differently from the replicated state's, so it is not used.
* One thread for OpenBLAS (``OPENBLAS_NUM_THREADS=1``), which runs jaxlib's CPU LAPACK kernels
  (``eigh``, QR, Cholesky): its threads spin while they wait, so with the xdist workers and the
  programs the tests start already on every core, a 256 x 256 QR took 1 s where one thread
  takes 3 ms (SOAP's refreshes, on the 2-core machine under load).
* One compilation per distinct program for the whole run: JAX's persistent compilation cache
  in a temporary folder that the xdist workers and the programs the tests start share (many
  tests build the same step: a trainer per test, a process per command-line test). An
  executable is keyed by its whole program, compile options and versions, so a cached one is
  the one a compilation would give; ``JAX_COMPILATION_CACHE_DIR`` set by hand wins.
* float64 is *not* enabled globally (``tests/mnist`` must run with jax's float32 defaults).
  Tests that need it use the ``x64`` fixture, which enables it with the thread-local
  ``jax.enable_x64`` context manager for the duration of one test only, or use that context
  manager directly (hypothesis tests, which cannot take function-scoped fixtures). Every test
  is checked for leaving it switched on.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import tempfile

FAST_COMPILE_FLAGS = (
    " --xla_cpu_use_fusion_emitters=false --xla_cpu_prefer_vector_width=128"
    " --xla_backend_optimization_level=1 --xla_cpu_parallel_codegen_split_count=1"
    if tuple(int(part) for part in importlib.metadata.version("jaxlib").split(".")[:2]) < (0, 11)
    else ""
)
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8" + FAST_COMPILE_FLAGS)
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
# The first process to import this file (xdist's controller, which starts the workers after
# it) makes the folder; the workers and the subprocesses inherit the variables.
CREATED_CACHE_DIR = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    CREATED_CACHE_DIR = tempfile.mkdtemp(prefix="adam_jax_tests_compilation_cache_")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = CREATED_CACHE_DIR
    # Every program, however quick to compile: most of the suite's are small.
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"

from collections.abc import Iterator  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture
def x64() -> Iterator[None]:
    """Enables float64 in jax for one test, restoring the previous setting afterwards."""
    with jax.enable_x64(True):
        yield


@pytest.fixture(autouse=True)
def _no_x64_leak() -> Iterator[None]:
    """Fails loudly if any test leaves float64 switched on for the tests that follow."""
    before = bool(jax.config.jax_enable_x64)
    yield
    after = bool(jax.config.jax_enable_x64)
    if after != before:
        jax.config.update("jax_enable_x64", before)
        pytest.fail("a test changed jax_enable_x64 without restoring it")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Runs the tests marked slow first. xdist hands the tests out in this order, so the
    workers finish together, not one of them alone on a minute-long test at the end."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def pytest_unconfigure(config: pytest.Config) -> None:
    """Removes the compilation cache that this process made (the controller's, once the
    workers are done)."""
    del config
    if CREATED_CACHE_DIR is not None:
        shutil.rmtree(CREATED_CACHE_DIR, ignore_errors=True)
