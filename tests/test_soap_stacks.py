"""SOAP with its state stacked by block shape (``stack_blocks=True``) against SOAP leaf by leaf.

* Each block's arithmetic is the leaf-by-leaf step's: the same updates, step after step (a first
  step, refreshes and the steps between), over blocks of several shapes from several leaves,
  remainders, 3-D and merged leaves, a dimension without factor, storages, normalization,
  weight decay with a mask or a schedule; float64 to 1e-12, float32 bit for bit where both
  step blocks. Not 1-D leaves with factors (``precondition_1d``): their factors, sums of a few
  outer products, keep a null space whose eigenbasis is arbitrary, which rounding differences
  between batches of other sizes choose otherwise.
* 8-bit first moments (whose blocks of codes hold other values in a stack) stay as near the
  float32 step as leaf by leaf.
* The compiled step's products and solver calls do not grow with the leaves.
* What does not stack yet is refused, naming the option; a stacked state is re-laid as it is.
"""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adam_jax
from adam_jax._src.variants.soap import SoapLayout

# Blocks of 8: "a" and "a2" 2 x 3 blocks of 8 x 8, "b" 8 x 8 ones and 4 x 8 remainders below,
# "r" a remainder column (8 x 4), "c" 3-D (two blocks of 8 x 4 x 3), "v" 1-D, "s" one block.
SHAPES = {
    "a": (16, 24),
    "a2": (16, 24),
    "b": (20, 8),
    "r": (16, 12),
    "c": (16, 4, 3),
    "v": (10,),
    "s": (8, 8),
}


def _tree(seed: int, dtype: Any = np.float32) -> dict[str, jax.Array]:
    rng = np.random.default_rng(seed)
    return {k: jnp.asarray(rng.normal(size=s).astype(dtype)) for k, s in SHAPES.items()}


def _run(tx: optax.GradientTransformation, steps: int, dtype: Any = np.float32) -> list[Any]:
    """Each step's updates of ``tx`` on random gradients, the params moving by them."""
    params = _tree(0, dtype)
    state = tx.init(params)
    update = jax.jit(tx.update)
    out = []
    for t in range(steps):
        updates, state = update(_tree(t + 1, dtype), state, params)
        params = optax.apply_updates(params, updates)
        out.append(updates)
    return out


OPTIONS = {
    "blocks": {"block_size": 8},
    "blocks, Cholesky QR": {"block_size": 8, "orthogonalization": "cholesky_qr"},
    "blocks, power start": {"block_size": 8, "first_basis": "power"},
    "merged": {"block_size": 8, "merge_dims": True},
    "a dimension without factor": {"block_size": 8, "max_precond_dim": 12},
    "whole matrices": {},
    "normalized, no bias correction": {
        "block_size": 8,
        "normalize_grads": True,
        "correct_bias": False,
    },
    "normalized": {"block_size": 8, "normalize_grads": True},
    "decay, masked": {
        "block_size": 8,
        "weight_decay": 0.1,
        "mask": {k: k != "a2" for k in SHAPES},
    },
    "decay, scheduled": {"block_size": 8, "weight_decay": optax.linear_schedule(0.2, 0.0, 4)},
    "bfloat16 storages, rectified": {
        "block_size": 8,
        "mu_dtype": jnp.bfloat16,
        "nu_dtype": jnp.bfloat16,
        "factor_dtype": jnp.bfloat16,
        "basis_dtype": jnp.bfloat16,
    },
}


@pytest.mark.parametrize("options", list(OPTIONS.values()), ids=list(OPTIONS))
def test_stacked_blocks_step_as_leaf_by_leaf(options: dict[str, Any], x64: None) -> None:
    """Float64: the stacked step's updates are the leaf-by-leaf step's to 1e-12 over a first
    step, two refreshes and the steps between."""
    runs = [
        _run(
            adam_jax.soap(0.01, precondition_frequency=2, stack_blocks=stacked, **options),
            6,
            np.float64,
        )
        for stacked in (False, True)
    ]
    for leaf_by_leaf, stacked in zip(*runs, strict=True):
        for name in SHAPES:
            np.testing.assert_allclose(
                stacked[name], leaf_by_leaf[name], rtol=1e-12, atol=1e-12, err_msg=name
            )


def test_stacked_blocks_step_float32_bit_for_bit() -> None:
    """Float32, blocks: the updates of the leaves of several blocks bit for bit (their
    products batched either way; a leaf of one block is multiplied as plain matrices leaf by
    leaf), and the state's stacks hold each leaf's blocks' factors (a batch of matrices a
    dimension) as the leaf's vector does."""
    options = {"block_size": 8, "precondition_frequency": 2}
    runs = [_run(adam_jax.soap(0.01, stack_blocks=s, **options), 5) for s in (False, True)]
    for leaf_by_leaf, stacked in zip(*runs, strict=True):
        for name in ("a", "a2", "b", "r", "c", "v"):
            np.testing.assert_array_equal(stacked[name], leaf_by_leaf[name], err_msg=name)
        np.testing.assert_allclose(stacked["s"], leaf_by_leaf["s"], rtol=1e-5, atol=1e-7)
    params = {"a": jnp.ones((16, 24)), "a2": jnp.ones((16, 24))}
    grads = _tree(3)
    grads = {"a": grads["a"], "a2": grads["a2"]}
    states = []
    for stacked in (False, True):
        tx = adam_jax.scale_by_soap(block_size=8, stack_blocks=stacked)
        states.append(tx.update(grads, tx.init(params))[1])
    layout = SoapLayout(10000, merge_dims=False, precondition_1d=False, block_size=8)
    blocks = [
        block
        for name in ("a", "a2")
        for block in layout.unpack_blocks(states[0].gg[name], (16, 24))
    ]
    for i, key in enumerate(("dim0", "dim1")):
        want = np.stack([block[i] for block in blocks])
        np.testing.assert_array_equal(states[1].stacks.gg["8x8"][key], want, err_msg=key)
    assert states[1].stacks.mu["8x8"].shape == (12, 8, 8)


COMPRESSED = {
    "the setting to use": {
        "mu_dtype": adam_jax.BlockwiseQuantized(),
        "nu_dtype": jnp.bfloat16,
        "factor_dtype": jnp.bfloat16,
        "basis_dtype": jnp.bfloat16,
        "basis_rectification": 0,
    },
    "8-bit factors and bases, staggered": {
        "factor_dtype": adam_jax.BlockwiseQuantized(min_size=0),
        "basis_dtype": adam_jax.BlockwiseQuantized(min_size=0),
        "stagger_refresh": True,
    },
}


@pytest.mark.parametrize("compressed", list(COMPRESSED.values()), ids=list(COMPRESSED))
def test_compressed_stacks_stay_as_near_float32(compressed: dict[str, Any]) -> None:
    """Compressed storages: a stack's 8-bit blocks of codes hold other values than a leaf's
    (its factors' and bases' lie in each block's matrices), so the updates differ; each stays
    within the storages' distance of the float32 step (after a first step, refreshes and steps
    between; staggered, each step's due blocks written back into the stack's matrices)."""
    staggered = {"stagger_refresh": compressed.get("stagger_refresh", False)}
    options = {"block_size": 8, "precondition_frequency": 2}
    distances = []
    for stacked in (False, True):
        # Each against its own float32 step: staggered, a stack numbers its blocks otherwise.
        exact = _run(adam_jax.soap(0.01, stack_blocks=stacked, **options, **staggered), 4)[-1]
        tx = adam_jax.soap(0.01, stack_blocks=stacked, **options, **compressed)
        last = _run(tx, 4)[-1]
        distances.append(
            max(
                float(jnp.max(jnp.abs(last[k] - exact[k]) / jnp.max(jnp.abs(exact[k]))))
                for k in SHAPES
            )
        )
    leaf_by_leaf, stacked = distances
    assert 0 < stacked < max(2 * leaf_by_leaf, 0.02), distances


def test_stacked_calls_do_not_grow_with_the_leaves() -> None:
    """The compiled step (its three phases) of six 16 x 24 leaves has as many products and
    solver calls as that of two: one a stack. Leaf by leaf they grow three-fold."""

    def calls(leaves: int, stacked: bool) -> tuple[int, int]:
        params = {f"w{i}": jnp.ones((16, 24)) for i in range(leaves)}
        tx = adam_jax.soap(0.01, block_size=8, stack_blocks=stacked)
        text = jax.jit(tx.update).lower(params, tx.init(params), params).compile().as_text()
        return len(re.findall(r" dot\(", text)), len(re.findall(r" custom-call\(", text))

    stacked = [calls(n, True) for n in (2, 6)]
    assert stacked[0] == stacked[1] and stacked[0][0] > 0
    by_leaf = [calls(n, False) for n in (2, 6)]
    assert by_leaf[1][0] > 2 * by_leaf[0][0]


def test_sharded_leaves_stack_under_jit() -> None:
    """Leaves sharded over an Explicit mesh stack (gathered, as leaf by leaf SOAP
    preconditions them replicated), under plain ``jax.jit``: the updates keep each leaf's
    sharding and are the leaf-by-leaf step's."""
    if jax.device_count() < 8:
        pytest.skip("needs 8 host devices (XLA_FLAGS in conftest)")
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
    spec = {"a": jax.P("data"), "a2": jax.P(None, "data"), "v": jax.P()}
    outs = []
    with jax.set_mesh(mesh):
        params = {
            k: jax.device_put(jnp.asarray(v), jax.NamedSharding(mesh, spec[k]))
            for k, v in _tree(0).items()
            if k in spec
        }
        grads = jax.tree.map(lambda p: jnp.sin(p * 3.0), params)
        for stacked in (False, True):
            tx = adam_jax.soap(0.01, block_size=8, stack_blocks=stacked)
            state = tx.init(params)
            step = jax.jit(tx.update)
            for _ in range(3):
                updates, state = step(grads, state, params)
            outs.append(updates)
    for name in spec:
        sharding = params[name].sharding
        assert outs[1][name].sharding.is_equivalent_to(sharding, params[name].ndim), name
        np.testing.assert_allclose(outs[1][name], outs[0][name], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"nu_dtype": adam_jax.factored_second_moment()}, "nu_dtype="),
        (
            {
                "mu_dtype": adam_jax.per_leaf(
                    lambda p: {k: jnp.bfloat16 if k == "w" else None for k in p}
                )
            },
            "per_leaf",
        ),
    ],
    ids=["factored nu", "per-leaf mu"],
)
def test_what_does_not_stack_is_refused(options: dict[str, Any], message: str) -> None:
    """A storage a stack's shape would change, or one that differs between the leaves a stack
    mixes, is refused at ``init``, naming the option; a ``per_leaf`` choosing one storage for
    every leaf stacks."""
    tx = adam_jax.scale_by_soap(block_size=8, stack_blocks=True, **options)
    params = {"w": jnp.ones((16, 8)), "v": jnp.ones((8, 16))}
    with pytest.raises(ValueError, match=re.escape(message)):
        tx.init(params)
    same = adam_jax.per_leaf(lambda p: {k: jnp.bfloat16 for k in p})
    state = adam_jax.scale_by_soap(block_size=8, stack_blocks=True, mu_dtype=same).init(params)
    assert state.stacks.mu["8x8"].dtype == jnp.bfloat16


def test_flat_params_and_a_relayout() -> None:
    """``FlatParams`` are refused as leaf by leaf; a stacked state not spread over devices is
    re-laid as it is (re-laid spread: tests/test_soap_relayout.py), and one of another count of
    devices than it was written on is refused, naming the stack."""
    tx = adam_jax.scale_by_soap(block_size=8, stack_blocks=True)
    with pytest.raises(ValueError, match="FlatParams"):
        tx.init(adam_jax.FlatParams.from_tree({"w": jnp.ones((8, 8))}))
    params = {"w": jnp.ones((16, 8))}
    state = tx.update({"w": _tree(1)["a"][:, :8]}, tx.init(params))[1]
    relaid = adam_jax.relayout_soap_state(state, params, devices_from=1, devices_to=1, block_size=8)
    assert jax.tree.structure(relaid) == jax.tree.structure(state)
    assert jax.tree.all(jax.tree.map(np.array_equal, relaid, state))
    # Spread over 3 devices, the stack's two blocks would have had a slot each on three.
    with pytest.raises(ValueError, match=r"of stack '8x8', dim0 .* are a batch of 3 matrices"):
        adam_jax.relayout_soap_state(state, params, devices_from=3, devices_to=1, block_size=8)


def test_one_dimensional_leaves_stack_with_precondition_1d() -> None:
    """With ``precondition_1d`` a 1-D leaf's blocks join the stacks of their length, with
    those of the leaves ``merge_dims`` makes 1-D (``c`` and ``w``, which keep their factors
    either way); without it the 1-D leaf goes to the vector of the leaves without a factor.
    (Their factors keep a null space, see the module: not compared.)"""
    params = {"v": jnp.ones(10), "c": jnp.ones((4, 2, 2)), "w": jnp.ones((8, 8))}
    grads = {
        k: jnp.sin(jnp.arange(p.size, dtype=jnp.float32)).reshape(p.shape)
        for k, p in params.items()
    }
    for precondition_1d, stacks, rest in ((True, {"8", "2"}, 0), (False, {"8"}, 10)):
        tx = adam_jax.scale_by_soap(
            block_size=8, merge_dims=True, precondition_1d=precondition_1d, stack_blocks=True
        )
        state = tx.init(params)
        assert set(state.stacks.mu) == stacks
        assert state.rest.mu.get("rest", jnp.zeros(0)).size == rest
        for _ in range(3):
            updates, state = tx.update(grads, state)
            assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))


def test_staggered_refreshes_of_one_leaf_as_leaf_by_leaf(x64: None) -> None:
    """With ``stagger_refresh`` the stacks' blocks are numbered stack after stack; for one leaf
    with factors (blocks of three shapes, beside a bias) that is the leaf's own numbering,
    group after group, so the updates are the leaf-by-leaf step's over two windows of
    refreshes (Cholesky QR)."""
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.normal(size=(20, 24))), "b": jnp.zeros(5)}
    options = {
        "block_size": 8,
        "stagger_refresh": True,
        "precondition_frequency": 3,
        "orthogonalization": "cholesky_qr",
    }
    runs = []
    for stacked in (False, True):
        tx = adam_jax.scale_by_soap(stack_blocks=stacked, **options)
        state = tx.init(params)
        step = jax.jit(tx.update)
        updates = []
        for t in range(8):
            draw = np.random.default_rng(t + 1)
            grads = {k: jnp.asarray(draw.normal(size=v.shape)) for k, v in params.items()}
            u, state = step(grads, state, params)
            updates.append(u)
        runs.append(updates)
    for leaf_by_leaf, stacked in zip(*runs, strict=True):
        for name in params:
            np.testing.assert_allclose(stacked[name], leaf_by_leaf[name], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("wrap", ["offload_state", "step_in_slices"])
def test_wrapped_stacked_soap_steps_as_unwrapped(wrap: str) -> None:
    """The state in host memory (``offload_state``) or a leaf stepped in slices of rows
    (``step_in_slices``): their leaf schedules step the stacks as leaves, bit for bit."""
    params = {k: v for k, v in _tree(0).items() if k in ("a", "b", "v")}
    runs = []
    for wrapper in (lambda tx: tx, getattr(adam_jax, wrap)):
        tx = wrapper(adam_jax.soap(0.01, block_size=8, precondition_frequency=2, stack_blocks=True))
        state, p = tx.init(params), params
        step = jax.jit(tx.update)
        updates = []
        for t in range(4):
            u, state = step({k: _tree(t + 1)[k] for k in params}, state, p)
            p = optax.apply_updates(p, u)
            updates.append(u)
        runs.append(updates)
    for plain, wrapped in zip(*runs, strict=True):
        for name in params:
            np.testing.assert_array_equal(wrapped[name], plain[name], err_msg=name)


def test_leaves_of_one_shape_move_as_one_batch() -> None:
    """The stacks hold their blocks kind after kind (the leaves of one shape, in flattening
    order), and each leaf comes back bit for bit. A TPU puts a kind's leaves back all at once
    (``_merged_together``, the columns of blocks concatenated where a leaf has 2 to 7 of them),
    which a CPU's step never runs: run here on every kind, with 2 to 8 blocks along the last
    dimension, remainders and a 3-D leaf, it gives each leaf's own merge."""
    from adam_jax._src.variants.soap.layout import SoapLayout
    from adam_jax._src.variants.soap.stacks import StackPlan, _merged_together

    shapes = [(16, 24), (40, 16), (16, 24), (20, 60), (16, 16, 24), (40, 16), (8, 64), (5,)]
    rng = np.random.default_rng(0)
    leaves = [jnp.asarray(rng.normal(size=s).astype(np.float32)) for s in shapes]
    layout = SoapLayout(
        max_precond_dim=10000, merge_dims=False, precondition_1d=False, block_size=8
    )
    plan = StackPlan.of(leaves, layout)
    stacks, rest = plan.stack(leaves)
    split = [
        layout.groups(layout.shape(s))[0].split(x.reshape(layout.shape(s)))
        for s, x in ((shapes[i], leaves[i]) for i in (0, 2, 1, 5))
    ]
    np.testing.assert_array_equal(
        stacks["8x8"][: sum(len(b) for b in split)], np.concatenate(split)
    )
    counts = set()
    for name, kinds in plan.stacks:
        for kind in kinds:
            m, group = len(kind.leaves), kind.group
            blocks = stacks[name][kind.start : kind.start + kind.n]
            together = _merged_together(group, blocks.reshape(m, group.n, *group.sizes))
            for j in range(m):
                alone = group.merge(blocks[j * group.n : (j + 1) * group.n])
                np.testing.assert_array_equal(together[j], alone, err_msg=name)
            counts.add(group.counts[-1])
    assert {1, 2, 3, 7, 8} <= counts
    for back, leaf in zip(plan.unstack(stacks, rest, leaves), leaves, strict=True):
        np.testing.assert_array_equal(back, leaf)
