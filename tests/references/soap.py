"""SOAP (Vyas, Morwani, Zhao, Kwun, Shapira, Brandfonbrener, Janson and Kakade, "SOAP: Improving
and Stabilizing Shampoo using Adam", ICLR 2025, arXiv:2409.11321, Algorithms 2 and 3).

Written from the paper and the authors' ``soap.py`` (github.com/nikhilvyas/SOAP, commit
a1e5535), in float64 NumPy, following their code line by line: per param a list ``GG`` of
Kronecker factors (None for a dimension without one), their eigenbases ``Q``, and Adam's
``exp_avg`` (kept in the rotated basis, rotated back and forth around every preconditioner
update as they do) and ``exp_avg_sq``. The ``k``-th call (``k = 0, 1, ...``)::

    k = 0:  GG_i = lerp(GG_i, G_(i) G_(i)^T, 1 - shampoo_beta);  Q_i = eigh(GG_i + 1e-30 I),
            columns by decreasing eigenvalue;  no update (their ``continue``)
    k >= 1, t = k:
        g~ = project(g);  exp_avg = b1 exp_avg + (1 - b1) g~;  exp_avg_sq likewise with g~^2
        n = project_back(exp_avg / (sqrt(exp_avg_sq) + eps))     [/ (1e-30 + rms(n))]
        p <- p - lr(k) (sqrt(1 - b2^t) / (1 - b1^t) n + wd(k) p)   (decayed leaves)
        GG_i updated as above; every t % precondition_frequency == 0: Q_i sorted by
        diag(Q^T GG Q) decreasing (exp_avg_sq permuted alike), Q_i = qr(GG_i Q_i)

Blocks (``block_size``, as levanter's SOAP and Distributed Shampoo cut a matrix): the param's
working shape (merged as above) is cut, along each dimension that has a factor, into blocks of
``block_size`` values (the last one the remainder); a dimension without factor stays whole.
Each block of the tensor is an independent SOAP: the per-param logic above run on the block
(its own ``GG``, ``Q``, ``exp_avg``, ``exp_avg_sq``); the blocks' directions are put back in
place and ``normalize_grads`` divides the whole param's direction by its RMS. The blocks are
numbered in adam_jax's documented order: by their choice, per dimension, of the full blocks or
the last one (row-major, full first), then row-major by coordinates. With ``stagger_refresh``
the blocks with a factor are numbered across all params (in order), and block ``j`` refreshes
after the steps ``t > 0`` with ``(t - j % precondition_frequency) % precondition_frequency ==
0`` (without it, ``t % precondition_frequency == 0``, the authors'); a param without blocks is
one block. (A scalar, which the authors' ``merge_dims`` reshapes to ``(1,)`` with a 1 x 1
factor whose basis is +-1, has no factor here: the same updates.)

The decay is decoupled on the params before the step, as adam_jax and optax do (the authors
multiply the params after the step by ``1 - lr wd``). The casts of the authors' code to float32
around ``eigh`` and QR are not here (float64 throughout); the authors also create the factors
in torch's default dtype, where adam_jax keeps them in the compute dtype.

Where adam_jax differs from the authors' code besides: it keeps ``exp_avg`` in the rotated
basis too, but moves it only when the basis changes (at a refresh), where the authors rotate it
back and forth around every preconditioner update: the same arithmetic up to rounding.

Where the packages differ: pytorch-optimizer 4.1.0's ``SOAP`` (see
:func:`pytorch_optimizer_optimizer`) keeps ``exp_avg`` in the original basis (the authors'
earlier version: the same arithmetic), computes QR in float32 even for float64 params,
normalizes by the RMS plus ``eps`` instead of 1e-30, and its ``merge_small_dims`` differs from
the authors' merge (a tensor that merges into one dimension gets shape ``[1]``, which its
reshape refuses).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from variant_spec import DECAY, SCHEDULED, Variant

from references.common import PerLeafReference, ScalarOrSchedule, adapter_options, param_groups


def merge_dims(shape: tuple[int, ...], max_precond_dim: int) -> tuple[int, ...]:
    """The authors' ``merge_dims``, on a shape."""
    new_shape: list[int] = []
    curr_shape = 1
    for sh in shape:
        temp_shape = curr_shape * sh
        if temp_shape > max_precond_dim:
            if curr_shape > 1:
                new_shape.append(curr_shape)
                curr_shape = sh
            else:
                new_shape.append(sh)
                curr_shape = 1
        else:
            curr_shape = temp_shape
    if curr_shape > 1 or len(new_shape) == 0:
        new_shape.append(curr_shape)
    return tuple(new_shape)


@dataclass
class RefSoap(PerLeafReference):
    """Float64 reference for SOAP (``learning_rate=None``: the bare direction)."""

    learning_rate: ScalarOrSchedule | None = 3e-3
    b1: float = 0.95
    b2: float = 0.95
    shampoo_beta: float = -1
    eps: float = 1e-8
    weight_decay: ScalarOrSchedule = 0.01
    precondition_frequency: int = 10
    max_precond_dim: int = 10000
    merge_dims: bool = False
    precondition_1d: bool = False
    normalize_grads: bool = False
    correct_bias: bool = True
    block_size: int | None = None
    stagger_refresh: bool = False
    state: list = field(default_factory=list)

    def init(self, params: list[np.ndarray]) -> None:
        self.count = 0
        self.state = [{} for _ in params]
        self.blocked = self.block_size is not None or self.stagger_refresh
        if self.blocked:  # the numbering of the blocks with a factor, across the params
            first = 0
            for st, p in zip(self.state, params, strict=True):
                working, factored = self._working(np.shape(p))
                st["working"], st["factored"] = working, factored
                st["slices"] = self._block_slices(working, factored)
                st["first"] = first
                first += len(st["slices"]) if any(factored) else 0

    # The authors' methods, on one param's state ``st``.
    def _merged(self, x: np.ndarray) -> np.ndarray:
        return x.reshape(merge_dims(x.shape, self.max_precond_dim)) if self.merge_dims else x

    def _init_preconditioner(self, g: np.ndarray, st: dict) -> None:
        st["GG"] = []
        if g.ndim == 1:
            if not self.precondition_1d or g.shape[0] > self.max_precond_dim:
                st["GG"].append(None)
            else:
                st["GG"].append(np.zeros((g.shape[0], g.shape[0])))
        else:
            for sh in self._merged(g).shape:
                st["GG"].append(None if sh > self.max_precond_dim else np.zeros((sh, sh)))
        st["Q"] = None

    def _project(self, x: np.ndarray, st: dict, back: bool, merged: bool = True) -> np.ndarray:
        original_shape = x.shape
        x = self._merged(x) if merged else x
        for mat in st["Q"]:
            if mat is not None:
                x = np.tensordot(x, mat, axes=([0], [1 if back else 0]))
            else:
                x = np.transpose(x, [*range(1, x.ndim), 0])
        return x.reshape(original_shape)

    def _update_preconditioner(self, g: np.ndarray, st: dict) -> None:
        w = 1 - (self.shampoo_beta if self.shampoo_beta >= 0 else self.b2)
        if st["Q"] is not None:
            st["exp_avg"] = self._project(st["exp_avg"], st, back=True)
        if g.ndim == 1:
            if self.precondition_1d and g.shape[0] <= self.max_precond_dim:
                outer = np.outer(g, g)
                st["GG"][0] = st["GG"][0] + w * (outer - st["GG"][0])  # lerp_
        else:
            new_g = self._merged(g)
            for idx, sh in enumerate(new_g.shape):
                if sh <= self.max_precond_dim:
                    others = [k for k in range(new_g.ndim) if k != idx]
                    outer = np.tensordot(new_g, new_g, axes=(others, others))
                    st["GG"][idx] = st["GG"][idx] + w * (outer - st["GG"][idx])
        if st["Q"] is None:
            st["Q"] = [self._eigh(m) for m in st["GG"]]
        if st["step"] > 0 and st["step"] % self.precondition_frequency == 0:
            st["Q"] = self._qr(st)
        if st["step"] > 0:
            st["exp_avg"] = self._project(st["exp_avg"], st, back=False)

    @staticmethod
    def _eigh(m: np.ndarray | None) -> np.ndarray | None:
        if m is None:
            return None
        _, q = np.linalg.eigh(m + 1e-30 * np.eye(m.shape[0]))
        return np.flip(q, axis=1)

    def _qr(self, st: dict, merged: bool = True) -> list:
        orig_shape = st["exp_avg_sq"].shape
        exp_avg_sq = self._merged(st["exp_avg_sq"]) if merged else st["exp_avg_sq"]
        final: list = []
        for ind, (m, o) in enumerate(zip(st["GG"], st["Q"], strict=True)):
            if m is None:
                final.append(None)
                continue
            est_eig = np.diag(o.T @ m @ o)
            sort_idx = np.argsort(-est_eig, kind="stable")
            exp_avg_sq = np.take(exp_avg_sq, sort_idx, axis=ind)
            o = o[:, sort_idx]
            q, _ = np.linalg.qr(m @ o)
            final.append(q)
        st["exp_avg_sq"] = exp_avg_sq.reshape(orig_shape)
        return final

    # Blocks: each an independent SOAP on its part of the working shape.
    def _working(self, shape: tuple[int, ...]) -> tuple[tuple[int, ...], list[bool]]:
        """The working shape and, per dimension, whether it has a factor (as
        :meth:`_init_preconditioner` decides)."""
        working = merge_dims(shape, self.max_precond_dim) if self.merge_dims else shape
        if len(shape) < 2:
            working = tuple(shape)
        if len(shape) == 1:
            return working, [self.precondition_1d and shape[0] <= self.max_precond_dim]
        return working, [sh <= self.max_precond_dim for sh in working]

    def _block_slices(self, working: tuple[int, ...], factored: list[bool]) -> list[tuple]:
        """The blocks' places in the working shape, in adam_jax's order (see the module)."""
        per_dim = []
        for size, f in zip(working, factored, strict=True):
            b = max(1, self.block_size if f and self.block_size is not None else size)
            per_dim.append(
                [(start, min(start + b, size)) for start in range(0, size, b)] or [(0, 0)]
            )

        def key(cuts: tuple) -> tuple:
            last = tuple(
                b - a < (self.block_size or 0) and b - a != size
                for (a, b), size in zip(cuts, working, strict=True)
            )
            return last, tuple(a for a, _ in cuts)

        return [
            tuple(slice(a, b) for a, b in cuts)
            for cuts in sorted(itertools.product(*per_dim), key=key)
        ]

    def _due(self, t: int, offset: int) -> bool:
        return t > 0 and (t - offset) % self.precondition_frequency == 0

    def _update_block_preconditioner(self, g: np.ndarray, st: dict) -> None:
        """:meth:`_update_preconditioner` on a block (already in the working shape)."""
        w = 1 - (self.shampoo_beta if self.shampoo_beta >= 0 else self.b2)
        if st["Q"] is not None:
            st["exp_avg"] = self._project(st["exp_avg"], st, back=True, merged=False)
        for idx, m in enumerate(st["GG"]):
            if m is not None:
                others = [k for k in range(g.ndim) if k != idx]
                outer = np.tensordot(g, g, axes=(others, others))
                st["GG"][idx] = m + w * (outer - m)
        if st["Q"] is None:
            st["Q"] = [self._eigh(m) for m in st["GG"]]
        if self._due(st["step"], st["offset"]):
            st["Q"] = self._qr(st, merged=False)
        if st["step"] > 0:
            st["exp_avg"] = self._project(st["exp_avg"], st, back=False, merged=False)

    def _update_blocks(self, grads: list[np.ndarray], params: list[np.ndarray]) -> list:
        k = self.count
        out = []
        for i, g, p, decayed in self.leaves(grads, params):
            st = self.state[i]
            gw = g.reshape(st["working"])
            if "blocks" not in st:
                st["blocks"] = []
                for j, where in enumerate(st["slices"]):
                    gb = gw[where]
                    offset = 0
                    if self.stagger_refresh:
                        offset = (st["first"] + j) % self.precondition_frequency
                    bst = {
                        "step": 0,
                        "offset": offset,
                        "exp_avg": np.zeros_like(gb),
                        "exp_avg_sq": np.zeros_like(gb),
                        "GG": [
                            np.zeros((sh, sh)) if f else None
                            for sh, f in zip(gb.shape, st["factored"], strict=True)
                        ],
                        "Q": None,
                    }
                    self._update_block_preconditioner(gb, bst)
                    st["blocks"].append(bst)
                out.append(np.zeros_like(p))
                continue
            n = np.zeros(st["working"])
            for where, bst in zip(st["slices"], st["blocks"], strict=True):
                g_proj = self._project(gw[where], bst, back=False, merged=False)
                bst["step"] += 1
                bst["exp_avg"] = self.b1 * bst["exp_avg"] + (1 - self.b1) * g_proj
                bst["exp_avg_sq"] = self.b2 * bst["exp_avg_sq"] + (1 - self.b2) * g_proj**2
                denom = np.sqrt(bst["exp_avg_sq"]) + self.eps
                n[where] = self._project(bst["exp_avg"] / denom, bst, back=True, merged=False)
            t = st["blocks"][0]["step"]
            scale = 1.0
            if self.correct_bias:
                scale = np.sqrt(1 - self.b2**t) / (1 - self.b1**t)
            n = n.reshape(g.shape)
            if self.normalize_grads:
                n = n / (1e-30 + np.mean(n**2) ** 0.5)
            out.append(self.decay_and_step(scale * n, p, k, decayed))
            for where, bst in zip(st["slices"], st["blocks"], strict=True):
                self._update_block_preconditioner(gw[where], bst)
        self.count += 1
        return out

    def update(self, grads: list[np.ndarray], params: list[np.ndarray]) -> list[np.ndarray]:
        if self.blocked:
            return self._update_blocks(grads, params)
        k = self.count
        out = []
        for i, g, p, decayed in self.leaves(grads, params):
            st = self.state[i]
            if "step" not in st:
                st["step"] = 0
                st["exp_avg"] = np.zeros_like(g)
                st["exp_avg_sq"] = np.zeros_like(g)
                self._init_preconditioner(g, st)
                self._update_preconditioner(g, st)
                out.append(np.zeros_like(p))
                continue
            g_proj = self._project(g, st, back=False)
            st["step"] += 1
            t = st["step"]
            st["exp_avg"] = self.b1 * st["exp_avg"] + (1 - self.b1) * g_proj
            st["exp_avg_sq"] = self.b2 * st["exp_avg_sq"] + (1 - self.b2) * g_proj**2
            denom = np.sqrt(st["exp_avg_sq"]) + self.eps
            scale = 1.0
            if self.correct_bias:
                scale = np.sqrt(1 - self.b2**t) / (1 - self.b1**t)
            n = self._project(st["exp_avg"] / denom, st, back=True)
            if self.normalize_grads:
                n = n / (1e-30 + np.mean(n**2) ** 0.5)
            out.append(self.decay_and_step(scale * n, p, k, decayed))
            self._update_preconditioner(g, st)
        self.count += 1
        return out


def pytorch_optimizer_optimizer(params: list, **options: Any):
    """pytorch-optimizer's ``SOAP`` (4.1.0) for the options of :class:`RefSoap`, changed in two
    places so that it computes the authors' float64 arithmetic with adam_jax's decay:

    * ``get_orthogonal_matrix_qr`` without its cast to float32 around ``torch.linalg.qr``
      (the rest of the method as it is);
    * the decoupled decay applied to the params before the step (``p *= 1 - lr wd``, skipped
      at the first call as theirs is), instead of after it.

    Not expressible: ``normalize_grads`` (it divides by the RMS plus ``eps``, the authors by
    the RMS plus 1e-30), ``merge_dims`` (its ``merge_small_dims`` is not the authors'),
    ``block_size`` and ``stagger_refresh`` (neither the authors' nor its), schedules, complex
    params.
    """
    import torch

    from references.common import import_reference_package

    pytorch_optimizer = import_reference_package("pytorch-optimizer", "pytorch_optimizer")
    opts, lr, wd = adapter_options(
        params,
        options,
        "pytorch_optimizer",
        complex_params="has no complex params for SOAP",
        refuse=("normalize_grads", "merge_dims", "block_size", "stagger_refresh"),
        learning_rate=3e-3,
        weight_decay=0.01,
    )
    mask = opts.pop("mask", None)
    shampoo_beta = opts.pop("shampoo_beta", -1)

    class Float64Soap(pytorch_optimizer.SOAP):
        def get_orthogonal_matrix_qr(self, state, max_precondition_dim=10000, merge_dims=False):
            exp_avg_sq = state["exp_avg_sq"]
            matrices = []
            for ind, (m, o) in enumerate(zip(state["GG"], state["Q"], strict=True)):
                if len(m) == 0:
                    matrices.append([])
                    continue
                matrix_product = m @ o
                est_eig = (o * matrix_product).sum(dim=0)
                sort_idx = torch.argsort(est_eig, descending=True)
                exp_avg_sq = exp_avg_sq.index_select(ind, sort_idx)
                q, _ = torch.linalg.qr(matrix_product.index_select(1, sort_idx))
                matrices.append(q)
            state["exp_avg_sq"] = exp_avg_sq
            return matrices

        def apply_weight_decay(self, p, grad, lr, weight_decay, *args, **kwargs):
            del p, grad, lr, weight_decay, args, kwargs  # applied in step, before the update

        @torch.no_grad()
        def step(self, closure=None):
            for group in self.param_groups:
                if group.get("step", 0) >= 1 and group["weight_decay"]:
                    for p in group["params"]:
                        p.mul_(1.0 - group["lr"] * group["weight_decay"])
            return super().step(closure)

    kwargs = {
        "lr": lr,
        "betas": (opts.pop("b1", 0.95), opts.pop("b2", 0.95)),
        "shampoo_beta": None if shampoo_beta < 0 else shampoo_beta,
        "weight_decay": wd,
        "precondition_frequency": opts.pop("precondition_frequency", 10),
        "max_precondition_dim": opts.pop("max_precond_dim", 10000),
        "precondition_1d": opts.pop("precondition_1d", False),
        "correct_bias": opts.pop("correct_bias", True),
        "eps": opts.pop("eps", 1e-8),
        "maximize": opts.pop("maximize", False),
    }
    if opts:
        raise TypeError(f"unknown options {sorted(opts)}")
    return Float64Soap(param_groups(params, mask, wd), **kwargs)


# The standard problem's leaves: b (5,), s () and w (3, 4). Its factors are full rank, or
# short of it by one (w's 4 x 4 factor at the first gradient), where the eigenbasis is still
# unique up to signs, which SOAP does not see: every implementation agrees there. The cases
# whose factors lack more rank at the first step (precondition_1d: b's 5 x 5 factor of rank
# one; merge_dims at the default max_precond_dim: w merged into 12 values) have an arbitrary
# eigenbasis; tests/test_soap.py checks them with the basis pinned, and merge_dims on a tensor
# that merges into full-rank factors.
TESTS = (
    Variant(
        name="soap",
        learning_rate=1e-2,
        zero1_layout=("explicit", "data4_model2"),
        reference_class=RefSoap,
        cases={
            # Options that change no state's shape share cases (each case costs a reference
            # run, a package run and a compiled donation step); the package expresses the
            # first two whole, neither normalize_grads nor merge_dims.
            "default": {},
            "hyperparams": {
                "b1": 0.9,
                "b2": 0.99,
                "eps": 1e-6,
                "shampoo_beta": 0.9,
                "maximize": True,
            },
            "frequency": {"precondition_frequency": 3, "correct_bias": False, "weight_decay": 0.0},
            "max_precond_dim": {"max_precond_dim": 3, "merge_dims": True, "normalize_grads": True},
            # The case the sharding, ZeRO-1, export and FlatParams tests run (make_decaying).
            # max_precond_dim keeps their factors small (an eigh of 2048 x 2048 on each of 8
            # host devices takes minutes on 2 CPU cores) and full rank at the first gradient,
            # which fixes the eigenbasis: ZeRO-1's w1 (64, 128) gets none (a batch of 32 gives
            # its 64 x 64 factor rank 32, whose null space's basis any rounding turns, the
            # layouts' summation orders included: 5% of the params after 10 steps, float64
            # alike), w2 (128, 8) one of 8; the sharded params' w (32, 2048) one of 32. Their
            # long dimensions are the identity's, which this tests too.
            "decay_mask": {**DECAY, "max_precond_dim": 32},
            "schedules": SCHEDULED,
        },
        packages={"pytorch-optimizer": pytorch_optimizer_optimizer},
        # Every branch shows in 40 steps (the refreshes at 10, 20 and 30; every third step
        # with precondition_frequency 3), and SOAP's steps are slow (eigh and QR per step).
        steps=40,
        complex_params=False,
        flat_params=False,
        per_tensor=True,
        hyperparams={"learning_rate": 1e-2, "b1": 0.9, "b2": 0.95, "weight_decay": 0.01},
        static_args=("max_precond_dim", "block_size"),
        bad=(
            ("b2", 1.0, "[0, 1)"),
            ("shampoo_beta", 1.5, "[0, 1)"),
            ("precondition_frequency", 0, ">= 1"),
            ("max_precond_dim", 0, ">= 1"),
            ("block_size", 0, ">= 1"),
        ),
    ),
)
