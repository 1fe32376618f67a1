"""Float32 precision of the modern Adam family against the reference packages' own float32.

For every variant, reference package and float32 case of ``tests/variants.py``: the float32
trajectory of adam_jax and of the package (PyTorch), both fed the float64 gradient rounded to
float32, against the float64 reference of the published rule; the error is the largest
difference over all params and steps divided by the largest magnitude (as
``tests/test_variants_reference.py`` measures it). Seed offset 0 is the test's seed; the others
show how much of a difference between the two is rounding noise. Packages that are not
installed are left out. Prints markdown::

    python -m benchmarks.variants_precision --seeds 6
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import jax

TESTS = Path(__file__).resolve().parent.parent / "tests"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=6, help="seeds per row (the test's first)")
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error(f"--seeds must be an integer >= 1, got {args.seeds}")
    jax.config.update("jax_enable_x64", True)
    sys.path.insert(0, str(TESTS))  # the references and the table of variants live there
    import jax.numpy as jnp
    import numpy as np
    import pytest
    import test_variants_reference as tests
    from references.common import make_problem, run_jax, run_reference
    from variants import VARIANTS

    print("| variant | package | case | test seed: adam_jax | package | "
          f"ours / theirs over {args.seeds} seeds: median | max | ours <= theirs |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for variant in VARIANTS:
        for package in variant.packages:
            for case in variant.float32_cases:
                options = variant.cases[case]
                errors = []
                for offset in range(args.seeds):
                    seed = tests._seed(variant, package, case, "f32") + offset
                    problem = make_problem(seed=seed, steps=tests.STEPS)
                    expected, _ = run_reference(variant.reference(**options), problem, tests.STEPS)
                    try:
                        theirs = tests._package_run(variant, package, case, problem, "float32")
                    except pytest.skip.Exception:
                        break  # not installed, or the package lacks this case's options
                    ours, _, _ = run_jax(
                        variant.make(**options),
                        problem,
                        tests.STEPS,
                        dtype=jnp.float32,
                        exact_grads=True,
                    )
                    ours = {k: v.astype(np.float64) for k, v in ours.items()}
                    errors.append(
                        (
                            tests.relative_error(ours, expected),
                            tests.relative_error(theirs, expected),
                        )
                    )
                if not errors:
                    continue
                ratios = [ours / theirs for ours, theirs in errors]
                wins = sum(ratio <= 1 for ratio in ratios)
                print(
                    f"| `{variant.name}` | {package} | {case} | {errors[0][0]:.2e} | "
                    f"{errors[0][1]:.2e} | {statistics.median(ratios):.2f} | {max(ratios):.2f} "
                    f"| {wins} of {len(ratios)} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
