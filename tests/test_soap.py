"""SOAP beyond the generic table of ``tests/variants.py``.

The table checks every option against the float64 reference (``tests/references/soap.py``) on
the standard problem, whose factors are full rank or short of it by one. Here:

* the options whose factors lack more rank at the first gradient (``precondition_1d``: a
  vector's factor :math:`gg^\\top` has rank one; ``merge_dims`` merging a matrix into one
  dimension), whose first eigenbasis is arbitrary: against the reference with the basis
  pinned to ours after the first step;
* tensors of three dimensions, merged or not, whose factors are full rank: against the
  reference;
* invariants: the bases stay orthogonal, the first step is zero (decay included), a loss
  decreases in float32.
"""

from __future__ import annotations

import collections
import re
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from references.common import make_problem, run_jax, run_reference
from references.soap import RefSoap

import adam_jax
from adam_jax._src.variants.soap import SoapLayout, SoapRule
from adam_jax._src.variants.soap import rule as soap_rule
from adam_jax._src.variants.soap.transform import _scale_by_soap


def _relative_error(actual: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> float:
    return max(
        float(np.max(np.abs(actual[k] - expected[k])))
        / max(float(np.max(np.abs(expected[k]))), 1e-300)
        for k in expected
    )


def run_with_bases_pinned(
    tx: optax.GradientTransformation, ref: RefSoap, problem: Any, steps: int, layout: SoapLayout
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Float64 runs of ``tx`` and the reference ``ref`` on ``problem``, the reference's bases
    (each block's, with ``layout.block_size``) set to ours after the first step: a
    rank-deficient first factor's eigenbasis is arbitrary. Returns both final params."""
    keys = problem.keys
    ours = {k: jnp.asarray(problem.params[k], jnp.float64) for k in keys}
    theirs = {k: np.asarray(problem.params[k], np.float64) for k in keys}
    state, update = tx.init(ours), jax.jit(tx.update)
    ref.init([theirs[k] for k in keys])
    for step in range(steps):
        updates, state = update(problem.grad(ours, step, xp=jnp), state, ours)
        ours = optax.apply_updates(ours, updates)
        grads = problem.grad(theirs, step)
        ref_updates = ref.update([grads[k] for k in keys], [theirs[k] for k in keys])
        theirs = {k: theirs[k] + u for k, u in zip(keys, ref_updates, strict=True)}
        if step > 0:
            continue
        for i, k in enumerate(keys):
            q, shape = np.asarray(state[0].q[k]), problem.params[k].shape
            if layout.block_size is not None:
                for block, bases in zip(
                    ref.state[i]["blocks"], layout.unpack_blocks(q, shape), strict=True
                ):
                    block["Q"] = bases
            elif any(b is not None for b in layout.unpack(q, shape)):  # a scalar's basis is 1
                ref.state[i]["Q"] = layout.unpack(q, shape)
    return {k: np.asarray(v) for k, v in ours.items()}, theirs


@pytest.mark.parametrize(
    "options",
    [{"precondition_1d": True}, {"merge_dims": True, "precondition_frequency": 15}],
    ids=["precondition_1d", "merge_dims"],
)
def test_rank_deficient_factors_with_the_basis_pinned(options: dict, x64: None) -> None:
    """After the first step the reference takes our eigenbases (its own are another choice
    in the null space of a rank-deficient factor); the next steps, refreshes included, agree.
    The first refresh comes when the factors are full rank (a refresh of a rank-deficient
    factor, one power-iteration step, leaves the null space's basis arbitrary again)."""
    steps = 40
    problem = make_problem(seed=3, steps=steps)
    tx = adam_jax.soap(1e-2, weight_decay=0.05, **options)
    ref = RefSoap(learning_rate=1e-2, weight_decay=0.05, **options)
    layout = _rule(**options).layout
    ours, theirs = run_with_bases_pinned(tx, ref, problem, steps, layout)
    assert _relative_error(ours, theirs) < 1e-8


@pytest.mark.parametrize(
    ("shape", "options"),
    [((2, 3, 4), {}), ((2, 2, 4), {"merge_dims": True, "max_precond_dim": 4})],
    ids=["3d", "3d_merged"],
)
def test_three_dimensional_leaves_against_the_reference(
    shape: tuple, options: dict, x64: None
) -> None:
    """A tensor whose unfoldings are all wide (full-rank factors), and one that merges into a
    square matrix ((2, 2, 4) -> (4, 4)), beside the standard vector and scalar."""
    steps = 60
    problem = make_problem(seed=4, steps=steps, shapes={"b": (5,), "s": (), "w": shape})
    expected, _ = run_reference(RefSoap(learning_rate=1e-2, **options), problem, steps)
    traj, _, _ = run_jax(adam_jax.soap(1e-2, **options), problem, steps, dtype=np.float64)
    assert _relative_error(traj, expected) < 1e-8


def test_bases_stay_orthogonal_and_the_loss_decreases() -> None:
    """float32 least squares ``|X W + b - Y|^2`` with W (8, 6): the bases are orthogonal after
    refreshes, and the loss falls to a tenth of its start."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((64, 8)), jnp.float32)
    y = x @ jnp.asarray(rng.standard_normal((8, 6)), jnp.float32) + 0.5
    params = {"w": jnp.zeros((8, 6)), "b": jnp.zeros(6)}

    def loss(p: Any) -> jax.Array:
        return jnp.mean((x @ p["w"] + p["b"] - y) ** 2)

    tx = adam_jax.soap(0.1, precondition_frequency=5, precondition_1d=True)
    state = tx.init(params)

    @jax.jit
    def step(p: Any, state: Any) -> tuple[Any, Any]:
        updates, state = tx.update(jax.grad(loss)(p), state, p)
        return optax.apply_updates(p, updates), state

    start = float(loss(params))
    for _ in range(60):
        params, state = step(params, state)
    assert float(loss(params)) < 0.1 * start
    layout = SoapLayout(10000, False, True)
    for k, p in params.items():
        for q in layout.unpack(np.asarray(state[0].q[k]), p.shape):
            assert q is not None
            np.testing.assert_allclose(q.T @ q, np.eye(q.shape[0]), atol=1e-5)


def test_first_step_is_zero_even_with_weight_decay() -> None:
    tx = adam_jax.soap(1e-2, weight_decay=0.5)
    params = {"w": jnp.ones((3, 3))}
    updates, state = tx.update({"w": jnp.ones((3, 3))}, tx.init(params), params)
    assert not np.any(np.asarray(updates["w"]))
    assert int(state[0].count) == 1
    updates, _ = tx.update({"w": jnp.ones((3, 3))}, state, params)
    assert np.all(np.asarray(updates["w"]) < 0)


def test_complex_params_are_refused() -> None:
    with pytest.raises(ValueError, match="complex"):
        adam_jax.soap(1e-2).init({"w": jnp.ones((2, 2), jnp.complex64)})


# Blocks (block_size) and staggered refreshes (stagger_refresh).


def _assert_trees_equal(actual: Any, expected: Any) -> None:
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(e))


def test_a_block_size_of_every_dimension_is_unblocked_soap_bit_for_bit() -> None:
    """float32, 25 steps with refreshes at 5, 10, ...: params, updates and state equal."""
    problem = make_problem(seed=6, steps=25, shapes={"w": (12, 10), "t": (3, 4, 5)})
    options = {"precondition_frequency": 5, "weight_decay": 0.1}
    runs = []
    for block_size in (None, 12):
        tx = adam_jax.soap(1e-2, block_size=block_size, **options)
        params = {k: jnp.asarray(v, jnp.float32) for k, v in problem.params.items()}
        state, update = tx.init(params), jax.jit(tx.update)
        history = []
        for step in range(25):
            updates, state = update(problem.grad(params, step, xp=jnp), state, params)
            params = optax.apply_updates(params, updates)
            history.append(updates)
        runs.append((params, history, state))
    _assert_trees_equal(runs[0], runs[1])


@pytest.mark.parametrize(
    ("shapes", "options", "mask"),
    [
        (
            # 12 = 3 x 4 and 10 = 2 x 4 + 2; (6, 5, 4): 4 + 2, 4 + 1, 4; a vector 4 + 4 + 1.
            {"w": (12, 10), "t": (6, 5, 4), "b": (9,), "s": ()},
            {
                "block_size": 4,
                "precondition_frequency": 5,
                "precondition_1d": True,
                "normalize_grads": True,
            },
            {"w": True, "t": True, "b": False, "s": False},
        ),
        (
            # The 12 rows of w get no factor (max_precond_dim), its 10 columns 4 + 4 + 2;
            # (2, 3, 8) merges into (6, 8): 4 + 2 by 4 + 4; (4, 3) is one block. Staggered,
            # a block refreshes as early as after the second gradient: no block here is so
            # thin that its factors then lack more rank than one.
            {"w": (12, 10), "u": (2, 3, 8), "c": (4, 3), "s": ()},
            {
                "block_size": 4,
                "merge_dims": True,
                "max_precond_dim": 10,
                "precondition_frequency": 3,
                "stagger_refresh": True,
            },
            None,
        ),
    ],
    ids=["blocks", "blocks_merged_staggered"],
)
def test_blocks_and_staggered_refreshes_against_the_reference(
    shapes: dict, options: dict, mask: dict | None, x64: None
) -> None:
    """Float64 trajectories of ours and of the reference (independent SOAP per block), the
    reference's bases pinned to ours after the first step: blocks at a ragged edge
    (``(4, 2)`` of a ``(12, 10)`` matrix by 4) have rank-deficient first factors, whose
    eigenbasis is arbitrary (see the module). The pinning checks the order of the blocks in
    the state too."""
    steps = 13
    problem = make_problem(seed=5, steps=steps, shapes=shapes)
    keys = problem.keys
    tx = adam_jax.soap(1e-2, weight_decay=0.05, mask=mask, **options)
    ref = RefSoap(
        learning_rate=1e-2,
        weight_decay=0.05,
        mask=None if mask is None else [mask[k] for k in keys],
        **options,
    )
    ours, theirs = run_with_bases_pinned(tx, ref, problem, steps, _rule(**options).layout)
    assert _relative_error(ours, theirs) < 1e-8


def _rule(**options: Any) -> Any:
    rule = adam_jax.registry.get("soap").rule
    assert rule is not None
    return rule(**options)


def _refreshed_blocks(layout: SoapLayout, before: Any, after: Any, params: Any) -> int:
    """The number of blocks whose bases differ between two states' ``q``."""
    count = 0
    for k, p in params.items():
        old = layout.unpack_blocks(np.asarray(before[k]), p.shape)
        new = layout.unpack_blocks(np.asarray(after[k]), p.shape)
        for o, n in zip(old, new, strict=True):
            count += any(
                a is not None and not np.array_equal(a, b) for a, b in zip(o, n, strict=True)
            )
    return count


def test_staggered_refreshes_spread_the_blocks_over_the_window() -> None:
    """``precondition_frequency`` 4 and 4 + 8 + 4 blocks over three leaves (numbered across
    the tree; the vector has no factor): from the second step, every step refreshes the bases
    of 4 of the 16 blocks (a block's bases change only when it refreshes), where without
    staggering all 16 refresh every fourth step. An injected (traced)
    ``precondition_frequency``, with no static offset classes, computes a group's refreshes
    and keeps the due blocks': the same blocks, the same state to float32 rounding."""
    params = {"a": jnp.ones((2, 8)), "b": jnp.ones((8, 4)), "c": jnp.ones((4, 3)), "d": jnp.ones(3)}
    rng = np.random.default_rng(0)
    grads = [
        jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), jnp.float32), params)
        for _ in range(6)
    ]
    options = {"block_size": 2, "precondition_frequency": 4, "stagger_refresh": True}
    layout = _rule(**options).layout
    injected = optax.inject_hyperparams(adam_jax.scale_by_soap, static_args=("block_size",))
    states = []
    for tx in (adam_jax.scale_by_soap(**options), injected(**options)):
        state, update = tx.init(params), jax.jit(tx.update)
        _, state = update(grads[0], state, params)
        changed = []
        for g in grads[1:]:
            before = state
            _, state = update(g, state, params)
            changed.append(_refreshed_blocks(layout, _inner(before).q, _inner(state).q, params))
        assert changed == [4] * 5
        states.append(_inner(state))
    for a, e in zip(jax.tree.leaves(states[1]), jax.tree.leaves(states[0]), strict=True):
        np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-6)


def test_staggered_blocks_are_computed_once_a_window(monkeypatch: pytest.MonkeyPatch) -> None:
    """A leaf of 6 blocks refreshing every 4 steps, staggered: 2 blocks due at some steps, 1
    at the others. Over two windows the refreshes compute 12 blocks' bases, each block's
    twice: the step's last pick, due at some steps only, waits on a branch (run eagerly,
    only the branch taken computes), not 2 blocks every step (16)."""
    computed: list[int] = []

    def counting(factors: list[jax.Array | None], *args: Any) -> Any:
        computed.append(next(f.shape[0] for f in factors if f is not None))
        return refresh_blocks(factors, *args)

    refresh_blocks = soap_rule._refresh_blocks
    monkeypatch.setattr(soap_rule, "_refresh_blocks", counting)
    params = {"a": jnp.ones((12, 2))}
    tx = adam_jax.scale_by_soap(block_size=2, precondition_frequency=4, stagger_refresh=True)
    state = tx.init(params)
    for t in range(9):  # the first step only initializes the factors and bases
        grads = {"a": jnp.sin((t + 1.0) * jnp.arange(24.0).reshape(12, 2))}
        _, state = tx.update(grads, state, params)
    assert sum(computed) == 12


def _linear_algebra_operands(text: str) -> dict[str, set[str]]:
    """The operand types of each ``eigh`` or QR kernel (a custom call) in a program's text."""
    found: dict[str, set[str]] = {}
    for name, types in re.findall(r"custom_call @(\w+)\([^)]*\)[^\n]*?: \(([^)]*)\)", text):
        if any(kernel in name for kernel in ("geqrf", "orgqr", "syevd", "syevj", "eigh")):
            found.setdefault(name, set()).add(types.split(", ")[0])
    return found


@pytest.mark.parametrize("stagger_refresh", [False, True])
def test_blocked_bases_are_computed_one_matrix_at_a_time_on_cpu(stagger_refresh: bool) -> None:
    """jaxlib 0.10's batched CPU kernels for ``eigh`` and QR share a batch out over XLA:CPU's
    thread pool and wait for it on a pool thread: as many at once as the pool has threads
    (groups of 128-blocks on a 2-core machine) deadlocked the step. The CPU program calls
    them on single matrices; the GPU program keeps them batched."""
    params = {"a": jnp.ones((16, 24)), "b": jnp.ones((24, 8, 4)), "c": jnp.ones(4)}
    tx = adam_jax.scale_by_soap(
        block_size=8, precondition_frequency=2, stagger_refresh=stagger_refresh
    )
    state = tx.init(params)
    on_cpu = _linear_algebra_operands(jax.jit(tx.update).lower(params, state, params).as_text())
    assert {name.split("_")[1][1:] for name in on_cpu} == {"geqrf", "orgqr", "syevd"}
    assert all(re.fullmatch(r"tensor<\d+x\d+xf32>", t) for ts in on_cpu.values() for t in ts)
    exported = jax.export.export(jax.jit(tx.update), platforms=["cuda"])(params, state, params)
    on_gpu = _linear_algebra_operands(exported.mlir_module())
    assert any(re.fullmatch(r"tensor<\d+x8x8xf32>", t) for ts in on_gpu.values() for t in ts)


def _branches(jaxpr: Any, depth: int = 0) -> list[tuple[int, int]]:
    """(depth, branches) of each ``cond`` of ``jaxpr`` and the jaxprs inside it, but those of
    ``lax.platform_dependent`` (resolved when the program is lowered for a platform) and
    Cholesky QR's (on whether any matrix is not yet orthonormal: ``reduce_or``)."""
    found, producers = [], {}

    def made_by(var: Any) -> str | None:
        eqn = producers.get(var)
        if eqn is not None and eqn.primitive.name == "convert_element_type":
            return made_by(eqn.invars[0])  # a predicate turned into a branch index
        return None if eqn is None else eqn.primitive.name

    for eqn in jaxpr.eqns:
        producers.update(dict.fromkeys(eqn.outvars, eqn))
        if eqn.primitive.name == "cond" and made_by(eqn.invars[0]) not in (
            "platform_index",
            "reduce_or",
        ):
            found.append((depth, len(eqn.params["branches"])))
        for inner in jax.extend.core.jaxprs_in_params(eqn.params):
            found += _branches(inner, depth + 1)
    return found


def _stepped_side_by_side(
    transforms: Any, params: Any, steps: int
) -> Iterator[list[tuple[Any, Any]]]:
    """Each step's ``(updates, state)`` of every transformation, jitted, from its own state on
    the same gradients (sines of the params' running sums, another frequency each step)."""
    states = [tx.init(params) for tx in transforms]
    jitted = [jax.jit(tx.update) for tx in transforms]
    for t in range(steps):
        grads = jax.tree.map(
            lambda p, t=t: jnp.sin((t + 1.0) * jnp.cumsum(p).reshape(p.shape)), params
        )
        outs = [step(grads, state, params) for step, state in zip(jitted, states, strict=True)]
        states = [state for _, state in outs]
        yield outs


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"block_size": 4},
        {"stagger_refresh": True},
        {"block_size": 4, "stagger_refresh": True},
        {"block_size": 4, "first_basis": "power"},
    ],
    ids=["unblocked", "blocks", "staggered leaves", "staggered blocks", "power start"],
)
def test_one_branch_a_step_computes_what_a_branch_per_leaf_does(options: dict, x64: None) -> None:
    """With ``branching="tree"`` (the default off the CPU) SOAP chooses the step's phase once
    for the tree (one ``lax.switch``: the first step, a step, a step then every refresh; the
    first two with ``stagger_refresh``, whose leaves refresh at their own offsets); the rule
    given to ``scale_by_rule`` (the CPU's) branches in each leaf. Same updates and state to
    float64 rounding over a first step, refreshes and steps between them, with the first
    step's and the refreshes' calls stacked across leaves (the default off the CPU) or not,
    and no branch on the count left inside the tree's switch."""
    params = {"a": jnp.ones((6, 4)), "b": jnp.ones((4, 3, 2)), "c": jnp.ones(4)}
    trees = [
        _scale_by_soap(SoapRule(precondition_frequency=2, **options), branching="tree", stack=s)
        for s in (False, True)
    ]
    rule = SoapRule(precondition_frequency=2, **options)
    if rule.stagger_refresh:
        rule = rule.with_leaf_starts(params)
    per_leaf = adam_jax.rules.scale_by_rule(rule)
    for outs in _stepped_side_by_side((*trees, per_leaf), params, 6):
        for tree_out in outs[:2]:
            for ours, theirs in zip(
                jax.tree.leaves(tree_out), jax.tree.leaves(outs[2]), strict=True
            ):
                np.testing.assert_allclose(ours, theirs, rtol=1e-12, atol=1e-12)
    tree = trees[1]
    found = [
        _branches(jax.make_jaxpr(tx.update)(params, tx.init(params), params).jaxpr)
        for tx in (tree, per_leaf)
    ]
    if rule.stagger_refresh:  # the leaves' refreshes branch inside the step's phase
        assert found[0][0] == (0, 2) and all(depth > 0 for depth, _ in found[0][1:])
        assert len(found[0]) < len(found[1])
    else:
        assert found[0] == [(0, 3)]


@pytest.mark.parametrize("block_size", [None, 4])
def test_stacked_calls_step_compressed_state_bit_for_bit(block_size: int | None) -> None:
    """The setting to use's storages (8-bit ``mu``, bfloat16 ``nu``, factors and bases,
    unrectified bases) and Cholesky QR: the first step's and the refreshes' calls stacked
    across leaves (every leaf stepped at once) give the updates and state of the calls made
    leaf by leaf (each leaf's decoded moments after the previous leaf's), bit for bit over a
    first step, two refreshes and the steps between."""
    params = {
        "a": jnp.ones((64, 96)),
        "b": jnp.ones((96, 64)),
        "c": jnp.ones((32, 8, 4)),
        "d": jnp.ones(64),
    }
    options = {
        "precondition_frequency": 2,
        "block_size": block_size,
        "mu_dtype": adam_jax.BlockwiseQuantized(),
        "nu_dtype": jnp.bfloat16,
        "factor_dtype": jnp.bfloat16,
        "basis_dtype": jnp.bfloat16,
        "basis_rectification": 0,
        "orthogonalization": "cholesky_qr",
    }
    transforms = [
        _scale_by_soap(SoapRule(**options), branching="tree", stack=s) for s in (False, True)
    ]
    for outs in _stepped_side_by_side(transforms, params, 5):
        for leaf, stacked in zip(jax.tree.leaves(outs[0]), jax.tree.leaves(outs[1]), strict=True):
            np.testing.assert_array_equal(np.asarray(stacked), np.asarray(leaf))


def _stripped(module: str) -> str:
    """A StableHLO module's text without its source locations."""
    return re.sub(r"#loc\d*|loc\([^)]*\)", "", module)


@pytest.mark.parametrize("block_size", [None, 4])
def test_the_default_branches_per_leaf_for_blocks_on_the_cpu_and_once_for_the_tree_elsewhere(
    block_size: int | None,
) -> None:
    """``scale_by_soap``'s program exported for CUDA is the tree's switch, and for the CPU the
    per-leaf branching's with blocks (the other traced but not lowered), the tree's without:
    its products and loops as many as the chosen structure's, not the other's (the branches
    differ by the platform's selection)."""
    params = {"a": jnp.ones((6, 4)), "b": jnp.ones((4, 3, 2)), "c": jnp.ones(4)}
    options = {"precondition_frequency": 2, "block_size": block_size}
    state = adam_jax.scale_by_soap(**options).init(params)

    def branches(tx: optax.GradientTransformation, platform: str) -> collections.Counter:
        exported = jax.export.export(jax.jit(tx.update), platforms=[platform])
        text = _stripped(exported(params, state, params).mlir_module())
        return collections.Counter(re.findall(r"stablehlo\.(dot_general|while)\b", text))

    on_cpu = ("leaf", "tree") if block_size else ("tree", "leaf")
    for platform, (chosen, other) in (("cpu", on_cpu), ("cuda", ("tree", "leaf"))):
        default = branches(adam_jax.scale_by_soap(**options), platform)
        structures = {
            b: branches(_scale_by_soap(SoapRule(**options), b), platform) for b in (chosen, other)
        }
        assert default == structures[chosen], (platform, default, structures)
        assert default != structures[other], (platform, default, structures)


def test_an_unknown_branching_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match=r"branching must be one of \('auto', 'tree', 'leaf'\)"):
        _scale_by_soap(SoapRule(), branching="both")


def _inner(state: Any) -> Any:
    """SOAP's state, inside ``inject_hyperparams``' or not."""
    return state.inner_state if hasattr(state, "inner_state") else state


STATIC_COUNTS = [("block_size", 1), ("basis_rectification", 0)]


@pytest.mark.parametrize(("name", "minimum"), STATIC_COUNTS)
@pytest.mark.parametrize("value", ["below", -3, 2.5, True, "4"])
def test_bad_static_counts_are_refused_by_name(name: str, minimum: int, value: Any) -> None:
    value = minimum - 1 if value == "below" else value
    with pytest.raises(ValueError, match=rf"{name} must be None or an integer >= {minimum}"):
        adam_jax.soap(1e-2, **{name: value})


@pytest.mark.parametrize(("name", "minimum"), STATIC_COUNTS)
def test_an_injected_static_count_is_refused_with_its_remedy(name: str, minimum: int) -> None:
    tx = optax.inject_hyperparams(adam_jax.soap)(1e-2, **{name: minimum + 1})
    with pytest.raises(ValueError, match=rf"{name}.*static_args"):
        tx.init({"w": jnp.ones((8, 8))})
