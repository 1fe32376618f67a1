"""docs/adding_a_variant.md, followed as written: a new optimizer, AdaMod (a moment of its own
and the learning rate inside it), added to a copy of the repository as the guide says: its
module, its reference with its test row, its row in "Which Adam?" and ``python docs/family.py``;
no test file edited. It reaches the registry, ``adam_jax``'s names, the API page and README's
table, and the whole suite's per-variant tests (the float64 reference, optax's wrappers,
sharding, ZeRO-1 on a mesh of its own, export, low precision, the hyperparameters, the
registry's checks) run on it and pass."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent

# The module, written with adam_jax.rules alone.
MODULE = r'''
"""AdaMod: Adam's step sizes bounded by their running average (a test's optimizer)."""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from adam_jax import rules


class ScaleByAdamodState(NamedTuple):
    """AdaMod's state: the step count, Adam's moments ``mu`` and ``nu``, and ``s``, the
    running average of the step sizes."""

    count: jax.Array  # type: ignore[assignment]  # a field, as optax's states have
    mu: optax.Updates
    nu: optax.Updates
    s: optax.Updates


class AdamodScalars(NamedTuple):
    """One step's scalars: Adam's averages' weights and corrections, the step sizes' average's
    weight, and the learning rate."""

    w1: Any
    w2: Any
    c1: Any
    c2: Any
    w3: Any
    lr: jax.Array


@dataclasses.dataclass(frozen=True, kw_only=True)
class AdamodRule(rules.MomentRule):
    """AdaMod's moment rule: see :func:`scale_by_adamod` (``learning_rate=None``: a unit rate,
    the direction) and :func:`adamod` (a learning rate: the whole step)."""

    learning_rate: Any = rules.learning_rate()
    b1: Any = rules.b1()
    b2: Any = rules.b2()
    b3: Any = rules.hyperparam(
        0.999, "decay of the step sizes' average, in [0, 1).", rules.check_decay
    )
    eps: Any = rules.eps()
    mu_dtype: Any = rules.mu_dtype()
    nu_dtype: Any = rules.hyperparam(
        None, "storage of the second moment and of the step sizes' average, as ``mu_dtype``."
    )

    state_type = ScaleByAdamodState

    def moments(self) -> tuple[rules.Moment, ...]:
        return (
            rules.Moment("mu", self.mu_dtype),
            rules.second_moment(self.nu_dtype),
            rules.second_moment(self.nu_dtype, "s"),
        )

    def scalars(self, fields: dict[str, Any], dtype: Any) -> AdamodScalars:
        t = optax.safe_increment(fields["count"])
        w1, c1 = rules.moving_average_terms(self.b1, t, dtype)
        w2, c2 = rules.moving_average_terms(self.b2, t, dtype)
        w3, _ = rules.moving_average_terms(self.b3, t, dtype)
        return AdamodScalars(w1, w2, c1, c2, w3, self.rate(fields, dtype))

    def update(
        self,
        g: jax.Array,
        moments: dict[str, jax.Array],
        scalars: AdamodScalars,
        leaf: rules.Leaf,
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        d = scalars
        mu = rules.moving_average(moments["mu"], g, d.w1)
        nu = rules.moving_average(moments["nu"], rules.abs_sq(g), d.w2)
        size = d.lr / (jnp.sqrt(leaf.settle("nu", nu) / d.c2) + self.eps)  # the rate inside
        s = rules.moving_average(moments["s"], size, d.w3)
        direction = jnp.minimum(size, leaf.settle("s", s)) * (leaf.settle("mu", mu) / d.c1)
        new = {"mu": mu, "nu": nu, "s": s}
        # The transformation's update is the direction; the optimizer's the whole step.
        return (direction if self.learning_rate is None else -direction), new


def scale_by_adamod(
    b1: float | jax.Array = 0.9,
    b2: float | jax.Array = 0.999,
    b3: float | jax.Array = 0.999,
    eps: float | jax.Array = 1e-8,
    *,
    mu_dtype: Any = None,
    nu_dtype: Any = None,
) -> optax.GradientTransformation:
    r"""Rescales gradients by AdaMod's bounded step sizes, at a unit rate.

    .. math::
        \eta_t = \frac{1}{\sqrt{\hat v_t} + \epsilon}, \quad
        s_t = \beta_3 s_{t-1} + (1-\beta_3) \eta_t, \quad u_t = \min(\eta_t, s_t) \hat m_t.

    Args:
      b1: decay of the first moment, in [0, 1).
      b2: decay of the second moment, in [0, 1).
      b3: decay of the step sizes' average, in [0, 1).
      eps: added to the denominator outside the square root, >= 0.
      mu_dtype: storage of the first moment (``None``: the params' dtype; a dtype; or a
        :class:`adam_jax.MomentStorage`).
      nu_dtype: storage of the second moment and of the step sizes' average, as ``mu_dtype``.

    Returns:
      An ``optax.GradientTransformation`` with state ``ScaleByAdamodState``.
    """
    return rules.scale_by_rule(
        AdamodRule(b1=b1, b2=b2, b3=b3, eps=eps, mu_dtype=mu_dtype, nu_dtype=nu_dtype)
    )


def adamod(
    learning_rate: optax.ScalarOrSchedule,
    b1: float | jax.Array = 0.9,
    b2: float | jax.Array = 0.999,
    b3: float | jax.Array = 0.999,
    eps: float | jax.Array = 1e-8,
    *,
    mu_dtype: Any = None,
    nu_dtype: Any = None,
    maximize: bool = False,
) -> optax.GradientTransformation:
    r"""AdaMod (Ding, Ren, Luo and Sun, 2019): Adam whose step sizes, the rate included, are
    bounded by their running average.

    Args:
      learning_rate: a constant >= 0 or a schedule of the 0-based step.
      b1: decay of the first moment, in [0, 1).
      b2: decay of the second moment, in [0, 1).
      b3: decay of the step sizes' average, in [0, 1).
      eps: added to the denominator outside the square root, >= 0.
      mu_dtype: storage of the first moment (``None``: the params' dtype; a dtype; or a
        :class:`adam_jax.MomentStorage`).
      nu_dtype: storage of the second moment and of the step sizes' average, as ``mu_dtype``.
      maximize: ascend the objective instead of descending (PyTorch's ``maximize``).

    Returns:
      An ``optax.GradientTransformation`` with state ``ScaleByAdamodState`` (in a chain after
      ``optax.scale(-1)`` with ``maximize=True``).

    References:
      Ding, Ren, Luo and Sun, `An Adaptive and Momental Bound Method for Stochastic Learning
      <https://arxiv.org/abs/1910.12249>`_, 2019.
    """
    rule = AdamodRule(
        learning_rate=learning_rate,
        b1=b1,
        b2=b2,
        b3=b3,
        eps=eps,
        mu_dtype=mu_dtype,
        nu_dtype=nu_dtype,
    )
    return optax.chain(*rules.ascent(maximize), rules.scale_by_rule(rule))


REGISTRY_ROWS = (
    rules.OptimizerInfo(
        name="adamod",
        alias=adamod,
        group="variant",
        summary="Adam's step sizes bounded by their running average",
        paper=rules.Paper(
            authors="Ding, Ren, Luo and Sun",
            title="An Adaptive and Momental Bound Method for Stochastic Learning",
            url="https://arxiv.org/abs/1910.12249",
            venue="2019",
        ),
        transformation=scale_by_adamod,
        rule=AdamodRule,
        companions=("ScaleByAdamodState",),
    ),
)
'''

# The reference, in float64 NumPy, ending with its test row.
REFERENCE = r'''
"""AdaMod in float64 (Ding, Ren, Luo and Sun, 2019, Algorithm 1), a test's optimizer."""

from __future__ import annotations

import numpy as np
from variant_spec import Variant, lr_schedule

from references.common import _abs_sq, as_schedule


class RefAdamod:
    def __init__(self, learning_rate, b1=0.9, b2=0.999, b3=0.999, eps=1e-8, maximize=False):
        self.lr, self.b1, self.b2, self.b3 = as_schedule(learning_rate), b1, b2, b3
        self.eps, self.sign = eps, -1.0 if maximize else 1.0

    def init(self, params):
        self.t = 0
        self.m = [np.zeros(np.shape(p), np.result_type(p, np.float64)) for p in params]
        self.v = [np.zeros(np.shape(p)) for p in params]
        self.s = [np.zeros(np.shape(p)) for p in params]

    def update(self, grads, params):
        lr = self.lr(self.t)
        self.t += 1
        updates = []
        for i, g in enumerate(grads):
            g = self.sign * np.asarray(g)
            self.m[i] = self.b1 * self.m[i] + (1 - self.b1) * g
            self.v[i] = self.b2 * self.v[i] + (1 - self.b2) * _abs_sq(g)
            m_hat = self.m[i] / (1 - self.b1**self.t)
            eta = lr / (np.sqrt(self.v[i] / (1 - self.b2**self.t)) + self.eps)
            self.s[i] = self.b3 * self.s[i] + (1 - self.b3) * eta
            updates.append(-np.minimum(eta, self.s[i]) * m_hat)
        return updates


TESTS = (
    Variant(
        name="adamod",
        reference_class=RefAdamod,
        learning_rate=1e-2,
        cases={
            "default": {},
            "hyperparams": {"b1": 0.8, "b2": 0.99, "b3": 0.9, "eps": 1e-6},
            "schedule": {"learning_rate": lr_schedule},
            "maximize": {"maximize": True},
        },
        float32_cases=("default",),
        hyperparams={"learning_rate": 1e-2, "b1": 0.9, "b3": 0.999},
        bad=(("b3", 1.5, "[0, 1)"), ("eps", -1.0, ">= 0")),
        step_proportional_to_rate=False,  # the rate is inside the average s
        # Its ZeRO-1 run on its mesh ends 2.3e-6 from the single-device run at one element of
        # w1 in float32 (the minimum's branch, decided by rounding): compared in float64.
        zero1_float64_single_device=True,
    ),
)
'''

# Its row in "Which Adam?" (the prose the guide asks for besides), in the registry's order.
WHICH_ADAM_ROW = (
    r"| `adamod` | $\min(\eta_t, s_t)\,\hat m_t$, $s_t$ the running average of the step sizes "
    r"$\eta_t$ | 12 (3.03) | `b3` | Adam without its large early steps |"
)

# The test modules whose tests are parametrized by variant (their ids name it): run on the
# copy for the new optimizer alone. tests/test_registry.py runs whole (every check of the
# registry against the docs, the tests' table and the modules).
PER_VARIANT_TESTS = (
    "tests/test_variants_reference.py",
    "tests/test_variants_compat.py",
    "tests/test_hyperparams.py",
    "tests/test_inject_hyperparams.py",
    "tests/test_sharded_params.py",
    "tests/test_zero1.py",
    "tests/test_export.py",
    "tests/test_low_precision.py",
)


def _copy(copy: Path) -> None:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache")
    for folder in ("adam_jax", "docs", "tests", "benchmarks", "examples"):
        shutil.copytree(REPO_ROOT / folder, copy / folder, ignore=ignore)
    for name in ("README.md", "BENCHMARKS.md", "CHANGELOG.md", "pyproject.toml"):
        shutil.copy(REPO_ROOT / name, copy / name)


def _test_files(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): p.read_text() for p in sorted(root.glob("tests/**/*.py"))}


@pytest.mark.slow
def test_a_variant_added_as_the_guide_says_passes_the_suites_variant_tests(
    tmp_path: Path,
) -> None:
    copy = tmp_path / "repo"
    _copy(copy)
    before = _test_files(copy)
    # 1. The module; 2. the reference and its test row; 3. the row of prose, then the command.
    (copy / "adam_jax/_src/variants/adamod.py").write_text(MODULE.lstrip())
    (copy / "tests/references/adamod.py").write_text(REFERENCE.lstrip())
    which = copy / "docs/which_adam.md"
    text = which.read_text()
    text = text.replace("| `ademamix` |", WHICH_ADAM_ROW + "\n| `ademamix` |", 1)
    which.write_text(text)

    def run(*args: str, timeout: int = 300) -> str:
        result = subprocess.run(
            [sys.executable, "-P", *args], cwd=copy, capture_output=True, text=True,
            env={"PYTHONPATH": str(copy), "PATH": "", "JAX_PLATFORMS": "cpu",
                 "HOME": str(tmp_path)},
            timeout=timeout,
        )  # fmt: skip
        assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-3000:])
        return result.stdout

    rewrote = run("docs/family.py")
    assert "rewrote adam_jax/__init__.py" in rewrote and "rewrote docs/api.rst" in rewrote
    assert "rewrote README.md" in rewrote
    api = (copy / "docs/api.rst").read_text()
    assert ".. autofunction:: adamod" in api and ".. autofunction:: scale_by_adamod" in api
    assert "ScaleByAdamodState" in api
    assert (
        "| `adamod` | Adam's step sizes bounded by their running average |"
        in (copy / "README.md").read_text()
    )
    # No test file was edited by hand: the one new file is the reference.
    after = _test_files(copy)
    assert {k: v for k, v in after.items() if k != "tests/references/adamod.py"} == before

    output = run(
        "-m", "pytest", "-v", "-p", "no:cacheprovider", "-k", "adamod", *PER_VARIANT_TESTS,
        timeout=1500,
    )  # fmt: skip
    passed = re.findall(r"^(tests/\w+\.py)::(\w+)\[[^\]]*adamod[^\]]*\] PASSED", output, re.M)
    assert {path for path, _ in passed} == set(PER_VARIANT_TESTS), output[-3000:]
    ran = {test for _, test in passed}
    assert {
        "test_against_float64_reference",
        "test_inject_hyperparams",
        "test_zero1_training_matches_replicated_state_and_single_device",
        "test_a_new_learning_rate_in_the_state_takes_effect",
        "test_signatures_are_the_rules_fields",
    } <= ran
    assert not re.search(r" (FAILED|ERROR)", output), output[-3000:]
    run("-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_registry.py")
