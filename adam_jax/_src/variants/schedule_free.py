r"""Schedule-Free AdamW: no learning-rate schedule, an average of the iterates instead.

Defazio et al. (2024) replace the decaying schedule by averaging: the optimizer keeps the base
sequence :math:`z_t` of AdamW steps (without momentum) and evaluates gradients at
:math:`y_t = (1-\beta_1) z_t + \beta_1 x_t`, an interpolation with the running average
:math:`x_t` of the :math:`z`'s, which is the point to evaluate and keep. Only :math:`z` is
stored besides the second moment: the params hold :math:`y` during training and
:func:`schedule_free_eval_params` recovers :math:`x` from them.
"""

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
import optax.contrib

from adam_jax import rules
from adam_jax.rules import (
    Leaf,
    Mask,
    Moment,
    MomentRule,
    OptimizerInfo,
    Paper,
    abs_sq,
    ascent,
    compute_dtype,
    moving_average,
    moving_average_terms,
    on_device,
    real_dtype,
    scale_by_rule,
    schedule_state_type,
    second_moment,
)

ScheduleFreeState = optax.contrib.ScheduleFreeState


@functools.cache
def _rms_state_type() -> type:
    """optax's state of ``scale_by_rms(bias_correction=True)``: a step count and ``nu``. optax
    does not export the type, so it is read off optax's own transformation on first use."""
    return type(optax.scale_by_rms(eps_in_sqrt=False, bias_correction=True).init({}))


def _state_scalar_dtype(params: Any) -> Any:
    """The dtype of the state's scalars: optax's (the lowest dtype of the params), at least
    float32 (a bfloat16 ``weight_sum`` stops growing after a few hundred steps)."""
    if not jax.tree.leaves(params):
        return jnp.float32
    return real_dtype(compute_dtype(optax.tree.dtype(params, "lowest")))


class ScheduleFreeScalars(NamedTuple):
    """One step's scalars: the learning rate (warmed up), the averaging weight
    :math:`c_{t+1}`, the second moment's weight and correction."""

    lr: jax.Array
    average_weight: jax.Array
    w2: Any
    c2: jax.Array


def _check_warmup(name: str, value: Any) -> None:
    if value is not None:
        rules.check_steps(name, value)


def _check_interpolation(name: str, value: Any) -> None:
    number = rules.static_float(value)
    if number is not None and not 0.0 < number < 1.0:
        raise ValueError(f"{name} must be in (0, 1) (x = y + (1 - 1/b1)(z - y)), got {value!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ScheduleFreeAdamwRule(MomentRule):
    """Schedule-Free AdamW's rule: see :func:`schedule_free_adamw`."""

    learning_rate: optax.ScalarOrSchedule = rules.learning_rate(0.0025)
    warmup_steps: int | None = rules.hyperparam(
        None, "length of the linear warm-up, an integer >= 0 (``None`` or 0: none).", _check_warmup
    )
    b1: Any = rules.hyperparam(
        0.9,
        r"interpolation of :math:`y` between :math:`z` and :math:`x`, in (0, 1).",
        _check_interpolation,
    )
    b2: Any = rules.b2()
    eps: Any = rules.eps()
    weight_lr_power: Any = rules.hyperparam(
        2.0,
        ":math:`p`, the power of the largest learning rate so far in the averaging weights, >= 0.",
        rules.check_non_negative,
    )
    r: Any = rules.hyperparam(
        0.0,
        ":math:`r`, the power of the step in the averaging weights (0: uniform), >= 0.",
        rules.check_non_negative,
    )
    form: str = rules.hyperparam(
        "recommended",
        '``"recommended"`` (the authors\' ``AdamWScheduleFree``) or ``"paper"`` (Algorithm 1).',
        rules.choice("recommended", "paper"),
    )
    state_dtype: Any = rules.hyperparam(
        None,
        r"storage of :math:`z` (``None``: the params' dtype; a dtype; or a "
        ":class:`adam_jax.MomentStorage`).",
    )
    nu_dtype: Any = rules.nu_dtype()
    scheduled_decay: bool = False  # the weight decay is a schedule: the state counts its steps

    state_type = ScheduleFreeState
    uses_params = True

    def moments(self) -> tuple[Moment, ...]:
        return (Moment("z", self.state_dtype, from_params=True), second_moment(self.nu_dtype))

    def _lr_is_scheduled(self) -> bool:
        return self.warmup_steps is not None or callable(self.learning_rate)

    def init_fields(self, params: Any) -> dict[str, Any]:
        dtype = _state_scalar_dtype(params)

        def zero() -> jax.Array:  # one buffer per counter: a donated state must not alias
            return jnp.zeros([], jnp.int32)

        return {
            "b1": jnp.asarray(self.b1, dtype),
            "weight_sum": jnp.zeros([], dtype),
            "step_count": jnp.ones([], jnp.int32),
            "max_lr": jnp.zeros([], dtype),
            # optax's base optimizer counts its steps three times: scale_by_rms, the decay
            # schedule and the learning-rate schedule (the last two only where scheduled).
            "rms_count": zero(),
            **({"decay_count": zero()} if self.scheduled_decay else {}),
            **({"lr_count": zero()} if self._lr_is_scheduled() else {}),
        }

    def next_fields(self, fields: dict[str, Any]) -> dict[str, Any]:
        lr, max_lr, weight = self._averaging(fields)
        counts = {k: optax.safe_increment(v) for k, v in fields.items() if k.endswith("count")}
        return {**fields, **counts, "weight_sum": fields["weight_sum"] + weight, "max_lr": max_lr}

    def step_index(self, fields: dict[str, Any]) -> Any:
        return fields["step_count"] - 1

    def _learning_rate(self, fields: dict[str, Any], dtype: Any) -> jax.Array:
        """The warmed-up learning rate of this step (the paper's form: times
        :math:`\\sqrt{1 - \\beta_2^{k+1}}`)."""
        k = self.step_index(fields)
        lr = self.rate(fields, dtype)
        if self.warmup_steps:
            lr = lr * jnp.minimum((k + 1).astype(dtype) / self.warmup_steps, 1.0)
        if self.form == "paper":
            lr = lr * jnp.sqrt(moving_average_terms(self.b2, k + 1, dtype)[1])
        return lr

    def _averaging(self, fields: dict[str, Any]) -> tuple[jax.Array, jax.Array, jax.Array]:
        """The learning rate, its running maximum and this step's averaging weight
        :math:`(k+1)^r \\max_{j \\leq k} \\gamma_j^{p}`, in the state's dtype."""
        dtype = fields["weight_sum"].dtype
        lr = self._learning_rate(fields, dtype)
        max_lr = jnp.maximum(fields["max_lr"], lr)
        weight = max_lr**self.weight_lr_power
        if rules.static_float(self.r) != 0.0:
            weight = fields["step_count"].astype(dtype) ** self.r * weight
        return lr, max_lr, weight

    def scalars(self, fields: dict[str, Any], dtype: Any) -> ScheduleFreeScalars:
        _, _, weight = self._averaging(fields)
        weight_sum = fields["weight_sum"] + weight
        average_weight = jnp.where(weight_sum == 0, 0.0, weight / weight_sum).astype(dtype)
        w2, c2 = moving_average_terms(self.b2, fields["step_count"], dtype)
        return ScheduleFreeScalars(self._learning_rate(fields, dtype), average_weight, w2, c2)

    def update(
        self, g: jax.Array, moments: dict[str, jax.Array], scalars: Any, leaf: Leaf
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        d = scalars
        y, z = leaf.param, moments["z"]
        assert y is not None  # uses_params: the core passes the params
        nu = moving_average(moments["nu"], abs_sq(g), d.w2)
        settled = leaf.settle("nu", nu)
        nu_hat = settled if self.form == "paper" else settled / d.c2
        normalized = leaf.add_decay(g / (jnp.sqrt(nu_hat) + self.eps))
        # The authors' y <- lerp(y, z, c) + lr (b1 (1 - c) - 1) gn, written with the new z
        # (z - lr gn): the old z is then dead once the new one is written, which spares XLA a
        # copy of it (the new z overwrites its donated buffer).
        c = d.average_weight
        z = z - d.lr * normalized
        update = c * (z - y) - d.lr * (1 - self.b1) * (1 - c) * normalized
        return update, {"z": z, "nu": nu}

    def to_state(self, fields: dict[str, Any]) -> Any:
        empty = optax.EmptyState()
        base = (
            _rms_state_type()(count=fields["rms_count"], nu=fields["nu"]),
            schedule_state_type()(count=fields["decay_count"]) if self.scheduled_decay else empty,
            optax.ScaleByScheduleState(count=fields["lr_count"]) if "lr_count" in fields else empty,
        )
        return ScheduleFreeState(
            b1=fields["b1"],
            weight_sum=fields["weight_sum"],
            step_count=fields["step_count"],
            max_lr=fields["max_lr"],
            base_optimizer_state=base,
            z=fields["z"],
        )

    def from_state(self, state: Any) -> dict[str, Any]:
        rms, decay, lr = state.base_optimizer_state
        fields = {
            "b1": state.b1,
            "weight_sum": state.weight_sum,
            "step_count": state.step_count,
            "max_lr": state.max_lr,
            "rms_count": rms.count,
            "nu": rms.nu,
            "z": state.z,
        }
        if self.scheduled_decay:
            fields["decay_count"] = decay.count
        if self._lr_is_scheduled():
            fields["lr_count"] = lr.count
        return fields


def _schedule_free_adamw(
    rule: ScheduleFreeAdamwRule, *, weight_decay: Any, mask: Mask | None, maximize: bool
) -> optax.GradientTransformation:
    rule = dataclasses.replace(rule, scheduled_decay=callable(weight_decay))
    transform = scale_by_rule(rule, weight_decay=weight_decay, mask=mask)
    if maximize:
        return optax.chain(*ascent(maximize), transform)
    return optax.with_extra_args_support(transform)  # as optax's, which is not a chain


def schedule_free_adamw(
    learning_rate: optax.ScalarOrSchedule = 0.0025,
    warmup_steps: int | None = None,
    b1: float | jax.Array = 0.9,
    b2: float | jax.Array = 0.999,
    eps: float | jax.Array = 1e-8,
    weight_decay: optax.ScalarOrSchedule = 0.0,
    weight_lr_power: float | jax.Array = 2.0,
    state_dtype: Any = None,
    *,
    r: float | jax.Array = 0.0,
    form: str = "recommended",
    nu_dtype: Any = None,
    mask: Mask | None = None,
    maximize: bool = False,
) -> optax.GradientTransformation:
    r"""Schedule-Free AdamW (Defazio et al., 2024), as the authors' ``AdamWScheduleFree``.

    The params hold :math:`y`; with :math:`k` the 0-based step, :math:`\gamma_k` the learning
    rate warmed up linearly over ``warmup_steps`` (:math:`\gamma (k+1)/T` for :math:`k < T`),
    and :math:`c_{k+1} = w_k / \sum_{j \leq k} w_j` with :math:`w_k = (k+1)^r
    (\max_{j \leq k}\gamma_j)^p`:

    .. math::
        v_k = \beta_2 v_{k-1} + (1-\beta_2) |g_k|^2, \qquad
        \tilde g_k = \frac{g_k}{\sqrt{v_k / (1-\beta_2^{k+1})} + \epsilon} + \lambda y_k, \\
        y_{k+1} = (1 - c_{k+1})\, y_k + c_{k+1} z_k + \gamma_k (\beta_1 (1 - c_{k+1}) - 1)\,
        \tilde g_k, \qquad
        z_{k+1} = z_k - \gamma_k \tilde g_k,

    the authors' update of :math:`y` itself, which equals :math:`y = (1-\beta_1) z + \beta_1 x`
    with :math:`x_{k+1} = (1 - c_{k+1}) x_k + c_{k+1} z_{k+1}`. Evaluate (and checkpoint for
    evaluation) :math:`x = ` :func:`schedule_free_eval_params` ``(state, params)``.

    ``form="paper"`` is the paper's Algorithm 1 (the authors' ``AdamWScheduleFreePaper``): no
    bias correction of :math:`v_k`, whose factor :math:`\sqrt{1-\beta_2^{k+1}}` multiplies the
    learning rate instead (and so the decay, the averaging weights and :math:`y`'s step).

    The decay :math:`\lambda` is evaluated at :math:`y`. A schedule as ``learning_rate`` is
    evaluated at :math:`k` (as PyTorch's ``LambdaLR`` on the authors' optimizer would set it).
    A drop-in for ``optax.contrib.schedule_free_adamw`` (same arguments, defaults and state
    ``optax.contrib.ScheduleFreeState``, nesting included, except that its scalars are at least
    float32) that follows the authors where optax departs from them.

    Args:
      learning_rate: a constant >= 0 or a schedule of the 0-based step.
      warmup_steps: length of the linear warm-up, an integer >= 0 (``None`` or 0: none).
      b1: interpolation of :math:`y` between :math:`z` and :math:`x`, in (0, 1).
      b2: decay of the second moment, in [0, 1).
      eps: added to the denominator outside the square root, >= 0.
      weight_lr_power: :math:`p`, the power of the largest learning rate so far in the averaging
        weights, >= 0.
      r: :math:`r`, the power of the step in the averaging weights (0: uniform), >= 0.
      form: ``"recommended"`` (the authors' ``AdamWScheduleFree``) or ``"paper"`` (Algorithm 1).
      state_dtype: storage of :math:`z` (``None``: the params' dtype; a dtype; or a
        :class:`adam_jax.MomentStorage`).
      nu_dtype: storage of the second moment, as ``mu_dtype``.
      weight_decay: decoupled weight decay :math:`\lambda`, a constant >= 0 or a schedule of the
        step.
      mask: which leaves to decay (a tree of bools or a callable of the params).
      maximize: ascend the objective instead of descending (PyTorch's ``maximize``).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with state
      ``optax.contrib.ScheduleFreeState`` (in a chain after ``optax.scale(-1)`` with
      ``maximize=True``); ``update`` needs params.

    References:
      Defazio, Yang, Mehta, Mishchenko, Khaled and Cutkosky, `The Road Less Scheduled
      <https://arxiv.org/abs/2405.15682>`_, NeurIPS 2024; the authors' code,
      https://github.com/facebookresearch/schedule_free.

    Example:
      >>> import adam_jax, jax, jax.numpy as jnp, optax
      >>> params = {"w": jnp.zeros(3)}
      >>> loss = lambda p: jnp.sum((p["w"] - 1.0) ** 2)
      >>> tx = adam_jax.schedule_free_adamw(0.05, warmup_steps=20)
      >>> state = tx.init(params)
      >>> for _ in range(300):
      ...     updates, state = tx.update(jax.grad(loss)(params), state, params)
      ...     params = optax.apply_updates(params, updates)
      >>> x = adam_jax.schedule_free_eval_params(state, params)
      >>> print(jnp.round(x["w"], 2))
      [1. 1. 1.]
    """
    return _schedule_free_adamw(
        ScheduleFreeAdamwRule(
            learning_rate=learning_rate,
            warmup_steps=warmup_steps,
            b1=b1,
            b2=b2,
            eps=eps,
            weight_lr_power=weight_lr_power,
            state_dtype=state_dtype,
            r=r,
            form=form,
            nu_dtype=nu_dtype,
        ),
        weight_decay=weight_decay,
        mask=mask,
        maximize=maximize,
    )


def _find_state(state: Any) -> Any:
    found = [
        node
        for node in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, ScheduleFreeState))
        if isinstance(node, ScheduleFreeState)
    ]
    if len(found) != 1:
        raise ValueError(
            "schedule_free_eval_params needs a state holding exactly one ScheduleFreeState, "
            f"found {len(found)}"
        )
    return found[0]


def schedule_free_eval_params(state: Any, params: optax.Params) -> optax.Params:
    r"""The params to evaluate: :math:`x = y + (1 - 1/\beta_1)(z - y)` from the training
    params :math:`y` and the state's :math:`z`.

    This is what the authors' ``optimizer.eval()`` writes into the model, and the same as
    ``optax.contrib.schedule_free_eval_params`` (which computes :math:`(y - (1-\beta_1) z) /
    \beta_1`); ``state`` may be the whole state of a chain or wrapper that holds one
    ``ScheduleFreeState`` (``optax.MultiSteps``, ``optax.inject_hyperparams``, ...).

    Args:
      state: the optimizer state (or a tree holding exactly one ``ScheduleFreeState``).
      params: the training params :math:`y`.

    Returns:
      :math:`x`, with the params' structure and dtypes.

    Example:
      >>> import adam_jax, jax.numpy as jnp
      >>> tx = adam_jax.schedule_free_adamw(0.1)
      >>> params = jnp.zeros(2)
      >>> state = tx.init(params)
      >>> updates, state = tx.update(jnp.ones(2), state, params)
      >>> params = params + updates
      >>> print(params, adam_jax.schedule_free_eval_params(state, params))
      [-0.1 -0.1] [-0.1 -0.1]
    """
    found = _find_state(state)
    # Leaf by leaf: params and z may come wrapped differently (flax.nnx keeps params in Param
    # and the optimizer state in OptVariable containers), their leaves are the arrays.
    b1 = on_device(jnp.asarray(jax.tree.leaves(found.b1)[0]))
    treedef: Any = jax.tree.structure(params)  # its methods are untyped in jax's stubs
    ys, zs = jax.tree.leaves(params), jax.tree.leaves(found.z)
    if len(ys) != len(zs):
        raise ValueError(f"params have {len(ys)} leaves, the state's z has {len(zs)}")

    def evaluate(y: jax.Array, z: jax.Array) -> jax.Array:
        z = on_device(z)  # adam_jax.offload_state keeps it in host memory
        dtype = compute_dtype(jnp.result_type(y, z))
        weight = 1 - 1 / b1.astype(real_dtype(dtype))
        y_c = y.astype(dtype)
        return (y_c + weight * (z.astype(dtype) - y_c)).astype(y.dtype)

    return treedef.unflatten([evaluate(y, z) for y, z in zip(ys, zs, strict=True)])


REGISTRY_ROWS = (
    OptimizerInfo(
        name="schedule_free_adamw",
        alias=schedule_free_adamw,
        group="variant",
        summary="averaging of the iterates in place of a learning-rate decay",
        paper=Paper(
            authors="Defazio, Yang, Mehta, Mishchenko, Khaled and Cutkosky",
            title="The Road Less Scheduled",
            url="https://arxiv.org/abs/2405.15682",
            venue="NeurIPS 2024",
        ),
        rule=ScheduleFreeAdamwRule,
        optax_name="optax.contrib.schedule_free_adamw",
        schedule_free=True,
        companions=("schedule_free_eval_params",),
    ),
)
