"""What the float64 references share: their base classes, the test problems and the runners.

Nothing here imports ``adam_jax`` or ``optax``. The references (``adam.py`` for the Adam
family of adam_jax's core, one module per variant beside it) build on
:class:`PerLeafReference` (the loop over the leaves, ``mask``, ``maximize``, the decoupled decay
and step) and :class:`AdamMomentsReference` (that, with Adam's state ``m`` and ``v``), and follow
the :class:`Reference` protocol. :func:`make_problem` draws a test problem, :func:`run_reference`
runs a reference on it and :func:`run_jax` an optax ``GradientTransformation``. The reference
packages on PyPI (``torch.optim``, ``timm``, ``pytorch-optimizer``, ``schedulefree``,
``torch-optimi``, ``adam-atan2-pytorch``) run through :func:`run_torch` on the same problems;
:func:`import_reference_package` skips a test where a package is absent, and
:func:`adapter_options` checks the options their adapters share.

Schedules are functions of the 0-based step count: the ``k``-th update (``k = 0, 1, ...``)
uses ``lr(k)`` and ``wd(k)`` (optax's ``scale_by_schedule`` and PyTorch's ``LambdaLR``
both apply ``lr(0)`` to the first update).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

ScalarOrSchedule = float | Callable[[int], float]
Leaves = list[np.ndarray]


class Reference(Protocol):
    """A float64 reference: ``init(params)`` resets its state for a flat list of leaves,
    ``update(grads, params)`` returns the additive updates of one step."""

    def init(self, params: Sequence[np.ndarray]) -> None: ...

    def update(self, grads: Sequence[np.ndarray], params: Sequence[np.ndarray]) -> Leaves: ...


def as_schedule(value: ScalarOrSchedule) -> Callable[[int], float]:
    """Turns a constant into a schedule of the 0-based step count."""
    if callable(value):
        return lambda k: float(value(k))
    constant = float(value)
    return lambda k: constant


def _f64(x: np.ndarray) -> np.ndarray:
    """Float64 (or complex128) copy of ``x``."""
    x = np.asarray(x)
    return x.astype(np.complex128 if np.iscomplexobj(x) else np.float64)


def _abs_sq(g: np.ndarray) -> np.ndarray:
    """``|g|^2`` as a real array, also for complex ``g``."""
    return (g * np.conj(g)).real


def _zeros(params: Sequence[np.ndarray]) -> Leaves:
    """Zeros shaped like each leaf, float64 (complex128 for complex leaves): first moments."""
    return [np.zeros_like(_f64(p)) for p in params]


def _real_zeros(params: Sequence[np.ndarray]) -> Leaves:
    """Float64 zeros shaped like each leaf, also for complex leaves: moments of ``|g|^2``."""
    return [np.zeros(np.shape(p), np.float64) for p in params]


def _decay_and_step(
    u: np.ndarray, p: np.ndarray, k: int, decayed: bool, weight_decay: Any, learning_rate: Any
) -> np.ndarray:
    """The tail shared by the references: decoupled decay ``u + wd(k) p`` where ``decayed``, then
    ``-lr(k) * u`` (``learning_rate=None``: the bare direction ``u``)."""
    if learning_rate is None:
        return u
    wd = as_schedule(weight_decay)(k)
    if wd and decayed:
        u = u + wd * p
    return -as_schedule(learning_rate)(k) * u


@dataclass(kw_only=True)
class PerLeafReference:
    """What the float64 references share around their per-leaf formula.

    A subclass is a dataclass with ``learning_rate`` and ``weight_decay`` fields (constants or
    schedules of the 0-based step), its state lists, ``init(params)`` and ``update(grads,
    params)``: the update loops over :meth:`leaves` and, where the rule ends in the usual
    decoupled decay and step, returns :meth:`decay_and_step` of each leaf's direction. The
    fields below are keyword-only.
    """

    mask: Sequence[bool] | None = None  # per leaf: False = no weight decay
    maximize: bool = False  # negate the gradient first (PyTorch's maximize)
    count: int = 0  # updates so far: the 0-based index k of the next one

    def leaves(
        self, grads: Sequence[np.ndarray], params: Sequence[np.ndarray]
    ) -> Iterator[tuple[int, np.ndarray, np.ndarray, bool]]:
        """``(i, g, p, decayed)`` for each leaf: ``g`` and ``p`` in float64 (complex128), ``g``
        negated where ``maximize``, ``decayed`` False where ``mask`` leaves the leaf out."""
        decays = [True] * len(params) if self.mask is None else list(self.mask)
        for i, (g, p) in enumerate(zip(grads, params, strict=True)):
            g, p = _f64(g), _f64(p)
            yield i, (-g if self.maximize else g), p, decays[i]

    def decay_and_step(self, u: np.ndarray, p: np.ndarray, k: int, decayed: bool) -> np.ndarray:
        """:func:`_decay_and_step` with this reference's ``weight_decay`` and
        ``learning_rate``: ``-lr(k) (u + wd(k) p)`` (``wd p`` on decayed leaves only)."""
        return _decay_and_step(u, p, k, decayed, self.weight_decay, self.learning_rate)


@dataclass(kw_only=True)
class AdamMomentsReference(PerLeafReference):
    """A :class:`PerLeafReference` whose state is Adam's two moments, zero after :meth:`init`:
    ``m`` (float64, complex128 for complex leaves) and ``v`` (of ``|g|^2``, float64)."""

    m: Leaves = field(default_factory=list)
    v: Leaves = field(default_factory=list)

    def init(self, params: Sequence[np.ndarray]) -> None:
        """Zero moments for ``params`` (a flat list of leaves)."""
        self.count = 0
        self.m, self.v = _zeros(params), _real_zeros(params)


# --------------------------------------------------------------------------------------------
# Test problems (NumPy data; the gradient formula is written once for NumPy and jax.numpy).
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    """A small deterministic optimisation problem on a flat dict of parameter leaves.

    ``grad(p, k) = a * (p - c) + 0.3 * sin(2 p) + noise[k]`` (the ``sin`` term only for real
    leaves): a noisy, slightly non-quadratic bowl, so gradients change sign and the moments mix
    positive and negative values, while trajectories stay bounded (no chaotic amplification of
    rounding differences). With ``coupled=False`` the gradients are evaluated at the initial
    params, so two optimizers see exactly the same gradient sequence (an open loop): their
    per-step updates can then be compared tightly even in float32.
    """

    params: dict[str, np.ndarray]
    curvature: dict[str, np.ndarray]
    target: dict[str, np.ndarray]
    noise: dict[str, np.ndarray]  # leaf shape (steps, *param_shape)
    coupled: bool = True  # False: gradients at the *initial* params (an open-loop sequence)

    @property
    def keys(self) -> list[str]:
        """Leaf names in the order ``jax.tree`` flattens a dict (sorted)."""
        return sorted(self.params)

    def grad(self, params: dict, k, xp=np) -> dict:
        """Gradient at ``params`` for step ``k`` (``xp`` is ``numpy`` or ``jax.numpy``)."""
        out = {}
        for name in self.keys:
            p = params[name]
            if not self.coupled:
                p = xp.asarray(self.params[name], dtype=p.dtype)
            noise = xp.asarray(self.noise[name], dtype=p.dtype)[k]
            g = xp.asarray(self.curvature[name], dtype=p.dtype) * (
                p - xp.asarray(self.target[name], dtype=p.dtype)
            )
            if not xp.iscomplexobj(p):
                g = g + 0.3 * xp.sin(2 * p)
            out[name] = g + noise
        return out


def make_problem(
    seed: int = 0,
    steps: int = 300,
    shapes: dict[str, tuple[int, ...]] | None = None,
    complex_params: bool = False,
    noise_scale: float = 0.5,
    coupled: bool = True,
) -> Problem:
    """Random problem with leaves of ``shapes`` (default: a matrix, a vector and a scalar)."""
    rng = np.random.default_rng(seed)
    shapes = shapes or {"b": (5,), "s": (), "w": (3, 4)}

    def draw(shape: tuple[int, ...]) -> np.ndarray:
        x = rng.standard_normal(shape)
        if complex_params:
            x = x + 1j * rng.standard_normal(shape)
        return x

    params = {k: draw(s) for k, s in shapes.items()}
    curvature = {k: rng.uniform(0.1, 3.0, s) for k, s in shapes.items()}
    target = {k: draw(s) for k, s in shapes.items()}
    noise = {k: noise_scale * draw((steps, *s)) for k, s in shapes.items()}
    return Problem(params, curvature, target, noise, coupled)


def run_reference(ref: Reference, problem: Problem, steps: int):
    """Runs a float64 reference on ``problem``.

    Returns ``(params, updates)``: dicts of arrays stacked over steps, shapes
    ``(steps + 1, ...)`` and ``(steps, ...)``.
    """
    keys = problem.keys
    p = {k: _f64(problem.params[k]) for k in keys}
    ref.init([p[k] for k in keys])
    traj = {k: [p[k]] for k in keys}
    upd: dict[str, list[np.ndarray]] = {k: [] for k in keys}
    for step in range(steps):
        g = problem.grad(p, step)
        u = ref.update([g[k] for k in keys], [p[k] for k in keys])
        for k, uk in zip(keys, u, strict=True):
            p[k] = p[k] + uk
            traj[k].append(p[k])
            upd[k].append(uk)
    return (
        {k: np.stack(v) for k, v in traj.items()},
        {k: np.stack(v) for k, v in upd.items()},
    )


def run_jax(
    opt, problem: Problem, steps: int, dtype=np.float32, jit: bool = True, exact_grads=False
):
    """Runs an optax-style ``GradientTransformation`` on ``problem`` with ``jax.lax.scan``.

    Params are cast to ``dtype``; gradients are computed in that dtype, or with
    ``exact_grads`` in float64 and rounded to it, as :func:`run_torch` does (needs float64
    enabled). Returns ``(params, updates, final_state)`` with the same stacking as
    :func:`run_reference`.
    """
    import jax
    import jax.numpy as jnp

    params = {k: jnp.asarray(v, dtype=dtype) for k, v in problem.params.items()}

    def step(carry, k):
        p, state = carry
        if exact_grads:
            wide = jax.tree.map(lambda x: x.astype(jnp.float64), p)
            g = jax.tree.map(lambda x, y: x.astype(y.dtype), problem.grad(wide, k, xp=jnp), p)
        else:
            g = problem.grad(p, k, xp=jnp)
        u, state = opt.update(g, state, p)
        p = jax.tree.map(lambda a, b: (a + b).astype(a.dtype), p, u)
        return (p, state), (p, u)

    def run(p0):
        state = opt.init(p0)
        (_, state), (traj, upd) = jax.lax.scan(step, (p0, state), jnp.arange(steps))
        return traj, upd, state

    if jit:
        run = jax.jit(run)
    traj, upd, state = run(params)
    traj = {k: np.concatenate([np.asarray(params[k])[None], np.asarray(traj[k])]) for k in traj}
    return traj, {k: np.asarray(v) for k, v in upd.items()}, state


# --------------------------------------------------------------------------------------------
# Reference packages (PyTorch optimizers from PyPI), run on the same problems.
# --------------------------------------------------------------------------------------------


def import_reference_package(distribution: str, module: str | None = None):
    """The module of a reference package, or a pytest skip where its distribution is not
    installed. Where it is installed, the import must work: a broken install fails the test
    instead of skipping it."""
    import importlib

    require_distribution(distribution)
    return importlib.import_module(module or distribution.replace("-", "_"))


def require_distribution(distribution: str) -> None:
    """A pytest skip where the distribution ``distribution`` is not installed."""
    import importlib.metadata

    import pytest

    try:
        importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        pytest.skip(f"{distribution} is not installed: no cross-check against it")


def timm_optimizer_module(name: str):
    """A module of ``timm.optim`` (``"adamw"``, ``"adopt"``, ...) loaded without the rest of timm.

    ``import timm`` imports its model zoo, which needs torchvision, and the only torchvision
    builds that install beside the CPU build of torch replace it with a CUDA build of several
    GB. The optimizer modules need torch alone, so they are loaded here as members of a package
    of their own whose path is timm's ``optim`` folder (their relative imports resolve there).
    """
    import importlib
    import importlib.util
    import sys
    import types
    from pathlib import Path

    import_reference_package("torch")
    require_distribution("timm")
    spec = importlib.util.find_spec("timm")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("timm is installed but cannot be located")
    folder = Path(next(iter(spec.submodule_search_locations))) / "optim"
    package = "_timm_optim_alone"
    if package not in sys.modules:
        module = types.ModuleType(package)
        module.__path__ = [str(folder)]
        sys.modules[package] = module
    return importlib.import_module(f"{package}.{name}")


def param_groups(params: list, mask: Sequence[bool] | None, weight_decay: float) -> list:
    """PyTorch param groups: the params as one group, or two where ``mask`` (one bool per
    param) leaves some out of the weight decay (their group's ``weight_decay`` is 0)."""
    if mask is None or not weight_decay:
        return list(params)
    mask = list(mask)
    if len(mask) != len(params):
        raise ValueError("mask needs one entry per parameter")
    decayed = [p for p, m in zip(params, mask, strict=True) if m]
    kept = [p for p, m in zip(params, mask, strict=True) if not m]
    groups = [{"params": decayed}, {"params": kept, "weight_decay": 0.0}]
    return [group for group in groups if group["params"]]


def adapter_options(
    params: Sequence[Any],
    options: Mapping[str, Any],
    package: str,
    *,
    complex_params: str | None = "views complex params as pairs of reals",
    refuse: Sequence[str | Callable[[dict[str, Any], str], None]] = (),
    learning_rate: float = 1e-3,
    weight_decay: float = 0.0,
) -> tuple[dict[str, Any], float, float]:
    """Pops and checks the options that a reference's package adapters treat alike.

    Returns the options left (a copy) and the learning rate and weight decay as floats
    (``learning_rate`` and ``weight_decay`` are the reference's defaults). Raises
    NotImplementedError for what ``package`` cannot express, checked in this order:

    * complex ``params``: ``f"{package} {complex_params}"`` (None: not checked here);
    * each entry of ``refuse``: an option name, popped and refused where its value is truthy
      (``f"{package} has no {name}"``), or a function ``check(options, package)`` that pops and
      refuses options of its own;
    * ``learning_rate=None`` (the bare direction), a learning-rate schedule (use
      :func:`run_torch`'s ``lr_lambda``), a weight-decay schedule.
    """
    torch = import_reference_package("torch")
    opts = dict(options)
    if complex_params is not None and any(torch.is_complex(p) for p in params):
        raise NotImplementedError(f"{package} {complex_params}")
    for check in refuse:
        if callable(check):
            check(opts, package)
        elif opts.pop(check, None):
            raise NotImplementedError(f"{package} has no {check}")
    lr = opts.pop("learning_rate", learning_rate)
    wd = opts.pop("weight_decay", weight_decay)
    if lr is None:
        raise NotImplementedError(f"{package} has no bare direction (learning_rate=None)")
    if callable(lr):
        raise NotImplementedError(f"{package} has no learning-rate schedule (use lr_lambda)")
    if callable(wd):
        raise NotImplementedError(f"{package} has no weight-decay schedule")
    return opts, float(lr), float(wd)


def run_torch(
    make_optimizer: Callable[[list], Any],
    problem: Problem,
    steps: int,
    dtype: str = "float64",
    lr_lambda: Callable[[int], float] | None = None,
) -> dict[str, np.ndarray]:
    """Runs a PyTorch optimizer on ``problem`` and returns its trajectory.

    ``make_optimizer`` gets the list of parameter tensors (in ``problem.keys`` order, of
    ``dtype``) and returns a ``torch.optim.Optimizer`` ready to ``step`` (call its ``train()``
    there if it has modes, as schedule-free optimizers do). Gradients are evaluated in float64
    at the current params and rounded to ``dtype``. ``lr_lambda`` wraps the optimizer in
    ``LambdaLR`` (the ``k``-th update uses ``lr * lr_lambda(k)``). Returns the params after each
    step as float64 arrays shaped ``(steps + 1, *param_shape)``, like :func:`run_reference`.
    """
    torch = import_reference_package("torch")
    torch_dtype = getattr(torch, dtype)
    keys = problem.keys
    params = [torch.tensor(problem.params[k], dtype=torch_dtype) for k in keys]
    for p in params:
        p.requires_grad_(True)
    opt = make_optimizer(params)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda) if lr_lambda else None
    traj = {k: [p.detach().numpy().astype(np.float64)] for k, p in zip(keys, params, strict=True)}
    for step in range(steps):
        current = {
            k: p.detach().numpy().astype(np.float64) for k, p in zip(keys, params, strict=True)
        }
        g = problem.grad(current, step)
        for k, p in zip(keys, params, strict=True):
            p.grad = torch.tensor(np.asarray(g[k]), dtype=torch_dtype)
        opt.step()
        if sched is not None:
            sched.step()
        for k, p in zip(keys, params, strict=True):
            traj[k].append(p.detach().numpy().astype(np.float64))
    return {k: np.stack(v) for k, v in traj.items()}
