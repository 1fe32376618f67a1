"""Adam-mini (Zhang, Chen, Li, Ding, Chen, Kingma, Ye, Luo and Sun, "Adam-mini: Use Fewer
Learning Rates To Gain More", ICLR 2025, arXiv:2406.16793, Algorithm 1).

Written from the paper and the authors' ``adam_mini.Adam_mini`` (PyPI ``adam-mini`` 1.1.1).
The params are cut into blocks (one per output neuron, head, token or tensor); each block
``b`` keeps one second moment. The ``k``-th update (``t = k + 1``)::

    m_t = b1 m + (1 - b1) g
    v_t[b] = b2 v[b] + (1 - b2) mean_{i in b} |g_i|^2
    u_t[i] = (m_t[i] / (1 - b1^t)) / (sqrt(v_t[b(i)] / (1 - b2^t)) + eps)
    p <- p - lr(k) (u_t + wd(k) p)                 (decayed leaves)

The authors decay ``p *= 1 - lr wd`` before the step (the same additive form) and spare
params whose name has ``norm``, ``ln`` or ``bias``; their PyTorch partition by layer names is
checked against adam_jax's Flax partition in ``tests/test_adam_mini.py``, on a model named
like theirs. Here the blocks of each leaf of the tests' problem are given as block shapes:
``partition`` maps a leaf name to its block shape (None: one value per parameter), by default
the authors' rule for an unnamed layer in Flax's layout: a vector or scalar is one block, a
matrix one block per output column.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from variant_spec import LEAF_NAMES, SCHEDULED, Variant

from references.common import AdamMomentsReference, Leaves, ScalarOrSchedule, _abs_sq


def default_block(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The authors' block of an unnamed layer, in Flax's layout."""
    return shape if len(shape) <= 1 else (*shape[:-1], 1)


def block_means(x: np.ndarray, block: tuple[int, ...] | None) -> np.ndarray:
    """The mean of ``x`` over each block, repeated over the block's elements."""
    if block is None:
        return x
    counts = [n // b for n, b in zip(x.shape, block, strict=True)]
    split = [v for pair in zip(counts, block, strict=True) for v in pair]
    means = x.reshape(split).mean(axis=tuple(range(1, 2 * x.ndim, 2)), keepdims=True)
    return np.broadcast_to(means, split).reshape(x.shape)


@dataclass
class RefAdamMini(AdamMomentsReference):
    """Float64 reference for Adam-mini (``learning_rate=None``: the bare direction ``u_t``).

    Fields: ``b1``, ``b2``, ``eps`` (as Adam's), ``partition`` (leaf name -> block shape, or
    None for one value per parameter; missing leaves take :func:`default_block`),
    ``weight_decay`` (decoupled, times the learning rate), ``mask``, ``maximize``. ``v`` is
    kept per element, each block holding its mean.
    """

    learning_rate: ScalarOrSchedule | None = 1e-3
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: ScalarOrSchedule = 0.0
    partition: Mapping[str, tuple[int, ...] | None] = field(default_factory=dict)

    def update(self, grads: Sequence[np.ndarray], params: Sequence[np.ndarray]) -> Leaves:
        """One step; returns the updates (to be added to ``params``)."""
        k, t = self.count, self.count + 1
        out = []
        for i, g, p, decayed in self.leaves(grads, params):
            name = LEAF_NAMES[i] if len(params) == len(LEAF_NAMES) else str(i)
            block = self.partition.get(name, default_block(g.shape))
            self.m[i] = self.b1 * self.m[i] + (1 - self.b1) * g
            self.v[i] = self.b2 * self.v[i] + (1 - self.b2) * block_means(_abs_sq(g), block)
            u = (self.m[i] / (1 - self.b1**t)) / (np.sqrt(self.v[i] / (1 - self.b2**t)) + self.eps)
            if self.learning_rate is None:
                out.append(u)
                continue
            out.append(self.decay_and_step(u, p, k, decayed))
        self.count += 1
        return out


# The mask of the tests' problem: the authors' default (by names) decays all of b, s and w.
DECAY = {"weight_decay": 0.1, "mask": {"b": False, "s": True, "w": True}}

# How the tests run this module's optimizers (tests/variants.py collects them by registry name).
TESTS = (
    Variant(
        name="adam_mini",
        learning_rate=1e-2,
        zero1_layout=("auto", "data8"),
        reference_class=RefAdamMini,
        cases={
            "default": {},
            "hyperparams": {"b1": 0.8, "b2": 0.99, "eps": 1e-3},
            # Per row, in runs of 4 columns (w is (3, 4) here, (16, 32) in other tests).
            "partition": {"partition": {"b": None, "s": (), "w": (1, 4)}},
            "decay_mask": DECAY,
            "schedules": SCHEDULED,
            "maximize": {"maximize": True},
        },
        float32_cases=(),
        storage_options=("mu_dtype",),
        per_tensor=True,  # block means: sums whose order changes with the state's sharding
        hyperparams={"learning_rate": 1e-2, "b1": 0.9, "b2": 0.999, "eps": 1e-8},
        bad=(("b2", 1.0, "[0, 1)"), ("eps", -1.0, ">= 0"), ("num_heads", 0, ">= 1")),
    ),
)
