r"""MARS: variance-reduced momentum for Adam (Yuan, Liu, Wu, Zhou and Gu, 2024).

MARS feeds AdamW's moments a corrected gradient
:math:`c_t = g_t + \gamma \frac{\beta_1}{1-\beta_1} (g_t - g_{t-1})`, a scaled stochastic
recursive momentum (STORM) term, clipped to norm 1 per tensor. The authors' code trains the
2-D params (the matrices) with MARS and, by default, every other param with plain AdamW of its
own betas, rate and decay (``optimize_1d=False``); this module is the authors' ``MARS`` with
``mars_type="mars-adamw"``.
"""

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from adam_jax import rules
from adam_jax.rules import (
    FlatParams,
    Leaf,
    Mask,
    Moment,
    MomentRule,
    MomentStorage,
    OptimizerInfo,
    Paper,
    abs_sq,
    ascent,
    cast_storage,
    moving_average,
    moving_average_terms,
    per_leaf,
    scale_by_rule,
    second_moment,
)

MARS_TYPES = ("mars-adamw",)
NOT_BUILT = ("mars-lion", "mars-shampoo")


class ScaleByMarsState(NamedTuple):
    """MARS' state: the step count, the first and second moments (``mu``, ``nu``), the
    gradient of the last step (``last_grad``, kept in the params' dtype; with
    ``is_approx=False`` the one the caller passes; zeros for the params trained by AdamW)
    and, with ``amsgrad=True``, the running maximum of ``nu`` (``nu_max``, else ``None``)."""

    count: jax.Array  # type: ignore[assignment]  # a field, as optax's states have
    mu: optax.Updates
    nu: optax.Updates
    last_grad: optax.Updates
    nu_max: Any


class MarsScalars(NamedTuple):
    """One step's scalars: the averages' weights and bias corrections of the MARS leaves
    (``b1``, ``b2``) and of the AdamW leaves (``b1_1d``, ``b2_1d``), the two learning rates
    and decays, and whether this is the first step."""

    w1: Any
    c1: jax.Array
    w2: Any
    c2: jax.Array
    w1_1d: Any
    c1_1d: jax.Array
    w2_1d: Any
    c2_1d: jax.Array
    lr: jax.Array
    lr_1d: jax.Array
    wd: jax.Array
    wd_1d: jax.Array
    first: jax.Array


def _storage_of(leaf: Any) -> MomentStorage:
    """The default storage of the second moment: the param's dtype, float32 for float16."""
    if jnp.result_type(leaf) == jnp.float16:
        return cast_storage(jnp.float32)
    return cast_storage()


# The clipped correction has entries of order 1/sqrt(size): (1 - b2) c^2 falls below
# float16's smallest normal (6e-5) in tensors of a few hundred elements, and a second moment
# rounded to 0 turns m / (sqrt(v) + eps) into m / eps.
_WIDE_FLOAT16 = per_leaf(lambda tree: jax.tree.map(_storage_of, tree))


def _at(value: Any, count: jax.Array, dtype: Any) -> jax.Array:
    """A constant or a schedule of the 0-based step, as a scalar of ``dtype``."""
    return jnp.asarray(value(count) if callable(value) else value).astype(dtype)


def _check_mars_type(name: str, value: Any) -> None:
    if value in NOT_BUILT:
        raise ValueError(
            f"{name} {value!r} is not built: adam_jax has MARS-AdamW alone "
            f"({name} must be one of {MARS_TYPES})"
        )
    rules.check_choice(name, value, MARS_TYPES)


@dataclasses.dataclass(frozen=True, kw_only=True)
class MarsRule(MomentRule):
    """MARS' moment rule: see :func:`scale_by_mars` (``learning_rate=None``: the direction,
    decay included) and :func:`mars` (a learning rate: the whole step)."""

    learning_rate: optax.ScalarOrSchedule | None = rules.learning_rate()
    b1: Any = rules.b1(0.95)
    b2: Any = rules.b2(0.99)
    eps: Any = rules.eps(1e-8)
    gamma: Any = rules.hyperparam(
        0.025,
        "weight of the gradient correction, >= 0 (0: AdamW on per-tensor clipped gradients).",
        rules.check_non_negative,
    )
    mars_type: str = rules.hyperparam(
        "mars-adamw",
        '``"mars-adamw"``; the authors\' ``"mars-lion"`` and ``"mars-shampoo"`` are not built '
        "and raise a ``ValueError``.",
        _check_mars_type,
    )
    is_approx: bool = rules.hyperparam(
        True, r":math:`g_{t-1}` from the previous step (True) or passed as ``last_grad``."
    )
    amsgrad: bool = rules.hyperparam(False, "use the running maximum of the second moment.")
    optimize_1d: bool = rules.hyperparam(
        False, "train every param with MARS (else the params that are not 2-D with AdamW)."
    )
    lr_1d: optax.ScalarOrSchedule | None = rules.hyperparam(
        None,
        r":math:`\alpha_{1d}`, the rate of the AdamW params (a constant >= 0 or a schedule; "
        "``None``: the learning rate).",
        rules.check_non_negative,
        optimizer_only=True,
    )
    b1_1d: Any = rules.hyperparam(
        0.9, "AdamW's decay of the first moment for the params that are not 2-D, in [0, 1).",
        rules.check_decay,
    )  # fmt: skip
    b2_1d: Any = rules.hyperparam(
        0.95, "AdamW's decay of the second moment for the params that are not 2-D, in [0, 1).",
        rules.check_decay,
    )  # fmt: skip
    weight_decay: optax.ScalarOrSchedule = rules.hyperparam(
        0.0,
        r":math:`\lambda` of the MARS params, a constant >= 0 or a schedule (scaled by the "
        "learning rate in :func:`adam_jax.mars`).",
        rules.check_non_negative,
    )
    weight_decay_1d: optax.ScalarOrSchedule = rules.hyperparam(
        0.1,
        r":math:`\lambda_{1d}` of the AdamW params, likewise (scaled by ``lr_1d`` in "
        ":func:`adam_jax.mars`; the authors' default 0.1 decays them even when "
        "``weight_decay`` is 0).",
        rules.check_non_negative,
    )
    eps_placement: str = rules.hyperparam(
        "standard",
        '``"standard"`` (the authors\', :math:`\\sqrt{\\hat v_t} + \\epsilon`) or '
        '``"keras"`` (:math:`(\\sqrt{v_t} + \\epsilon)/\\sqrt{1-\\beta_2^t}`).',
        rules.choice("standard", "keras"),
    )
    correct_first_step: bool = rules.hyperparam(
        True,
        r"the first correction uses :math:`g_0 = 0` (the authors'); False: "
        r":math:`\tilde c_1 = g_1`.",
    )
    only_2d: bool = rules.hyperparam(
        True,
        "with ``optimize_1d=False``, MARS for 2-D params alone (the authors'); False: for "
        "every param of 2 dimensions or more.",
    )
    mu_dtype: Any = rules.mu_dtype()
    nu_dtype: Any = rules.hyperparam(
        None,
        "storage of the second moment and its maximum, as ``mu_dtype`` (``None``: the params' "
        "dtype, float32 for float16 params, whose smallest normal the second moment of the "
        r"clipped :math:`c_t`, of order :math:`1/\text{size}`, falls below).",
    )

    state_type = ScaleByMarsState

    def moments(self) -> tuple[Moment, ...]:
        nu_dtype = _WIDE_FLOAT16 if self.nu_dtype is None else self.nu_dtype
        maximum = (second_moment(nu_dtype, "nu_max"),) if self.amsgrad else ()
        return (Moment("mu", self.mu_dtype), second_moment(nu_dtype),
                Moment("last_grad"), *maximum)  # fmt: skip

    def init_fields(self, params: Any) -> dict[str, Any]:
        if not self.optimize_1d:
            leaves = jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, FlatParams))
            if any(isinstance(leaf, FlatParams) for leaf in leaves):
                raise ValueError(
                    "mars with optimize_1d=False picks MARS or AdamW by each param's number "
                    "of dimensions: FlatParams buffers are not supported (optimize_1d=True "
                    "runs on them)"
                )
        return super().init_fields(params)

    def scalars(self, fields: dict[str, Any], dtype: Any) -> MarsScalars:
        count = fields["count"]
        t = optax.safe_increment(count)
        w1, c1 = moving_average_terms(self.b1, t, dtype)
        w2, c2 = moving_average_terms(self.b2, t, dtype)
        w1_1d, c1_1d = moving_average_terms(self.b1_1d, t, dtype)
        w2_1d, c2_1d = moving_average_terms(self.b2_1d, t, dtype)
        lr = self.rate(fields, dtype)
        lr_1d = lr if self.lr_1d is None else _at(self.lr_1d, count, dtype)
        wd = _at(self.weight_decay, count, dtype)
        wd_1d = _at(self.weight_decay_1d, count, dtype)
        return MarsScalars(w1, c1, w2, c2, w1_1d, c1_1d, w2_1d, c2_1d, lr, lr_1d, wd, wd_1d,
                           count == 0)  # fmt: skip

    def _takes_mars(self, g: jax.Array) -> bool:
        """Whether the leaf is trained by MARS (else by AdamW): the authors' ``optimize_1d or
        is_grad_2d``."""
        return self.optimize_1d or (g.ndim == 2 if self.only_2d else g.ndim >= 2)

    def update(
        self,
        g: jax.Array,
        moments: dict[str, jax.Array],
        scalars: MarsScalars,
        leaf: Leaf,
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        d = scalars
        # AdamW's params keep theirs as it is (zeros: unused), MARS' keep this gradient.
        new = {"last_grad": moments["last_grad"]}
        if self._takes_mars(g):
            new["last_grad"] = g
            b1, w1, c1, w2, c2, lr, wd = self.b1, d.w1, d.c1, d.w2, d.c2, d.lr, d.wd
            last = moments["last_grad"]
            if not self.is_approx:
                # The caller's gradient at the previous params; none before the first step.
                last = jnp.where(d.first, jnp.zeros_like(last), last)
            scale = self.gamma * (b1 / (1.0 - b1))
            corrected = g + scale * (g - last)
            if not self.correct_first_step:
                corrected = jnp.where(d.first, g, corrected)
            # Clipped to norm 1 per tensor: c / max(1, ||c||) is c itself where ||c|| <= 1.
            norm = jnp.sqrt(leaf.sum(abs_sq(corrected)))
            c = corrected / jnp.maximum(norm, 1.0)
        else:
            c, w1, c1, w2, c2, lr, wd = g, d.w1_1d, d.c1_1d, d.w2_1d, d.c2_1d, d.lr_1d, d.wd_1d
        mu = moving_average(moments["mu"], c, w1)
        nu = moving_average(moments["nu"], abs_sq(c), w2)
        new.update(mu=mu, nu=nu)
        second = leaf.settle("nu", nu)
        if self.amsgrad:
            new["nu_max"] = jnp.maximum(moments["nu_max"], second)
            second = leaf.settle("nu_max", new["nu_max"])
        if self.eps_placement == "standard":
            denom = (jnp.sqrt(second) / jnp.sqrt(c2) + self.eps) * c1
        else:
            denom = (jnp.sqrt(second) + self.eps) / jnp.sqrt(c2) * c1
        update = leaf.settle("mu", mu) / denom
        # leaf.decay is the mask (1 where decayed, 0 where not): the rate is the leaf kind's.
        rate = None if self.learning_rate is None else lr
        return rules.step_with_rate(update, rate, leaf, decay=leaf.decay * wd), new

    def to_state(self, fields: dict[str, Any]) -> ScaleByMarsState:
        values: dict[str, Any] = {name: fields.get(name) for name in ScaleByMarsState._fields}
        return ScaleByMarsState(**values)

    def from_state(self, state: Any) -> dict[str, Any]:
        return {name: value for name, value in state._asdict().items() if value is not None}


def _decay_mask_rate(rule: MarsRule) -> float:
    """What ``scale_by_rule`` gets as its decay: 1 (the rule scales it by the leaf kind's
    rate, so that ``mask`` covers both kinds), or 0 where neither kind can decay."""
    zero = rules.static_float(rule.weight_decay) == 0.0
    zero_1d = rule.optimize_1d or rules.static_float(rule.weight_decay_1d) == 0.0
    return 0.0 if zero and zero_1d else 1.0


def _with_last_grad(
    inner: optax.GradientTransformation, negate: bool
) -> optax.GradientTransformationExtraArgs:
    """``is_approx=False``: ``update`` takes ``last_grad``, the gradient of this step's batch
    at the previous step's params, and puts it in the state for the rule."""

    def update_fn(
        updates: optax.Updates,
        state: Any,
        params: optax.Params | None = None,
        *,
        last_grad: optax.Updates | None = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, Any]:
        if last_grad is None:
            raise ValueError(
                "mars with is_approx=False needs the gradient of this step's batch at the "
                "previous params: call update(grads, state, params, last_grad=...)"
            )
        sign = -1.0 if negate else 1.0
        given = jax.tree.map(
            lambda x, old: (sign * jnp.asarray(x)).astype(old.dtype), last_grad, state.last_grad
        )
        return inner.update(updates, state._replace(last_grad=given), params, **extra_args)

    return optax.GradientTransformationExtraArgs(inner.init, update_fn)


def _scale_by_mars(
    rule: MarsRule, *, mask: Mask | None = None, negate: bool = False
) -> optax.GradientTransformation:
    """The transformation of ``rule``: its decays applied by the rule, under ``mask``, and
    with ``is_approx=False`` the ``last_grad`` it takes (negated where the gradient is)."""
    tx = scale_by_rule(rule, weight_decay=_decay_mask_rate(rule), mask=mask)
    return tx if rule.is_approx else _with_last_grad(tx, negate=negate)


def _mars(
    rule: MarsRule, *, mask: Mask | None = None, maximize: bool = False
) -> optax.GradientTransformation:
    """The optimizer of ``rule`` (which holds the learning rate)."""
    return optax.chain(*ascent(maximize), _scale_by_mars(rule, mask=mask, negate=maximize))


def scale_by_mars(
    b1: float | jax.Array = 0.95,
    b2: float | jax.Array = 0.99,
    eps: float | jax.Array = 1e-8,
    *,
    gamma: float | jax.Array = 0.025,
    mars_type: str = "mars-adamw",
    is_approx: bool = True,
    amsgrad: bool = False,
    optimize_1d: bool = False,
    b1_1d: float | jax.Array = 0.9,
    b2_1d: float | jax.Array = 0.95,
    weight_decay: optax.ScalarOrSchedule = 0.0,
    weight_decay_1d: optax.ScalarOrSchedule = 0.1,
    eps_placement: str = "standard",
    correct_first_step: bool = True,
    only_2d: bool = True,
    mu_dtype: Any = None,
    nu_dtype: Any = None,
    mask: Mask | None = None,
) -> optax.GradientTransformation:
    r"""Rescales gradients by MARS-AdamW's moment estimates (Yuan et al., 2024, Algorithm 2).

    For a 2-D param (every param with ``optimize_1d=True``):

    .. math::
        \tilde c_t = g_t + \gamma \frac{\beta_1}{1-\beta_1} (g_t - g_{t-1}), \qquad
        c_t = \frac{\tilde c_t}{\max(1, \|\tilde c_t\|)}, \\
        m_t = \beta_1 m_{t-1} + (1-\beta_1) c_t, \qquad
        v_t = \beta_2 v_{t-1} + (1-\beta_2) |c_t|^2, \\
        u_t = \frac{m_t / (1-\beta_1^t)}{\sqrt{v_t / (1-\beta_2^t)} + \epsilon}
        + \lambda \theta_{t-1},

    with :math:`g_0 = 0` and the norm taken over the tensor. With ``is_approx=True`` (the
    authors' default) :math:`g_{t-1}` is the previous step's gradient (another batch); with
    ``is_approx=False`` it is the gradient of this step's batch at the previous params, which
    ``update`` takes as ``last_grad=`` (the authors' ``update_previous_grad``: one more
    backward pass a step; ignored at the first step). The other params
    (``optimize_1d=False``) take AdamW's :math:`u_t` of :math:`g_t` itself with
    :math:`\beta_{1,1d}`, :math:`\beta_{2,1d}` and decay :math:`\lambda_{1d}`; ``mask``
    selects the decayed leaves of both kinds. With ``amsgrad=True``, :math:`v_t` in
    :math:`u_t` becomes its running maximum.

    Args:
      b1: decay of the first moment, in [0, 1).
      b2: decay of the second moment, in [0, 1).
      eps: added to the denominator outside the square root, >= 0.
      gamma: weight of the gradient correction, >= 0 (0: AdamW on per-tensor clipped gradients).
      mars_type: ``"mars-adamw"``; the authors' ``"mars-lion"`` and ``"mars-shampoo"`` are not built
        and raise a ``ValueError``.
      is_approx: :math:`g_{t-1}` from the previous step (True) or passed as ``last_grad``.
      amsgrad: use the running maximum of the second moment.
      optimize_1d: train every param with MARS (else the params that are not 2-D with AdamW).
      b1_1d: AdamW's decay of the first moment for the params that are not 2-D, in [0, 1).
      b2_1d: AdamW's decay of the second moment for the params that are not 2-D, in [0, 1).
      weight_decay: :math:`\lambda` of the MARS params, a constant >= 0 or a schedule (scaled by the
        learning rate in :func:`adam_jax.mars`).
      weight_decay_1d: :math:`\lambda_{1d}` of the AdamW params, likewise (scaled by ``lr_1d`` in
        :func:`adam_jax.mars`; the authors' default 0.1 decays them even when ``weight_decay`` is
        0).
      eps_placement: ``"standard"`` (the authors', :math:`\sqrt{\hat v_t} + \epsilon`) or
        ``"keras"`` (:math:`(\sqrt{v_t} + \epsilon)/\sqrt{1-\beta_2^t}`).
      correct_first_step: the first correction uses :math:`g_0 = 0` (the authors'); False:
        :math:`\tilde c_1 = g_1`.
      only_2d: with ``optimize_1d=False``, MARS for 2-D params alone (the authors'); False: for
        every param of 2 dimensions or more.
      mu_dtype: storage of the first moment (``None``: the params' dtype; a dtype; or a
        :class:`adam_jax.MomentStorage`).
      nu_dtype: storage of the second moment and its maximum, as ``mu_dtype`` (``None``: the params'
        dtype, float32 for float16 params, whose smallest normal the second moment of the clipped
        :math:`c_t`, of order :math:`1/\text{size}`, falls below).
      mask: which leaves to decay (a tree of bools or a callable of the params).

    Returns:
      An ``optax.GradientTransformation`` with state :class:`ScaleByMarsState` (an
      ``optax.GradientTransformationExtraArgs`` taking ``last_grad`` with
      ``is_approx=False``); ``update`` needs params where a decay is not 0.

    Example:
      >>> import adam_jax, jax.numpy as jnp
      >>> tx = adam_jax.scale_by_mars(weight_decay_1d=0.0)
      >>> updates, state = tx.update(jnp.array([[0.6, 0.8]]), tx.init(jnp.zeros((1, 2))))
      >>> # c = (1 + 0.025 * 0.95 / 0.05) g has norm 1.475: clipped to norm 1, c = g
      >>> print(jnp.round(state.mu, 4))
      [[0.03 0.04]]
    """
    return _scale_by_mars(
        MarsRule(
            b1=b1,
            b2=b2,
            eps=eps,
            gamma=gamma,
            mars_type=mars_type,
            is_approx=is_approx,
            amsgrad=amsgrad,
            optimize_1d=optimize_1d,
            b1_1d=b1_1d,
            b2_1d=b2_1d,
            weight_decay=weight_decay,
            weight_decay_1d=weight_decay_1d,
            eps_placement=eps_placement,
            correct_first_step=correct_first_step,
            only_2d=only_2d,
            mu_dtype=mu_dtype,
            nu_dtype=nu_dtype,
        ),
        mask=mask,
    )


def mars(
    learning_rate: optax.ScalarOrSchedule,
    b1: float | jax.Array = 0.95,
    b2: float | jax.Array = 0.99,
    eps: float | jax.Array = 1e-8,
    *,
    gamma: float | jax.Array = 0.025,
    mars_type: str = "mars-adamw",
    is_approx: bool = True,
    amsgrad: bool = False,
    optimize_1d: bool = False,
    lr_1d: optax.ScalarOrSchedule | None = None,
    b1_1d: float | jax.Array = 0.9,
    b2_1d: float | jax.Array = 0.95,
    weight_decay: optax.ScalarOrSchedule = 0.0,
    weight_decay_1d: optax.ScalarOrSchedule = 0.1,
    eps_placement: str = "standard",
    correct_first_step: bool = True,
    only_2d: bool = True,
    mu_dtype: Any = None,
    nu_dtype: Any = None,
    mask: Mask | None = None,
    maximize: bool = False,
) -> optax.GradientTransformation:
    r"""MARS (Yuan et al., 2024), as the authors' ``MARS`` with ``mars_type="mars-adamw"``.

    With :math:`u_t` of :func:`adam_jax.scale_by_mars` (decay included) and :math:`\alpha_t`
    the learning rate of the 0-based step :math:`t-1`:

    .. math::
        \theta_t = \theta_{t-1} - \alpha_t u_t

    for the MARS params (the 2-D ones, or all with ``optimize_1d=True``), and
    :math:`\theta_t = \theta_{t-1} - \alpha_{1d,t} u_t` with AdamW's :math:`u_t` for the
    others; the decays are scaled by the rates, as AdamW's (the authors'
    ``p += -lr * (wd * p + m / denom)``). The defaults are the authors' (``betas=(0.95,
    0.99)``, ``gamma=0.025``, ``betas_1d=(0.9, 0.95)``, ``weight_decay_1d=0.1``,
    ``is_approx=True``, ``optimize_1d=False``).

    Here ``lr_1d`` is the 1-D rate itself, a constant or a schedule (``None``: the learning
    rate, the authors' default ``lr_1d == lr``). Where the authors' code differs: its 1-D rate
    is ``lr * lr_1d / lr0`` (``lr0`` the constructor's rate, ``lr`` the scheduled one), the
    same under a constant rate, and ``lr_1d=lambda t: schedule(t) * lr_1d / lr0`` follows a
    schedule as theirs does.

    Args:
      learning_rate: a constant >= 0 or a schedule of the 0-based step.
      b1: decay of the first moment, in [0, 1).
      b2: decay of the second moment, in [0, 1).
      eps: added to the denominator outside the square root, >= 0.
      gamma: weight of the gradient correction, >= 0 (0: AdamW on per-tensor clipped gradients).
      mars_type: ``"mars-adamw"``; the authors' ``"mars-lion"`` and ``"mars-shampoo"`` are not built
        and raise a ``ValueError``.
      is_approx: :math:`g_{t-1}` from the previous step (True) or passed as ``last_grad``.
      amsgrad: use the running maximum of the second moment.
      optimize_1d: train every param with MARS (else the params that are not 2-D with AdamW).
      lr_1d: :math:`\alpha_{1d}`, the rate of the AdamW params (a constant >= 0 or a schedule;
        ``None``: the learning rate).
      b1_1d: AdamW's decay of the first moment for the params that are not 2-D, in [0, 1).
      b2_1d: AdamW's decay of the second moment for the params that are not 2-D, in [0, 1).
      weight_decay: :math:`\lambda` of the MARS params, a constant >= 0 or a schedule (scaled by the
        learning rate in :func:`adam_jax.mars`).
      weight_decay_1d: :math:`\lambda_{1d}` of the AdamW params, likewise (scaled by ``lr_1d`` in
        :func:`adam_jax.mars`; the authors' default 0.1 decays them even when ``weight_decay`` is
        0).
      eps_placement: ``"standard"`` (the authors', :math:`\sqrt{\hat v_t} + \epsilon`) or
        ``"keras"`` (:math:`(\sqrt{v_t} + \epsilon)/\sqrt{1-\beta_2^t}`).
      correct_first_step: the first correction uses :math:`g_0 = 0` (the authors'); False:
        :math:`\tilde c_1 = g_1`.
      only_2d: with ``optimize_1d=False``, MARS for 2-D params alone (the authors'); False: for
        every param of 2 dimensions or more.
      mu_dtype: storage of the first moment (``None``: the params' dtype; a dtype; or a
        :class:`adam_jax.MomentStorage`).
      nu_dtype: storage of the second moment and its maximum, as ``mu_dtype`` (``None``: the params'
        dtype, float32 for float16 params, whose smallest normal the second moment of the clipped
        :math:`c_t`, of order :math:`1/\text{size}`, falls below).
      mask: which leaves to decay (a tree of bools or a callable of the params).
      maximize: ascend the objective instead of descending (PyTorch's ``maximize``).

    Returns:
      An ``optax.GradientTransformation`` (a chain; with ``is_approx=False`` its ``update``
      takes ``last_grad=``, the gradient of this step's batch at the previous params).

    References:
      Yuan, Liu, Wu, Zhou and Gu, `MARS: Unleashing the Power of Variance Reduction for
      Training Large Models <https://arxiv.org/abs/2411.10438>`_, 2024; the authors' code,
      https://github.com/AGI-Arena/MARS (``MARS/optimizers/mars.py``).

    Example:
      >>> import adam_jax, jax.numpy as jnp
      >>> params = {"w": jnp.ones((2, 2)), "b": jnp.ones(2)}
      >>> tx = adam_jax.mars(0.1, weight_decay_1d=0.0)
      >>> grads = {"w": jnp.full((2, 2), 0.1), "b": jnp.full(2, 0.1)}
      >>> updates, _ = tx.update(grads, tx.init(params), params)
      >>> print(jnp.round(updates["w"][0], 4), jnp.round(updates["b"], 4))
      [-0.1 -0.1] [-0.1 -0.1]
    """
    return _mars(
        MarsRule(
            learning_rate=learning_rate,
            b1=b1,
            b2=b2,
            eps=eps,
            gamma=gamma,
            mars_type=mars_type,
            is_approx=is_approx,
            amsgrad=amsgrad,
            optimize_1d=optimize_1d,
            lr_1d=lr_1d,
            b1_1d=b1_1d,
            b2_1d=b2_1d,
            weight_decay=weight_decay,
            weight_decay_1d=weight_decay_1d,
            eps_placement=eps_placement,
            correct_first_step=correct_first_step,
            only_2d=only_2d,
            mu_dtype=mu_dtype,
            nu_dtype=nu_dtype,
        ),
        mask=mask,
        maximize=maximize,
    )


REGISTRY_ROWS = (
    OptimizerInfo(
        name="mars",
        alias=mars,
        group="variant",
        summary=(
            "AdamW on a variance-reduced gradient (a scaled change of the gradient added), "
            "clipped to norm 1 per tensor"
        ),
        paper=Paper(
            authors="Yuan, Liu, Wu, Zhou and Gu",
            title="MARS: Unleashing the Power of Variance Reduction for Training Large Models",
            url="https://arxiv.org/abs/2411.10438",
            venue="2024",
        ),
        transformation=scale_by_mars,
        rule=MarsRule,
        # The default rate (3e-3): the authors' default, not tuned on the MNIST example.
        companions=("ScaleByMarsState",),
    ),
)
