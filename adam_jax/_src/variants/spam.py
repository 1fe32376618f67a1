r"""SPAM: spike-aware Adam with momentum reset (Huang et al., 2025).

Gradient spikes (entries hundreds of times their usual size) linger in Adam's moments for
about :math:`1/(1-\beta_2)` steps. SPAM resets both moments to zero every :math:`\Delta T`
steps, warms the step size up again after each reset along a cosine, and clips each entry
whose square exceeds ``threshold`` times its second moment to the root of that bound, with the
entry's sign.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from adam_jax import rules
from adam_jax.rules import (
    AdamLikeRule,
    FlatParams,
    Leaf,
    Mask,
    Moment,
    MomentStorage,
    OptimizerInfo,
    Paper,
    StepScalars,
    abs_sq,
    ascent,
    branch,
    expand_mask,
    moving_average,
    per_leaf,
    raw_key,
    real_dtype,
    replicated,
    replicated_placement,
    reshard,
    scale_by_rule,
    second_moment,
    step_scalars,
    storages_for,
    typed_sharding,
)

#: The authors' ``CosineDecay(0.99, warmup_steps)``: the rate right after a reset is 1% of
#: the full one.
_DEATH_RATE = 0.99


class ScaleBySpamState(NamedTuple):
    """State of SPAM with sparse moments (``density`` set).

    Attributes:
      count: the steps taken.
      mu, nu: the moments; of a sparse leaf only its sampled entries, as a vector.
      entries: of each sparse leaf, the flat indices of its sampled entries in increasing
        order (drawn at the first step and at each reset); ``optax.MaskedNode()`` for the
        other leaves.
      key: the raw ``jax.random`` key the entries are drawn from (with the reset's number and
        the leaf's place folded in).
    """

    count: jax.Array  # type: ignore[assignment]  # (optax states name it so too)
    mu: optax.Updates
    nu: optax.Updates
    entries: Any
    key: jax.Array


class SpamScalars(NamedTuple):
    """One step's scalars: Adam's weights and bias corrections (at the step count, which the
    resets leave running), whether the moments restart from zero, whether spikes are clipped,
    the warm-up factor of the step and the learning rate; with sparse moments, whether the
    sampled entries are drawn anew, the number of the draw and the key (else ``None``)."""

    adam: StepScalars
    reset: jax.Array
    clip: jax.Array
    scale: jax.Array
    lr: jax.Array
    draw: jax.Array | None = None
    epoch: jax.Array | None = None
    key: jax.Array | None = None


def sampled_count(size: int, density: Any) -> int:
    """The number of sampled entries of a sparse leaf of ``size`` entries: the authors'
    ``int(density * size)``; ``density`` must be concrete (it sets the state's shapes)."""
    number = rules.static_float(density)
    if number is None:
        raise ValueError(
            "density sets the shapes of SPAM's state, so it must be a concrete number when "
            "the state is made (with optax.inject_hyperparams, pass static_args=('density',))"
        )
    return int(number * size)


def sample_entries(key: jax.Array, size: int, count: int) -> jax.Array:
    """``count`` distinct flat indices of ``size`` entries drawn uniformly at random (as the
    authors' ``torch.randperm(size)[:count]``), in increasing order.

    They are the entries of the ``count`` smallest of ``size`` random 32-bit draws (equal draws
    go to the lower index), found without sorting: 32 counting passes bisect for the threshold
    (a random permutation sorts the entries several times over).
    """
    bits = jax.random.bits(key, (size,), jnp.uint32)

    def halve(_: Any, bounds: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        low, high = bounds  # the threshold lies in [low, high]
        middle = low + (high - low) // 2
        enough = jnp.sum(bits <= middle, dtype=jnp.int32) >= count
        return jnp.where(enough, low, middle + 1), jnp.where(enough, middle, high)

    top = jnp.asarray(jnp.iinfo(jnp.uint32).max, jnp.uint32)
    _, threshold = jax.lax.fori_loop(0, 32, halve, (jnp.zeros([], jnp.uint32), top))
    below = jnp.sum(bits < threshold, dtype=jnp.int32)
    tied = bits == threshold
    taken = (bits < threshold) | (tied & (jnp.cumsum(tied, dtype=jnp.int32) <= count - below))
    return jnp.nonzero(taken, size=count)[0].astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class SampledStorage(MomentStorage):
    """A moment of a sparse leaf: the values at its sampled entries, a vector kept by
    ``inner``, whole (replicated) where the param is sharded."""

    inner: MomentStorage
    density: Any

    def init(self, param: Any) -> Any:
        count = sampled_count(math.prod(param.shape), self.density)
        sampled = jax.ShapeDtypeStruct((count,), param.dtype, sharding=replicated_placement(param))
        return self.inner.init(sampled)

    def load(self, stored: Any) -> jax.Array:
        return self.inner.load(stored)

    def store(self, value: jax.Array, stored: Any) -> Any:
        return self.inner.store(value, stored)

    def decodes(self, stored: Any) -> bool:
        return self.inner.decodes(stored)


@dataclasses.dataclass(frozen=True)
class EntriesStorage(MomentStorage):
    """The sampled entries of a sparse leaf: ``int32`` flat indices, whole where the param is
    sharded; for a dense leaf (``density=None``) nothing, ``optax.MaskedNode()``."""

    density: Any

    def init(self, param: Any) -> Any:
        if self.density is None:
            return optax.MaskedNode()
        count = sampled_count(math.prod(param.shape), self.density)
        return jnp.zeros((count,), jnp.int32, device=replicated_placement(param))

    def load(self, stored: Any) -> Any:
        return stored

    def store(self, value: Any, stored: Any) -> Any:
        return value


def warmup_scale(count: Any, delta_t: Any, warmup_steps: Any, dtype: Any = jnp.float32) -> Any:
    r"""The authors' factor of the step size at the 0-based step ``count``: after the reset of
    step :math:`j \geq 1` (:math:`(j+1) \bmod \Delta T = 0`), :math:`c = k - j` steps later,

    .. math:: s_k = 1 - 0.99\,\frac{1 + \cos(\pi c / (W + 1))}{2} \quad (c < W),

    and 1 otherwise (before the first such reset, or :math:`W` steps after it)."""
    t = count + 1
    since = t % delta_t  # steps since the last reset
    started = (t - since) >= 2  # a reset at a step j >= 1 (the authors' current_step = 0)
    warming = started & (since < warmup_steps)
    angle = jnp.pi * since.astype(dtype) / (jnp.asarray(warmup_steps).astype(dtype) + 1)
    return jnp.where(warming, 1 - _DEATH_RATE * (1 + jnp.cos(angle)) / 2, 1.0).astype(dtype)


def _check_density(name: str, value: Any) -> None:
    number = rules.static_float(value)
    if isinstance(value, bool) or (number is not None and not 0.0 < number <= 1.0):
        raise ValueError(f"{name} must be in (0, 1] (or None: dense moments), got {value!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class SpamRule(AdamLikeRule):
    """SPAM's moment rule: see :func:`scale_by_spam` (``learning_rate=None``: the direction)
    and :func:`spam` (a learning rate: the whole step, decay included)."""

    learning_rate: optax.ScalarOrSchedule | None = rules.learning_rate()
    b1: Any = rules.b1()
    b2: Any = rules.b2()
    eps: Any = rules.hyperparam(
        1e-6,
        r"added to :math:`\sqrt{v_t}`, >= 0 (the authors' default 1e-6).",
        rules.check_non_negative,
    )
    threshold: Any = rules.hyperparam(
        5000.0,
        r":math:`\theta`, the spike bound as a multiple of the second moment, >= 0 (0: no "
        "clipping).",
        rules.check_non_negative,
    )
    delta_t: Any = rules.hyperparam(
        500,
        r":math:`\Delta T`, steps between momentum resets, an integer >= 1 (the authors' "
        "``DeltaT``).",
        rules.integer(1),
    )
    warmup_steps: Any = rules.hyperparam(
        150,
        ":math:`W`, steps of the cosine warm-up after a reset, an integer >= 0 (the authors' "
        "``warmup_steps``, ``--warmup_epoch`` on their command line).",
        rules.integer(0),
    )
    grad_accu_steps: Any = rules.hyperparam(
        20,
        ":math:`A`, steps after a reset (and after the start) before spikes are clipped, an "
        "integer >= 0.",
        rules.integer(0),
    )
    correct_bias: bool = rules.hyperparam(
        True, r"scale by :math:`\sqrt{1-\beta_2^t}/(1-\beta_1^t)`."
    )
    mu_dtype: Any = rules.hyperparam(
        None,
        "storage of the first moment (``None``: the params' dtype; a dtype; or a "
        ":class:`adam_jax.MomentStorage`; of a sparse leaf, its vector of sampled entries: "
        "not a reducing storage).",
    )
    nu_dtype: Any = rules.nu_dtype()
    density: Any = rules.hyperparam(
        None,
        "sparse moments (the authors' ``density`` groups): each sparse leaf keeps moments for "
        "``int(density * size)`` of its entries, drawn at random at the first step and anew "
        "at each reset, and only those entries move; in (0, 1], or ``None`` (dense moments, "
        "the default). It sets the state's shapes, so ``optax.inject_hyperparams`` needs it "
        "in ``static_args`` under a jitted ``init``.",
        _check_density,
    )
    sparse_leaves: Any = rules.hyperparam(
        None,
        "which leaves are sparse (a tree of bools or a callable of the params, depending on "
        "their structure and shapes only); ``None``: every matrix (2-D leaf).",
    )
    key: Any = rules.hyperparam(
        0, "the ``jax.random`` key (or an int seed) the sampled entries are drawn from."
    )

    @property
    def state_type(self) -> type:
        return optax.ScaleByAdamState if self.density is None else ScaleBySpamState

    def moments(self) -> tuple[Moment, ...]:
        if self.density is None:
            return super().moments()
        return (
            Moment("mu", self._sparse(self.mu_dtype, self._sampled)),
            second_moment(self._sparse(self.nu_dtype, self._sampled)),
            Moment("entries", self._sparse(EntriesStorage(None), self._entries), cast=False),
        )

    def _sampled(self, inner: MomentStorage) -> MomentStorage:
        if inner.reduces or inner.per_tensor:
            raise ValueError(
                f"a sparse leaf of spam (density={self.density!r}) keeps its moments as a "
                f"vector of sampled entries, which {type(inner).__name__} cannot store "
                "(it reduces or needs the param's shape): store them by dtype or in 8-bit"
            )
        return SampledStorage(inner, self.density)

    def _entries(self, inner: MomentStorage) -> MomentStorage:
        del inner
        return EntriesStorage(self.density)

    def _sparse(self, spec: Any, sparse: Any) -> Any:
        """A per-leaf storage: ``spec``'s for dense leaves, ``sparse(spec's)`` for the sparse
        ones (every matrix unless ``sparse_leaves`` says which)."""

        def select(tree: Any) -> Any:
            leaves = jax.tree.leaves(tree)
            if self.sparse_leaves is None:
                flags = [len(getattr(x, "shape", ())) == 2 for x in leaves]
            else:
                flags = expand_mask(self.sparse_leaves, tree)
            chosen = [
                sparse(inner) if flag else inner
                for inner, flag in zip(storages_for(spec, tree), flags, strict=True)
            ]
            return jax.tree.unflatten(jax.tree.structure(tree), chosen)

        return per_leaf(select)

    def init_fields(self, params: Any) -> dict[str, Any]:
        fields = super().init_fields(params)
        if self.density is None:
            return fields
        if any(isinstance(x, FlatParams) for x in jax.tree.leaves(params, is_leaf=_is_flat)):
            raise ValueError(
                "spam with density needs each param in its own shape (its sampled entries): "
                "FlatParams buffers are not supported"
            )
        # A copy: the state must not alias a key array the caller keeps (donation).
        return {**fields, "key": jnp.array(raw_key(self.key))}

    def scalars(self, fields: dict[str, Any], dtype: Any) -> SpamScalars:
        count = fields["count"]
        t = optax.safe_increment(count)
        since = t % self.delta_t
        clip = (jnp.asarray(self.threshold) != 0) & (t >= self.grad_accu_steps)
        clip = clip & (since >= self.grad_accu_steps)
        lr = self.rate(fields, dtype)
        scalars = SpamScalars(
            step_scalars(self.b1, self.b2, t)(dtype),
            since == 0,
            clip,
            warmup_scale(count, self.delta_t, self.warmup_steps, dtype),
            lr,
        )
        if self.density is None:
            return scalars
        # The entries are drawn at the first step and again at each reset of a later step
        # (the authors redraw their masks at the end of the step before).
        draw = (t == 1) | ((since == 0) & (t >= 2))
        epoch = jnp.where(t == 1, 0, t // self.delta_t)
        return scalars._replace(draw=draw, epoch=epoch, key=replicated(fields["key"]))

    def update(
        self, g: jax.Array, moments: dict[str, jax.Array], scalars: SpamScalars, leaf: Leaf
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        entries = moments.get("entries")
        if entries is None or isinstance(entries, optax.MaskedNode):
            direction, new = self._direction(g, moments, scalars, leaf)
            if entries is not None:
                new["entries"] = entries
            return self._step(direction, leaf.param, scalars, leaf), new
        size = math.prod(g.shape)

        def draw() -> jax.Array:
            assert scalars.key is not None and scalars.epoch is not None
            assert leaf.position is not None
            key = jax.random.fold_in(jax.random.wrap_key_data(scalars.key), scalars.epoch)
            return sample_entries(jax.random.fold_in(key, leaf.position), size, entries.shape[0])

        assert scalars.draw is not None
        chosen = branch(scalars.draw, draw, lambda: replicated(entries))

        def sampled(x: jax.Array) -> jax.Array:
            flat = replicated(x).reshape(-1)
            return jnp.take(flat, chosen, indices_are_sorted=True, unique_indices=True)

        loaded = {name: replicated(moments[name]) for name in ("mu", "nu")}
        direction, new = self._direction(sampled(g), loaded, scalars, leaf)
        param = None if leaf.param is None else sampled(leaf.param)
        step = self._step(direction, param, scalars, leaf)
        full = (
            jnp.zeros(size, step.dtype)
            .at[chosen]
            .set(step, indices_are_sorted=True, unique_indices=True)
        )
        new = {name: reshard(new[name], typed_sharding(moments[name])) for name in new}
        new["entries"] = reshard(chosen, typed_sharding(entries))
        return reshard(full.reshape(g.shape), typed_sharding(g)), new

    def _direction(
        self, g: jax.Array, moments: dict[str, jax.Array], scalars: SpamScalars, leaf: Leaf
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """SPAM's direction :math:`u_t` and new moments from ``g`` and the moments (the whole
        leaf, or its sampled entries)."""
        d = scalars.adam
        rdtype = real_dtype(g.dtype)
        # The moments restart from zero at a reset: a select of the scalar 0, which XLA fuses
        # (of zeros_like it copied each moment at every step on CPU: 3x AdamW's step).
        mu = jnp.where(scalars.reset, 0.0, moments["mu"]).astype(moments["mu"].dtype)
        nu = jnp.where(scalars.reset, 0.0, moments["nu"]).astype(moments["nu"].dtype)
        if rules.static_float(self.threshold) != 0.0:
            g = _laid_out_like(g, mu, nu)
            bound = jnp.asarray(self.threshold).astype(rdtype) * nu
            if jnp.issubdtype(g.dtype, jnp.complexfloating):
                square = abs_sq(g)
                spike = scalars.clip & (square > bound)
                # g / |g| sqrt(bound) (|g| > 0 where it spikes).
                shrink = jnp.sqrt(bound / jnp.where(spike, square, 1.0))
                g = jnp.where(spike, g * shrink.astype(g.dtype), g)
            else:
                spike = scalars.clip & (jnp.square(g) > bound)
                g = jnp.where(spike, jnp.copysign(jnp.sqrt(bound), g), g)
        mu = moving_average(mu, g, d.w1)
        nu = moving_average(nu, abs_sq(g), d.w2)
        size = scalars.scale * (jnp.sqrt(d.c2) / d.c1 if self.correct_bias else 1.0)
        direction = leaf.settle("mu", mu) / (jnp.sqrt(leaf.settle("nu", nu)) + self.eps)
        return direction * size.astype(rdtype), {"mu": mu, "nu": nu}

    def _step(
        self, direction: jax.Array, param: jax.Array | None, scalars: SpamScalars, leaf: Leaf
    ) -> jax.Array:
        """The update from the direction: the bare direction without a learning rate, else
        the step and the decay of ``param`` (the leaf, or its sampled entries)."""
        if self.learning_rate is None:
            return direction
        # The authors' order: the step, then the stepped params shrink by lr * decay.
        return rules.step_with_rate(
            direction,
            scalars.lr,
            leaf,
            decay_after_step=True,
            decay_times_rate=True,
            param=param,
        )


def _is_flat(x: Any) -> bool:
    return isinstance(x, FlatParams)


def _laid_out_like(g: jax.Array, *moments: jax.Array) -> jax.Array:
    """``g`` with the typed sharding of a full moment (ZeRO-1 shards the state, not the
    gradient), so that it selects against the moments."""
    for moment in moments:
        typed = typed_sharding(moment)
        if moment.shape == g.shape and typed is not None:
            return jax.sharding.reshard(g, typed)
    return g


def scale_by_spam(
    b1: float | jax.Array = 0.9,
    b2: float | jax.Array = 0.999,
    eps: float | jax.Array = 1e-6,
    *,
    threshold: float | jax.Array = 5000.0,
    delta_t: int = 500,
    warmup_steps: int = 150,
    grad_accu_steps: int = 20,
    correct_bias: bool = True,
    mu_dtype: Any = None,
    nu_dtype: Any = None,
    density: float | None = None,
    sparse_leaves: Mask | None = None,
    key: int | jax.Array = 0,
) -> optax.GradientTransformation:
    r"""Rescales gradients by SPAM's moment estimates (Huang et al., 2025, Algorithm 1).

    At the 0-based step :math:`k` (:math:`t = k + 1`), the moments restart from zero where
    :math:`t \bmod \Delta T = 0`; then, where :math:`t \bmod \Delta T \geq A` and
    ``threshold`` :math:`\theta > 0`, each spike is clipped against the second moment kept so
    far (after the reset):

    .. math::
        \tilde g_t = \begin{cases} \mathrm{sign}(g_t) \sqrt{\theta v_{t-1}}
        & g_t^2 > \theta v_{t-1} \\ g_t & \text{otherwise,} \end{cases} \\
        m_t = \beta_1 m_{t-1} + (1-\beta_1) \tilde g_t, \qquad
        v_t = \beta_2 v_{t-1} + (1-\beta_2) \tilde g_t^2, \\
        u_t = s_k \frac{\sqrt{1-\beta_2^t}}{1-\beta_1^t} \frac{m_t}{\sqrt{v_t} + \epsilon},

    with :math:`A` = ``grad_accu_steps``. The bias corrections count every step since the
    start (a reset does not restart them: the authors' ``state["step"]``), and :math:`\epsilon`
    is added to :math:`\sqrt{v_t}`, not to the bias-corrected root. :math:`s_k` is the
    authors' cosine warm-up after each reset of a step :math:`j \geq 1`: with
    :math:`c = k - j < W` (``warmup_steps``),
    :math:`s_k = 1 - 0.99 (1 + \cos(\pi c / (W + 1))) / 2` (0.01 at the reset itself), else 1.
    Complex gradients clip to :math:`g/|g|` times the bound.

    Args:
      b1: decay of the first moment, in [0, 1).
      b2: decay of the second moment, in [0, 1).
      eps: added to :math:`\sqrt{v_t}`, >= 0 (the authors' default 1e-6).
      threshold: :math:`\theta`, the spike bound as a multiple of the second moment, >= 0 (0: no
        clipping).
      delta_t: :math:`\Delta T`, steps between momentum resets, an integer >= 1 (the authors'
        ``DeltaT``).
      warmup_steps: :math:`W`, steps of the cosine warm-up after a reset, an integer >= 0 (the
        authors' ``warmup_steps``, ``--warmup_epoch`` on their command line).
      grad_accu_steps: :math:`A`, steps after a reset (and after the start) before spikes are
        clipped, an integer >= 0.
      correct_bias: scale by :math:`\sqrt{1-\beta_2^t}/(1-\beta_1^t)`.
      mu_dtype: storage of the first moment (``None``: the params' dtype; a dtype; or a
        :class:`adam_jax.MomentStorage`; of a sparse leaf, its vector of sampled entries: not a
        reducing storage).
      nu_dtype: storage of the second moment, as ``mu_dtype``.
      density: sparse moments (the authors' ``density`` groups): each sparse leaf keeps moments for
        ``int(density * size)`` of its entries, drawn at random at the first step and anew at each
        reset, and only those entries move; in (0, 1], or ``None`` (dense moments, the default). It
        sets the state's shapes, so ``optax.inject_hyperparams`` needs it in ``static_args`` under a
        jitted ``init``.
      sparse_leaves: which leaves are sparse (a tree of bools or a callable of the params, depending
        on their structure and shapes only); ``None``: every matrix (2-D leaf).
      key: the ``jax.random`` key (or an int seed) the sampled entries are drawn from.

    Returns:
      An ``optax.GradientTransformation`` with state ``optax.ScaleByAdamState``, or with
      ``density`` :class:`adam_jax.ScaleBySpamState`.

    Example:
      >>> import adam_jax, jax.numpy as jnp
      >>> tx = adam_jax.scale_by_spam()
      >>> updates, state = tx.update(jnp.array([3.0, -0.5]), tx.init(jnp.zeros(2)))
      >>> print(jnp.round(updates, 3))  # the first step: about the sign of g
      [ 1. -1.]
    """
    return scale_by_rule(
        SpamRule(
            b1=b1,
            b2=b2,
            eps=eps,
            threshold=threshold,
            delta_t=delta_t,
            warmup_steps=warmup_steps,
            grad_accu_steps=grad_accu_steps,
            correct_bias=correct_bias,
            mu_dtype=mu_dtype,
            nu_dtype=nu_dtype,
            density=density,
            sparse_leaves=sparse_leaves,
            key=key,
        ),
    )


def spam(
    learning_rate: optax.ScalarOrSchedule,
    b1: float | jax.Array = 0.9,
    b2: float | jax.Array = 0.999,
    eps: float | jax.Array = 1e-6,
    *,
    threshold: float | jax.Array = 5000.0,
    delta_t: int = 500,
    warmup_steps: int = 150,
    grad_accu_steps: int = 20,
    correct_bias: bool = True,
    mu_dtype: Any = None,
    nu_dtype: Any = None,
    density: float | None = None,
    sparse_leaves: Mask | None = None,
    key: int | jax.Array = 0,
    weight_decay: optax.ScalarOrSchedule = 0.0,
    mask: Mask | None = None,
    maximize: bool = False,
) -> optax.GradientTransformation:
    r"""SPAM (Huang et al., 2025), as the authors' ``SPAM`` optimizer on dense params.

    With :math:`u_t` the direction of :func:`adam_jax.scale_by_spam` and :math:`\gamma_k`,
    :math:`\lambda_k` the learning rate and weight decay of the 0-based step :math:`k`:

    .. math::
        \theta_{k+1} = (1 - \gamma_k \lambda_k)\,(\theta_k - \gamma_k u_t):

    the decay shrinks the stepped params, scaled by the rate but not by the warm-up (the
    authors' order). The defaults are the authors' (``eps=1e-6``,
    ``threshold=5000``, ``delta_t=500``, ``warmup_steps=150``, ``grad_accu_steps=20``).

    With ``density``, the authors' sparse momentum: each sparse leaf (every matrix unless
    ``sparse_leaves`` says otherwise; the authors' param groups with ``density``, in their
    training script the attention and MLP matrices) keeps its moments, as vectors, for
    ``int(density * size)`` random entries, and steps only those (weight decay too). The
    entries are drawn at the first step and anew at each reset, so the state holds
    :math:`12 \cdot` ``density`` bytes per parameter of a sparse leaf (two float32 moments and
    an int32 index per entry). Where the params are sharded, a sparse leaf's step runs on the
    whole leaf (its stored vectors still split under ZeRO-1). Where the authors' code differs:
    its redraws keep each entry with probability ``density`` (a count that varies; here the
    initial count), and its decay of a sparse group is lost (``p.data[mask].add_`` shrinks a
    copy; here the sampled entries decay).

    Args:
      learning_rate: a constant >= 0 or a schedule of the 0-based step.
      b1: decay of the first moment, in [0, 1).
      b2: decay of the second moment, in [0, 1).
      eps: added to :math:`\sqrt{v_t}`, >= 0 (the authors' default 1e-6).
      threshold: :math:`\theta`, the spike bound as a multiple of the second moment, >= 0 (0: no
        clipping).
      delta_t: :math:`\Delta T`, steps between momentum resets, an integer >= 1 (the authors'
        ``DeltaT``).
      warmup_steps: :math:`W`, steps of the cosine warm-up after a reset, an integer >= 0 (the
        authors' ``warmup_steps``, ``--warmup_epoch`` on their command line).
      grad_accu_steps: :math:`A`, steps after a reset (and after the start) before spikes are
        clipped, an integer >= 0.
      correct_bias: scale by :math:`\sqrt{1-\beta_2^t}/(1-\beta_1^t)`.
      mu_dtype: storage of the first moment (``None``: the params' dtype; a dtype; or a
        :class:`adam_jax.MomentStorage`; of a sparse leaf, its vector of sampled entries: not a
        reducing storage).
      nu_dtype: storage of the second moment, as ``mu_dtype``.
      density: sparse moments (the authors' ``density`` groups): each sparse leaf keeps moments for
        ``int(density * size)`` of its entries, drawn at random at the first step and anew at each
        reset, and only those entries move; in (0, 1], or ``None`` (dense moments, the default). It
        sets the state's shapes, so ``optax.inject_hyperparams`` needs it in ``static_args`` under a
        jitted ``init``.
      sparse_leaves: which leaves are sparse (a tree of bools or a callable of the params, depending
        on their structure and shapes only); ``None``: every matrix (2-D leaf).
      key: the ``jax.random`` key (or an int seed) the sampled entries are drawn from.
      weight_decay: decoupled weight decay :math:`\lambda`, a constant >= 0 or a schedule of the
        step.
      mask: which leaves to decay (a tree of bools or a callable of the params).
      maximize: ascend the objective instead of descending (PyTorch's ``maximize``).

    Returns:
      An ``optax.GradientTransformation`` with state ``optax.ScaleByAdamState`` (with
      ``density``, :class:`adam_jax.ScaleBySpamState`; in a chain after ``optax.scale(-1)``
      with ``maximize=True``); ``update`` needs params with decay.

    References:
      Huang, Zhu, Jin, Liu, Wang and Liu, `SPAM: Spike-Aware Adam with Momentum Reset for
      Stable LLM Training <https://arxiv.org/abs/2501.06842>`_, ICLR 2025; the authors' code,
      https://github.com/TianjinYellow/SPAM-Optimizer (``galore_torch/SPAM.py``).

    Example:
      >>> import adam_jax, jax.numpy as jnp
      >>> params = jnp.array([1.0, -2.0])
      >>> tx = adam_jax.spam(0.1, weight_decay=0.5)
      >>> updates, _ = tx.update(jnp.array([3.0, -0.5]), tx.init(params), params)
      >>> print(jnp.round(params + updates, 3))  # (1 - 0.1 * 0.5) * (params - 0.1 sign(g))
      [ 0.855 -1.805]

      Sparse moments: a quarter of the matrix's entries keep moments and move.

      >>> tx = adam_jax.spam(0.1, density=0.25)
      >>> updates, state = tx.update(jnp.ones((4, 4)), tx.init(jnp.zeros((4, 4))))
      >>> print(int((updates != 0).sum()), state[-1].mu.shape, state[-1].entries.shape)
      4 (4,) (4,)
    """
    return optax.chain(
        *ascent(maximize),
        scale_by_rule(
            SpamRule(
                learning_rate=learning_rate,
                b1=b1,
                b2=b2,
                eps=eps,
                threshold=threshold,
                delta_t=delta_t,
                warmup_steps=warmup_steps,
                grad_accu_steps=grad_accu_steps,
                correct_bias=correct_bias,
                mu_dtype=mu_dtype,
                nu_dtype=nu_dtype,
                density=density,
                sparse_leaves=sparse_leaves,
                key=key,
            ),
            weight_decay=weight_decay,
            mask=mask,
        ),
    )


REGISTRY_ROWS = (
    OptimizerInfo(
        name="spam",
        alias=spam,
        group="variant",
        summary="Adam with its moments reset every few hundred steps and gradient spikes clipped",
        paper=Paper(
            authors="Huang, Zhu, Jin, Liu, Wang and Liu",
            title="SPAM: Spike-Aware Adam with Momentum Reset for Stable LLM Training",
            url="https://arxiv.org/abs/2501.06842",
            venue="ICLR 2025",
        ),
        transformation=scale_by_spam,
        rule=SpamRule,
        # The default rate (3e-3): not tuned on the MNIST example.
        companions=("ScaleBySpamState",),
    ),
)
