"""SPAM (Huang, Zhu, Jin, Liu, Wang and Liu, ICLR 2025, "SPAM: Spike-Aware Adam with Momentum
Reset for Stable LLM Training", arXiv:2501.06842, Algorithm 1).

Written from the paper and the authors' code, TianjinYellow/SPAM-Optimizer
``galore_torch/SPAM.py`` (class ``AdamW``, exported as ``SPAM``), for params outside their
``density`` groups (dense Adam moments). The optimizer keeps ``total_step`` (0 at the start)
and ``current_step`` (``warmup_steps + 1`` at the start, 0 after each reset) and, per param,
``step`` (never reset). The ``k``-th update (``total_step = k``), ``lr = lr(k)``,
``wd = wd(k)``::

    scale = 1 - CosineDecay(0.99, W).get_dr(current_step)
          = 1 - 0.99 (1 + cos(pi c / (W + 1))) / 2  if c = current_step < W, else 1
    if (k + 1) % DeltaT == 0:  m = v = 0                                   (momentum reset)
    step += 1
    if threshold != 0 and k + 1 >= A and (k + 1) % DeltaT >= A:          (spike clipping)
        g = sign(g) sqrt(threshold v)  where g^2 > threshold v
    m = b1 m + (1 - b1) g;   v = b2 v + (1 - b2) g^2
    p <- p - lr scale sqrt(1 - b2^step) / (1 - b1^step) m / (sqrt(v) + eps)
    p <- p - lr wd p                                                     (the stepped p)
    total_step += 1;  current_step += 1
    if (total_step + 1) % DeltaT == 0:  current_step = 0                  (warm-up restarts)

with ``W = warmup_steps``, ``A = grad_accu_steps``. ``CosineDecay.get_dr(c)`` steps a
``CosineAnnealingLR(T_max = W + 1, eta_min = 0)`` with the epoch ``c`` (its closed form) unless
``c >= W``. ``correct_bias=False`` drops the factor ``sqrt(1 - b2^step) / (1 - b1^step)``.
The authors' defaults: ``lr=1e-3``, ``betas=(0.9, 0.999)``, ``eps=1e-6``, ``weight_decay=0``,
``warmup_steps=150``, ``threshold=5000``, ``DeltaT=500``, ``grad_accu_steps=20``.
``learning_rate=None`` gives the bare direction (unit rate, no decay).

Sparse moments (``density``): the authors' param groups with ``density`` keep moments only at a
random set of each matrix's entries (their ``mask``), update those entries alone, and draw a new
set at the end of the step before each reset (``update_masks``). Here, for the leaves
``sparse_leaves`` names (every matrix by default), the arithmetic above runs on ``g[mask]``,
``p[mask]`` and the moments of those entries (in the params' row-major order, as torch's boolean
indexing), and the other entries do not move. The masks themselves, being random, are the
optimizer's: the reference draws them with adam_jax's ``sample_entries`` from the key that the
authors' bookkeeping gives (``fold_in(fold_in(key, r), i)`` for the ``r``-th draw, 0 at the
start, of the ``i``-th leaf), ``int(density * size)`` entries each time. The authors' masks
differ in two ways that only the draws see: their redraws are Bernoulli(``density``) per entry
(``torch.rand < density``), a count that varies, where these keep the initial count; and the
moments they carry over to the new mask's shared entries are zeroed by the reset of the very
next step, so this reference starts the new moments at zero. Their ``density`` groups take
matrices only (``sparse_leaves`` here may name any leaf). Their decay of such a group is lost
(``p.data[mask].add_(...)`` shrinks a copy); this reference decays the masked entries of the
stepped params, as pytorch-optimizer does and as the authors' line intends.

Where the packages differ:

* pytorch-optimizer 4.1.0 ``SPAM``: this arithmetic (the clipping, the resets, the running
  bias corrections, the decay of the stepped params, times the rate but not the warm-up), with
  the warm-up one step ahead: its ``CosineDecay.get_death_rate(c)`` sets the scheduler's
  ``last_epoch = c`` and steps it once more (``0.99 (1 + cos(pi (c + 1) / (W + 1))) / 2``,
  where the authors' evaluate it at ``c``), so its step at a reset is ``1 - 0.99 (1 + cos(pi /
  (W + 1))) / 2`` of the full one, not 0.01. The adapter pins its warm-up to the authors'.
  Its ``density`` (default 1.0, ``density=None`` here) masks every matrix (all entries at
  1.0: the same arithmetic, the decay kept; below 1.0 a random ``int(density * size)``
  entries of each matrix, redrawn as Bernoulli, their decay kept). The adapter gives it the
  reference's masks. No complex params.
* optax 0.2.8 and timm 1.0.31 have no SPAM.

Complex params: the authors' code does not take them; ``sign(g)`` becomes ``g / |g|`` and
``g^2`` is ``|g|^2``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import jax
import numpy as np
from variant_spec import LEAF_NAMES, MASK, Variant, lr_schedule, wd_schedule

from adam_jax._src.variants.spam import sample_entries
from references.common import (
    Leaves,
    PerLeafReference,
    ScalarOrSchedule,
    _abs_sq,
    _real_zeros,
    _zeros,
    adapter_options,
    as_schedule,
    import_reference_package,
    param_groups,
)


def sampled_mask(key: int, draw: int, position: int, shape: tuple, density: float) -> np.ndarray:
    """The mask of the ``draw``-th set of sampled entries of the leaf at ``position``: the
    entries that adam_jax's ``sample_entries`` draws from ``fold_in(fold_in(key, draw),
    position)``, ``int(density * size)`` of them."""
    size = math.prod(shape)
    folded = jax.random.fold_in(jax.random.fold_in(jax.random.key(key), draw), position)
    mask = np.zeros(size, bool)
    mask[np.asarray(sample_entries(folded, size, int(density * size)))] = True
    return mask.reshape(shape)


def authors_death_rate(current_step: int, warmup_steps: int, death_rate: float = 0.99) -> float:
    """The authors' ``CosineDecay(death_rate, W).get_dr(c)``: the closed form of
    ``CosineAnnealingLR(T_max=W + 1)`` at epoch ``c``, 0 (``eta_min``) once ``c >= W``."""
    if current_step >= warmup_steps:
        return 0.0
    return death_rate * (1 + math.cos(math.pi * current_step / (warmup_steps + 1))) / 2


@dataclass
class RefSpam(PerLeafReference):
    """Float64 reference for SPAM, the authors' ``step`` on dense params
    (``learning_rate=None``: the bare direction).

    Fields: ``b1``, ``b2``, ``eps``, ``threshold``, ``delta_t`` (``DeltaT``),
    ``warmup_steps``, ``grad_accu_steps``, ``correct_bias`` as the authors';
    ``weight_decay`` (times the rate, of the stepped params), ``mask`` (per leaf, False: no
    decay), ``maximize`` (negate ``g`` first); ``density`` (None: dense moments),
    ``sparse_leaves`` (per leaf, None: the matrices) and ``key`` as the alias's. ``clipped``
    counts the clipped entries; ``masks`` holds each sparse leaf's current mask (None for the
    other leaves).
    """

    learning_rate: ScalarOrSchedule | None = 1e-3
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-6
    threshold: float = 5000.0
    delta_t: int = 500
    warmup_steps: int = 150
    grad_accu_steps: int = 20
    correct_bias: bool = True
    weight_decay: ScalarOrSchedule = 0.0
    density: float | None = None
    sparse_leaves: Sequence[bool] | None = None
    key: int = 0
    masks: list = field(default_factory=list)
    m: Leaves = field(default_factory=list)
    v: Leaves = field(default_factory=list)
    total_step: int = 0
    current_step: int = 0
    clipped: int = 0
    resets: int = 0

    def init(self, params: Sequence[np.ndarray]) -> None:
        """Zero state for ``params`` (a flat list of leaves)."""
        self.count, self.total_step, self.clipped, self.resets = 0, 0, 0, 0
        self.current_step = self.warmup_steps + 1
        self.m, self.v = _zeros(params), _real_zeros(params)
        self.masks = [None] * len(params)
        if self.density is None:
            return
        sparse = self.sparse_leaves or [np.ndim(p) == 2 for p in params]
        for i, p in enumerate(params):
            if sparse[i]:
                self.masks[i] = sampled_mask(self.key, 0, i, np.shape(p), self.density)
                self.m[i], self.v[i] = self.m[i][self.masks[i]], self.v[i][self.masks[i]]

    def update(self, grads: Sequence[np.ndarray], params: Sequence[np.ndarray]) -> Leaves:
        """One step; returns the updates (to be added to ``params``)."""
        k = self.total_step
        lr = 1.0 if self.learning_rate is None else as_schedule(self.learning_rate)(k)
        wd = 0.0 if self.learning_rate is None else as_schedule(self.weight_decay)(k)
        scale = 1 - authors_death_rate(self.current_step, self.warmup_steps)
        step = k + 1  # each param's state["step"]: all params step together
        reset = (k + 1) % self.delta_t == 0
        self.resets += reset
        clip = (
            self.threshold != 0
            and k + 1 >= self.grad_accu_steps
            and (k + 1) % self.delta_t >= self.grad_accu_steps
        )
        b1, b2 = self.b1, self.b2
        step_size = lr
        if self.correct_bias:
            step_size *= math.sqrt(1 - b2**step) / (1 - b1**step)
        out = []
        for i, g, p, decayed in self.leaves(grads, params):
            mask = self.masks[i]
            if mask is not None:  # the authors' grad[mask] and p[mask]
                g, p_all, p = g[mask], p, p[mask]
            if reset:
                self.m[i], self.v[i] = np.zeros_like(self.m[i]), np.zeros_like(self.v[i])
            if clip:
                bound = self.threshold * self.v[i]
                spike = _abs_sq(g) > bound
                self.clipped += int(np.sum(spike))
                size = np.abs(g)
                g = np.where(spike, g / np.where(spike, size, 1.0) * np.sqrt(bound), g)
            self.m[i] = b1 * self.m[i] + (1 - b1) * g
            self.v[i] = b2 * self.v[i] + (1 - b2) * _abs_sq(g)
            stepped = p - step_size * scale * self.m[i] / (np.sqrt(self.v[i]) + self.eps)
            if decayed and wd:
                stepped = stepped - lr * wd * stepped
            if mask is None:
                out.append(stepped - p)
            else:
                update = np.zeros_like(p_all)
                update[mask] = stepped - p
                out.append(update)
        self.total_step += 1
        self.current_step += 1
        if self.total_step != 0 and (self.total_step + 1) % self.delta_t == 0:
            self.current_step = 0
            self.redraw((self.total_step + 1) // self.delta_t)
        self.count += 1
        return out

    def redraw(self, draw: int) -> None:
        """The authors' ``update_masks``: new masks, their moments zero (the reset of the next
        step zeroes what the authors carry over)."""
        for i, mask in enumerate(self.masks):
            if mask is not None:
                assert self.density is not None
                self.masks[i] = sampled_mask(self.key, draw, i, mask.shape, self.density)
                count = int(self.masks[i].sum())
                self.m[i] = np.zeros(count, self.m[i].dtype)
                self.v[i] = np.zeros(count, self.v[i].dtype)


def pytorch_optimizer_optimizer(params: list, **options):
    """pytorch-optimizer's ``SPAM`` for the options of :class:`RefSpam`, its warm-up pinned to
    the authors' and its masks the reference's (``foreach=False``).

    ``mask`` becomes two param groups; ``density=None`` is the package's 1.0 (every entry).
    Not expressible: ``correct_bias=False``, complex params, schedules, ``sparse_leaves``
    (the package masks every matrix).
    """
    pytorch_optimizer = import_reference_package("pytorch-optimizer", "pytorch_optimizer")
    opts, lr, wd = adapter_options(
        params, options, "pytorch_optimizer", complex_params="has no complex params",
        refuse=(_no_bias_correction_off,),
    )  # fmt: skip
    mask = opts.pop("mask", None)
    warmup_steps = opts.pop("warmup_steps", 150)
    density, key = opts.pop("density", None), opts.pop("key", 0)
    if opts.pop("sparse_leaves", None) is not None:
        raise NotImplementedError("pytorch_optimizer masks every matrix (no sparse_leaves)")
    positions = {id(p): i for i, p in enumerate(params)}
    torch = import_reference_package("torch")

    def mask_of(p: object, draw: int) -> object:
        if density is None:
            return torch.ones(p.shape, dtype=torch.bool)
        return torch.as_tensor(sampled_mask(key, draw, positions[id(p)], tuple(p.shape), density))

    kwargs = {
        "lr": lr,
        "betas": (opts.pop("b1", 0.9), opts.pop("b2", 0.999)),
        "density": 1.0 if density is None else density,
        "weight_decay": wd,
        "warmup_epoch": warmup_steps,
        "threshold": opts.pop("threshold", 5000.0),
        "grad_accu_steps": opts.pop("grad_accu_steps", 20),
        "update_proj_gap": opts.pop("delta_t", 500),
        "eps": float(opts.pop("eps", 1e-6)),
        "maximize": opts.pop("maximize", False),
        "foreach": False,
    }
    if opts:
        raise TypeError(f"unknown options {sorted(opts)}")

    class AuthorsWarmup:
        """The authors' ``CosineDecay(0.99, W)`` under the package's method name."""

        def get_death_rate(self, current_step: int) -> float:
            return authors_death_rate(current_step, warmup_steps)

    class SPAM(pytorch_optimizer.SPAM):
        """pytorch-optimizer's ``SPAM`` whose warm-up (a new ``CosineDecay`` at each reset)
        is the authors' closed form, not one scheduler step ahead."""

        @property
        def warmup(self) -> AuthorsWarmup:
            return AuthorsWarmup()

        @warmup.setter
        def warmup(self, value: object) -> None:
            del value

        def init_masks(self) -> None:
            for group in self.param_groups:
                for p in group["params"]:
                    if p.dim() == 2 and "mask" not in self.state[p]:
                        self.state[p]["mask"] = mask_of(p, 0)

        def update_mask_random(self, p: object, old_mask: object) -> object:
            """The reference's next mask; the moments carried over to it are zeroed by the
            reset of the next step, so they start at zero here."""
            del old_mask
            new_mask = mask_of(p, (self.state["total_step"] + 1) // self.update_proj_gap)
            count = int(new_mask.sum())
            self.state[p]["exp_avg"] = torch.zeros(count, dtype=p.dtype)
            self.state[p]["exp_avg_sq"] = torch.zeros(count, dtype=p.dtype)
            return new_mask

    return SPAM(param_groups(params, mask, wd), **kwargs)


def _no_bias_correction_off(opts: dict, package: str) -> None:
    """Refuses ``correct_bias=False`` (the package always corrects)."""
    if not opts.pop("correct_bias", True):
        raise NotImplementedError(f"{package} always corrects the bias")


# How the tests run this module's optimizer (tests/variants.py collects it by registry name).
# The problem's gradients (noise of scale 0.5 around a bowl) spike against threshold x v (v not
# bias-corrected) only for thresholds far below the authors' 5000: the clipping cases use 50
# and 300, which clip about 14% and 50% of the entries they check (tests/test_spam.py checks
# that they clip); the reset cases reset every 1 to 60 steps of the 300.
TESTS = (
    Variant(
        name="spam",
        reference_class=RefSpam,
        learning_rate=1e-2,
        zero1_layout=("auto", "data8"),
        zero1_float64_single_device=True,
        zero1_float64_layouts=True,
        cases={
            "default": {},
            "hyperparams": {"b1": 0.8, "b2": 0.99, "eps": 1e-8},
            "clip": {"threshold": 50.0, "grad_accu_steps": 3},
            "no_clip": {"threshold": 0.0},
            "reset": {"delta_t": 60, "warmup_steps": 20},
            "reset_and_clip": {
                "delta_t": 5,
                "warmup_steps": 3,
                "grad_accu_steps": 2,
                "threshold": 300.0,
            },  # fmt: skip
            "reset_every_step": {"delta_t": 1, "warmup_steps": 2},
            "no_bias_correction": {"correct_bias": False, "delta_t": 50, "warmup_steps": 10},
            "decay_mask": {"weight_decay": 0.1, "mask": MASK},
            "schedules": {
                "learning_rate": lr_schedule,
                "weight_decay": wd_schedule,
                "delta_t": 40,
                "warmup_steps": 10,
            },  # fmt: skip
            "maximize": {"maximize": True},
            "density": {"density": 0.5, "delta_t": 40, "warmup_steps": 10},
            "density_clip_decay": {
                "density": 0.3,
                "delta_t": 7,
                "warmup_steps": 3,
                "grad_accu_steps": 2,
                "threshold": 300.0,
                "weight_decay": 0.1,
                "mask": MASK,
                "key": 3,
            },  # fmt: skip
            "sparse_leaves": {
                "density": 0.6,
                "sparse_leaves": {"b": True, "s": False, "w": True},
                "delta_t": 25,
                "warmup_steps": 5,
            },  # fmt: skip
        },
        packages={"pytorch-optimizer": pytorch_optimizer_optimizer},
        reference_options={
            "sparse_leaves": lambda leaves: ("sparse_leaves", [leaves[k] for k in LEAF_NAMES])
        },
        hyperparams={
            "learning_rate": 1e-2,
            "b1": 0.9,
            "b2": 0.999,
            "eps": 1e-6,
            "threshold": 2.0,
            "delta_t": 3,
            "warmup_steps": 2,
            "grad_accu_steps": 1,
        },
        bad=(
            ("b1", 1.0, "[0, 1)"),
            ("eps", -1.0, ">= 0"),
            ("threshold", -1.0, ">= 0"),
            ("delta_t", 0, ">= 1"),
            ("warmup_steps", -1, ">= 0"),
            ("grad_accu_steps", 2.5, ">= 0"),
            ("density", 0.0, "(0, 1]"),
            ("density", 1.5, "(0, 1]"),
            ("weight_decay", -0.1, ">= 0"),
        ),
    ),
)
