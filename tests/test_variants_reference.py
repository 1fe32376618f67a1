"""Every variant and every option against its float64 reference and its reference packages.

The references (``tests/references/``) are written from the papers and the authors' code; the
packages are the PyTorch implementations on PyPI (skipped where they are not installed, failed
where they are installed but broken). For each row of ``tests/variants.py`` and each of its
cases, 300 steps (or the row's ``steps``) of a noisy, slightly non-quadratic problem:

* in float64, the trajectory and every update equal the reference's to 1e-8 relative (the
  largest difference over the largest value of each leaf), real and, where the rule allows,
  complex params;
* in float64 the trajectory equals each package's, for the options it can express;
* in float32, the trajectory is no further from the float64 reference than the package's own
  float32 run (both compared at their worst step).
"""

from __future__ import annotations

import zlib
from typing import Any

import jax.numpy as jnp
import numpy as np
import pytest
from references.common import make_problem, run_jax, run_reference, run_torch
from variants import CASES, VARIANTS, Variant

PACKAGE_CASES = [
    (variant, package, case)
    for variant in VARIANTS
    for package in variant.packages
    for case in variant.cases
]


def _id(*parts: Any) -> str:
    return "-".join(str(part) for part in parts)


def _seed(*parts: Any) -> int:
    return zlib.crc32(_id(*parts).encode()) % 1000


def relative_error(actual: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> float:
    """The largest difference over the largest magnitude, the worst leaf."""
    return max(
        float(np.max(np.abs(actual[k] - expected[k])))
        / max(float(np.max(np.abs(expected[k]))), 1e-300)
        for k in expected
    )


@pytest.mark.parametrize(("variant", "case"), CASES, ids=[_id(v, c) for v, c in CASES])
def test_against_float64_reference(variant: Variant, case: str, x64: None) -> None:
    options = variant.cases[case]
    steps = variant.steps
    problem = make_problem(seed=_seed(variant, case), steps=steps)
    expected_traj, expected_updates = run_reference(variant.reference(**options), problem, steps)
    traj, updates, _ = run_jax(variant.make(**options), problem, steps, dtype=np.float64)
    assert relative_error(traj, expected_traj) < 1e-8
    assert relative_error(updates, expected_updates) < 1e-8


@pytest.mark.parametrize("variant", [v for v in VARIANTS if v.complex_params], ids=str)
def test_complex_params_against_float64_reference(variant: Variant, x64: None) -> None:
    """Complex params: second moments of ``|g|^2`` (real), the rest complex arithmetic."""
    problem = make_problem(seed=_seed(variant, "complex"), steps=100, complex_params=True)
    options = variant.cases.get("decay_mask", {})
    expected, _ = run_reference(variant.reference(**options), problem, 100)
    traj, _, _ = run_jax(variant.make(**options), problem, 100, dtype=np.complex128)
    assert relative_error(traj, expected) < 1e-8


def _package_run(variant: Variant, package: str, case: str, problem: Any, dtype: str) -> Any:
    adapter = variant.packages[package]
    options = variant.package_options(**variant.cases[case])
    try:
        return run_torch(lambda params: adapter(params, **options), problem, variant.steps, dtype)
    except NotImplementedError as error:
        pytest.skip(f"{package}: {error}")


@pytest.mark.parametrize(
    ("variant", "package", "case"), PACKAGE_CASES, ids=[_id(*c) for c in PACKAGE_CASES]
)
def test_against_reference_package(variant: Variant, package: str, case: str, x64: None) -> None:
    options = variant.cases[case]
    problem = make_problem(seed=_seed(variant, package, case), steps=variant.steps)
    expected = _package_run(variant, package, case, problem, "float64")
    traj, _, _ = run_jax(variant.make(**options), problem, variant.steps, dtype=np.float64)
    assert relative_error(traj, expected) < 1e-8


@pytest.mark.parametrize(
    ("variant", "package"),
    [(v, p) for v in VARIANTS for p in v.packages],
    ids=[_id(v, p) for v in VARIANTS for p in v.packages],
)
def test_float32_no_worse_than_reference_package(variant: Variant, package: str, x64: None) -> None:
    """Our float32 run's distance to the float64 reference is at most the package's float32
    run's (on the default options, and with weight decay where the variant has it), both fed
    the float64 gradient rounded to float32."""
    for case in variant.float32_cases:
        options = variant.cases[case]
        steps = variant.steps
        problem = make_problem(seed=_seed(variant, package, case, "f32"), steps=steps)
        expected, _ = run_reference(variant.reference(**options), problem, steps)
        theirs = _package_run(variant, package, case, problem, "float32")
        ours, _, _ = run_jax(
            variant.make(**options), problem, steps, dtype=jnp.float32, exact_grads=True
        )
        ours = {k: v.astype(np.float64) for k, v in ours.items()}
        assert relative_error(ours, expected) <= relative_error(theirs, expected), case
