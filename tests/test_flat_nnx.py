"""``adam_jax.flat.FlatModel``: an NNX model's params in flat buffers, for ``nnx.Optimizer``.

Trained through ``nnx.Optimizer`` and a donating ``nnx.jit`` step, the flat model ends where the
model with its own params ends (to the rounding of the passes that XLA fuses otherwise, as in
``tests/test_flat.py``), its batch statistics and RNG counts kept, its weight-decay mask
honoured, per-tensor optimizers stepping each packed tensor through
``FlatModel.transformation``; the optimizer sees one buffer, and ``adam_jax.flat`` imports Flax
only when asked."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adam_jax
from adam_jax import flat

nnx = pytest.importorskip("flax.nnx")

STEPS = 3


class _Model(nnx.Module):
    def __init__(self, rngs: nnx.Rngs, norm: str):
        self.l1 = nnx.Linear(8, 16, rngs=rngs)
        self.norm = (
            nnx.BatchNorm(16, rngs=rngs) if norm == "batch" else nnx.LayerNorm(16, rngs=rngs)
        )
        self.drop = nnx.Dropout(0.25, rngs=rngs)
        self.l2 = nnx.Linear(16, 4, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.l2(self.drop(jax.nn.relu(self.norm(self.l1(x)))))


def _train(model: Any, tx: optax.GradientTransformation, steps: int = STEPS) -> tuple[Any, Any]:
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit(donate_argnums=(0, 1))
    def step(model: Any, optimizer: Any, x: jax.Array) -> None:
        grads = nnx.grad(lambda m: jnp.mean((m(x) - 0.5) ** 2))(model)
        optimizer.update(model, grads)

    for i in range(steps):
        step(model, optimizer, jnp.linspace(-1.0, 1.0, 64).reshape(8, 8) * (i + 1))
    return model, optimizer


def _values(tree: Any) -> list[np.ndarray]:
    def value(x: Any) -> np.ndarray:
        return np.asarray(
            jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x
        )

    return [value(x) for x in jax.tree.leaves(tree)]


def _paths(tree: Any) -> list[str]:
    return [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_leaves_with_path(tree)]


def _assert_same_params(got: Any, want: Any) -> None:
    """The params of flat model ``got`` are those of model ``want``, to the rounding of the
    passes that XLA fuses otherwise."""
    for ours, theirs in zip(
        _values(nnx.state(got.to_module(), nnx.Param)),
        _values(nnx.state(want, nnx.Param)),
        strict=True,
    ):
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)


def test_nnx_optimizer_trains_the_flat_model_as_the_model() -> None:
    tx = adam_jax.adamw(1e-2, weight_decay=0.1)
    want, _ = _train(_Model(nnx.Rngs(0), "layer"), tx)
    got, optimizer = _train(flat.FlatModel(_Model(nnx.Rngs(0), "layer")), tx)
    assert len(jax.tree.leaves(nnx.state(got, nnx.Param))) == 1
    assert len(jax.tree.leaves(nnx.as_pure(optimizer.opt_state))) == 3  # count, mu, nu
    assert int(optimizer.step[...]) == STEPS
    trained = got.to_module()
    assert _paths(nnx.state(trained)) == _paths(nnx.state(want))
    for path, ours, theirs in zip(
        _paths(nnx.state(want)), _values(nnx.state(trained)), _values(nnx.state(want)), strict=True
    ):
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6, err_msg=path)
    # The dropout drew as the model's did, and eval() reaches it.
    assert int(trained.drop.rngs.count[...]) == int(want.drop.rngs.count[...]) == STEPS
    x = jnp.ones((2, 8))
    got.eval()
    want.eval()
    np.testing.assert_allclose(got(x), want(x), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(got(x), got(x))  # deterministic now


def test_the_batch_statistics_move_as_the_model_s() -> None:
    """One step: the batch statistics of the flat model are the model's. (Further steps are
    not compared: batch norm leaves the first layer's params gradients of rounding noise in
    some directions, which Adam scales up to the learning rate.)"""
    tx = adam_jax.adamw(1e-2)
    want, _ = _train(_Model(nnx.Rngs(0), "batch"), tx, steps=1)
    got, _ = _train(flat.FlatModel(_Model(nnx.Rngs(0), "batch")), tx, steps=1)
    stats = nnx.state(got.to_module(), nnx.BatchStat)
    assert _paths(stats) == ["['norm']['mean'].value", "['norm']['var'].value"]
    for ours, theirs in zip(_values(stats), _values(nnx.state(want, nnx.BatchStat)), strict=True):
        assert not np.array_equal(ours, np.zeros_like(ours))
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)


def test_the_labels_mask_the_weight_decay_per_buffer() -> None:
    """Labels split the params into a buffer per label; ``mask=model.labels`` decays the
    kernels only, as a mask tree does on the model's own params."""
    model = _Model(nnx.Rngs(0), "layer")
    mask = jax.tree.map(lambda p: p.ndim == 2, nnx.state(model, nnx.Param))
    flat_model = flat.FlatModel(_Model(nnx.Rngs(0), "layer"), labels=mask)
    assert [g.label for g in flat_model.layout.groups] == [False, True]

    def tx(mask: Any) -> optax.GradientTransformation:
        return adam_jax.adamw(1e-2, weight_decay=0.5, mask=mask)

    want, _ = _train(model, tx(lambda params: jax.tree.map(lambda p: p.ndim == 2, params)))
    got, _ = _train(flat_model, tx(flat_model.labels))
    _assert_same_params(got, want)


@pytest.mark.parametrize("name", ["lamb", "adam_mini", "cautious_adamw"])
def test_per_tensor_optimizers_step_each_packed_tensor_through_the_transformation(
    name: str,
) -> None:
    """LAMB's trust ratios, Adam-mini's blocks and caution's per-tensor scale see each packed
    tensor through ``FlatModel.transformation``, so the flat model ends where the model does;
    handed the buffers alone, each would see one tensor per buffer (a param 0.019, 0.060 and
    0.012 away from the model's after three steps)."""
    want, _ = _train(_Model(nnx.Rngs(0), "layer"), adam_jax.registry.create(name, 1e-2))
    model = flat.FlatModel(_Model(nnx.Rngs(0), "layer"))
    got, optimizer = _train(model, model.transformation(adam_jax.registry.create(name, 1e-2)))
    assert int(optimizer.step[...]) == STEPS
    _assert_same_params(got, want)


def test_a_wrapper_read_by_name_goes_around_the_transformation() -> None:
    """``optax.inject_hyperparams`` around the transformation: its rate is read and set by
    name in ``nnx.Optimizer``'s state, and the steps are the model's under the same wrapper."""
    want, wanted = _train(
        _Model(nnx.Rngs(0), "layer"), optax.inject_hyperparams(adam_jax.lamb)(learning_rate=1e-2)
    )
    model = flat.FlatModel(_Model(nnx.Rngs(0), "layer"))
    injected = optax.inject_hyperparams(
        lambda learning_rate: model.transformation(adam_jax.lamb(learning_rate))
    )
    got, optimizer = _train(model, injected(learning_rate=1e-2))
    for opt in (optimizer, wanted):
        assert float(opt.opt_state.hyperparams["learning_rate"][...]) == pytest.approx(1e-2)
    _assert_same_params(got, want)


def test_an_optimizer_that_needs_each_param_in_its_shape_refuses_the_buffers() -> None:
    """SOAP's factors need each tensor's shape: through the transformation it refuses the
    packed buffers in one line, where the buffers alone would have been stepped as vectors."""
    model = flat.FlatModel(_Model(nnx.Rngs(0), "layer"))
    with pytest.raises(ValueError, match="soap needs each param in its own shape"):
        _train(model, model.transformation(adam_jax.soap(1e-2)), steps=1)


def test_adam_jax_flat_imports_flax_only_when_flat_model_is_read() -> None:
    code = (
        "import sys, adam_jax, adam_jax.flat as f; assert 'flax' not in sys.modules; "
        "f.FlatModel; assert 'flax' in sys.modules; print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ok"
