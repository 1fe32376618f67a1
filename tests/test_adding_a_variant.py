"""docs/adding_a_variant.md, followed as written: a small optimizer's module and its reference
added to a copy of the repository, then ``python docs/family.py``, and nothing else edited. The
optimizer reaches the registry, ``adam_jax``'s names, the API page, README's table and the tests'
table, and its float64 run matches its reference."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent

# The module, written with adam_jax.rules and the registry's public types alone.
MODULE = '''
"""Half-Adam: Adam's step halved (a test's optimizer)."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax

from adam_jax import rules
from adam_jax.registry import OptimizerInfo, Paper


@dataclasses.dataclass(frozen=True, kw_only=True)
class HalfAdamRule(rules.AdamLikeRule):
    """Half-Adam's moment rule: see :func:`scale_by_half_adam`."""

    b1: Any = rules.b1()
    b2: Any = rules.b2()
    eps: Any = rules.eps()
    mu_dtype: Any = rules.mu_dtype()
    nu_dtype: Any = rules.nu_dtype()

    def update(
        self, g: jax.Array, moments: dict[str, jax.Array], scalars: rules.StepScalars,
        leaf: rules.Leaf,
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        mu = rules.moving_average(moments["mu"], g, scalars.w1)
        nu = rules.moving_average(moments["nu"], rules.abs_sq(g), scalars.w2)
        direction = (mu / scalars.c1) / (jnp.sqrt(leaf.settle("nu", nu) / scalars.c2) + self.eps)
        return leaf.add_decay(0.5 * direction), {"mu": mu, "nu": nu}


def scale_by_half_adam(
    b1: float | jax.Array = 0.9,
    b2: float | jax.Array = 0.999,
    eps: float | jax.Array = 1e-8,
    *,
    mu_dtype: Any = None,
    nu_dtype: Any = None,
    weight_decay: optax.ScalarOrSchedule = 0.0,
    mask: rules.Mask | None = None,
) -> optax.GradientTransformation:
    """Rescales gradients by half of Adam's direction.

    Args:
      b1: decay of the first moment, in [0, 1).
      b2: decay of the second moment, in [0, 1).
      eps: added to the denominator outside the square root, >= 0.
      mu_dtype: storage of the first moment (``None``: the params' dtype; a dtype; or a
        :class:`adam_jax.MomentStorage`).
      nu_dtype: storage of the second moment, as ``mu_dtype``.
      weight_decay: decoupled weight decay, a constant >= 0 or a schedule of the step.
      mask: which leaves to decay (a tree of bools or a callable of the params).

    Returns:
      An ``optax.GradientTransformation`` with state ``optax.ScaleByAdamState``.
    """
    rule = HalfAdamRule(b1=b1, b2=b2, eps=eps, mu_dtype=mu_dtype, nu_dtype=nu_dtype)
    return rules.scale_by_rule(rule, weight_decay=weight_decay, mask=mask)


def half_adam(
    learning_rate: optax.ScalarOrSchedule,
    b1: float | jax.Array = 0.9,
    b2: float | jax.Array = 0.999,
    eps: float | jax.Array = 1e-8,
    *,
    mu_dtype: Any = None,
    nu_dtype: Any = None,
    weight_decay: optax.ScalarOrSchedule = 0.0,
    mask: rules.Mask | None = None,
    maximize: bool = False,
) -> optax.GradientTransformation:
    """Half-Adam (a test's optimizer), after Kingma and Ba's Adam.

    Args:
      learning_rate: a constant >= 0 or a schedule of the 0-based step.
      b1: decay of the first moment, in [0, 1).
      b2: decay of the second moment, in [0, 1).
      eps: added to the denominator outside the square root, >= 0.
      mu_dtype: storage of the first moment (``None``: the params' dtype; a dtype; or a
        :class:`adam_jax.MomentStorage`).
      nu_dtype: storage of the second moment, as ``mu_dtype``.
      weight_decay: decoupled weight decay, a constant >= 0 or a schedule of the step.
      mask: which leaves to decay (a tree of bools or a callable of the params).
      maximize: ascend the objective instead of descending (PyTorch's ``maximize``).

    Returns:
      An ``optax.GradientTransformation`` (a chain ending in the learning rate).

    References:
      Kingma and Ba, `Adam: A Method for Stochastic Optimization
      <https://arxiv.org/abs/1412.6980>`_, ICLR 2015.
    """
    return rules.descend(
        learning_rate,
        scale_by_half_adam(
            b1, b2, eps, mu_dtype=mu_dtype, nu_dtype=nu_dtype, weight_decay=weight_decay,
            mask=mask,
        ),
        maximize=maximize,
    )


REGISTRY_ROWS = (
    OptimizerInfo(
        name="half_adam",
        alias=half_adam,
        group="variant",
        summary="half of Adam's step",
        paper=Paper(
            authors="Kingma and Ba",
            title="Adam: A Method for Stochastic Optimization",
            url="https://arxiv.org/abs/1412.6980",
            venue="ICLR 2015",
        ),
        transformation=scale_by_half_adam,
        rule=HalfAdamRule,
    ),
)
'''

# The reference, in float64 NumPy, ending with its test row.
REFERENCE = '''
"""Half-Adam in float64: Adam's step (Kingma and Ba, Algorithm 1) halved."""

from __future__ import annotations

import numpy as np
from variant_spec import Variant


class RefHalfAdam:
    def __init__(self, lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0):
        self.lr, self.b1, self.b2, self.eps, self.wd = lr, b1, b2, eps, weight_decay

    def init(self, params):
        self.t = 0
        self.m = [np.zeros_like(p) for p in params]
        self.v = [np.zeros_like(p) for p in params]

    def update(self, grads, params):
        self.t += 1
        updates = []
        for i, (g, p) in enumerate(zip(grads, params)):
            self.m[i] = self.b1 * self.m[i] + (1 - self.b1) * g
            self.v[i] = self.b2 * self.v[i] + (1 - self.b2) * g * g
            m_hat = self.m[i] / (1 - self.b1**self.t)
            v_hat = self.v[i] / (1 - self.b2**self.t)
            updates.append(-self.lr * (0.5 * m_hat / (np.sqrt(v_hat) + self.eps) + self.wd * p))
        return updates


TESTS = (
    Variant(
        name="half_adam",
        reference_class=RefHalfAdam,
        learning_rate=1e-2,
        cases={"default": {}, "hyperparams": {"b1": 0.8, "b2": 0.99, "eps": 1e-6}},
    ),
)
'''

CHECK = """
import sys

import jax
import numpy as np

import adam_jax
from adam_jax import registry

sys.path[:0] = ["tests"]
import variants  # tests/variants.py: the tests' table
from references.common import make_problem, run_jax, run_reference

assert "half_adam" in registry.names("variant")
assert adam_jax.half_adam is registry.get("half_adam").alias
assert "half_adam" in adam_jax.__all__ and "scale_by_half_adam" in adam_jax.__all__
row = variants.BY_NAME["half_adam"]
assert set(row.cases) == {"default", "hyperparams"}
with jax.enable_x64(True):
    problem = make_problem(seed=0, steps=50)
    for options in row.cases.values():
        expected, _ = run_reference(row.reference_class(1e-2, **options), problem, 50)
        traj, _, _ = run_jax(adam_jax.half_adam(1e-2, **options), problem, 50, dtype=np.float64)
        for k in traj:
            error = np.max(np.abs(traj[k] - expected[k])) / np.max(np.abs(expected[k]))
            assert error < 1e-8, (k, error)
print("ok")
"""


@pytest.mark.slow
def test_a_variant_added_as_the_guide_says_reaches_the_registry_docs_and_tests(
    tmp_path: Path,
) -> None:
    copy = tmp_path / "repo"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for folder in ("adam_jax", "docs", "tests/references"):
        shutil.copytree(REPO_ROOT / folder, copy / folder, ignore=ignore)
    for name in ("README.md", "tests/variants.py", "tests/variant_spec.py"):
        shutil.copy(REPO_ROOT / name, copy / name)
    (copy / "adam_jax/_src/variants/half_adam.py").write_text(textwrap.dedent(MODULE))
    (copy / "tests/references/half_adam.py").write_text(textwrap.dedent(REFERENCE))

    def run(*args: str) -> str:
        result = subprocess.run(
            [sys.executable, "-P", *args], cwd=copy, capture_output=True, text=True,
            env={"PYTHONPATH": str(copy), "PATH": "", "JAX_PLATFORMS": "cpu"}, timeout=300,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        return result.stdout

    rewrote = run("docs/family.py")
    assert "rewrote adam_jax/__init__.py" in rewrote and "rewrote docs/api.rst" in rewrote
    assert "rewrote README.md" in rewrote
    api = (copy / "docs/api.rst").read_text()
    assert ".. autofunction:: half_adam" in api and ".. autofunction:: scale_by_half_adam" in api
    assert "| `half_adam` | half of Adam's step |" in (copy / "README.md").read_text()
    assert run("-c", CHECK).strip().endswith("ok")
