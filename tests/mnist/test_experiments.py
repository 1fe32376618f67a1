"""The helpers of the optimizer experiments notebook (``examples/experiments.py``)."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adam_jax
from examples import experiments as ex
from examples.mnist import data


def test_rosenbrock_has_its_minimum_at_one_one() -> None:
    assert float(ex.rosenbrock(jnp.array([1.0, 1.0]))) == 0.0
    np.testing.assert_array_equal(jax.grad(ex.rosenbrock)(jnp.array([1.0, 1.0])), [0.0, 0.0])
    assert float(ex.rosenbrock(jnp.array([-1.5, 2.0]))) == pytest.approx(2.5**2 + 100 * 0.25**2)


def test_quadratic_has_the_curvatures_along_the_rotated_axes() -> None:
    angle, condition = np.pi / 6, 50.0
    hessian = np.asarray(
        jax.hessian(ex.ill_conditioned_quadratic)(jnp.zeros(2), condition, angle), np.float64
    )
    eigenvalues, eigenvectors = np.linalg.eigh(hessian)
    np.testing.assert_allclose(eigenvalues, [1.0, condition], rtol=1e-5)
    steep = eigenvectors[:, 1] * np.sign(eigenvectors[1, 1])
    np.testing.assert_allclose(steep, [-np.sin(angle), np.cos(angle)], atol=1e-6)


@pytest.mark.parametrize(
    "tx",
    [optax.sgd(1e-3, momentum=0.9), adam_jax.adam(0.05), adam_jax.schedule_free_adamw(0.05)],
    ids=["sgd", "adam", "schedule_free"],
)
def test_trajectory_is_the_optimizers_steps(tx: optax.GradientTransformation) -> None:
    path = ex.trajectory(tx, ex.rosenbrock, (-1.5, 2.0), 25)
    x = jnp.array([-1.5, 2.0])
    state = tx.init(x)
    expected = [np.asarray(x)]
    for _ in range(25):
        updates, state = tx.update(jax.grad(ex.rosenbrock)(x), state, x)
        x = optax.apply_updates(x, updates)
        expected.append(np.asarray(x))
    assert path.shape == (26, 2)
    np.testing.assert_allclose(path, np.array(expected), rtol=1e-5, atol=1e-6)


def test_plot_paths_draws_each_path_and_the_minimum() -> None:
    from matplotlib.figure import Figure

    ax = Figure().subplots()
    paths = {"a": np.zeros((3, 2)), "b": np.ones((4, 2))}
    ex.plot_paths(ax, ex.rosenbrock, paths, ((-2.0, 2.0), (-1.0, 3.0)), (1.0, 1.0))
    assert [line.get_label() for line in ax.get_lines()][:2] == ["a", "b"]
    assert len(ax.get_lines()) == 3
    assert ax.get_xlim() == (-2.0, 2.0)


def test_reddi_gradient_sums_to_c_minus_two_over_three_steps() -> None:
    steps = jnp.arange(1, 10)
    gradients = np.asarray(ex.reddi_gradient(steps, 3.0))
    np.testing.assert_array_equal(gradients, [3, -1, -1] * 3)


def _reddi_optimizers(c: float) -> dict[str, optax.GradientTransformation]:
    b2 = 1 / (1 + c**2)

    def lr(count: jax.Array) -> jax.Array:
        return 0.5 / jnp.sqrt(count + 1.0)

    return {
        "adam": adam_jax.adam(lr, b1=0.0, b2=b2),
        "amsgrad": adam_jax.amsgrad(lr, b1=0.0, b2=b2),
        "adopt": adam_jax.adopt(lr, b1=0.0, b2=b2),
    }


def test_adam_converges_to_the_wrong_point_amsgrad_and_adopt_do_not() -> None:
    """Reddi et al. (2018), Theorem 1: with b1 = 0 and b2 = 1 / (1 + c^2), Adam goes to
    x = +1, where the average regret stays positive; AMSGrad (their fix) and ADOPT go to the
    optimum x = -1."""
    c = 3.0
    points = {
        name: ex.online_counterexample(tx, 6000, c) for name, tx in _reddi_optimizers(c).items()
    }
    for path in points.values():
        assert path.min() >= -1.0 and path.max() <= 1.0  # projected onto the box
    assert points["adam"][-300:].mean() > 0.99
    assert ex.average_regret(points["adam"], c)[-1] > 0.6
    for name in ("amsgrad", "adopt"):
        assert points[name][-300:].mean() < -0.99, name
        assert abs(ex.average_regret(points[name], c)[-1]) < 0.01, name


def test_average_regret_is_the_mean_loss_against_minus_one() -> None:
    rng = np.random.default_rng(0)
    path, c = rng.uniform(-1, 1, 50), 2.5
    losses = [(c if t % 3 == 1 else -1.0) * (x + 1.0) for t, x in enumerate(path, start=1)]
    expected = np.cumsum(losses) / np.arange(1, 51)
    np.testing.assert_allclose(ex.average_regret(path, c), expected, rtol=1e-12)


def test_mlp_init_draws_the_scaled_normal_weights() -> None:
    params = ex.mlp_init(jax.random.key(0), (400, 300, 10), scale=2.0)
    assert [layer["w"].shape for layer in params] == [(400, 300), (300, 10)]
    assert np.std(np.asarray(params[0]["w"])) == pytest.approx(2.0 / np.sqrt(400), rel=0.02)
    assert all(float(jnp.abs(layer["b"]).max()) == 0.0 for layer in params)
    logits = ex.mlp_apply(params, jnp.ones((5, 400)))
    assert logits.shape == (5, 10)


def test_layer_gradient_norms_are_the_norms_of_jax_grad() -> None:
    params = ex.mlp_init(jax.random.key(1), (20, 16, 16, 3))
    images = jax.random.normal(jax.random.key(2), (8, 20))
    labels = jnp.arange(8) % 3
    grads = jax.grad(ex.cross_entropy)(params, images, labels, "tanh")
    expected = [np.linalg.norm(np.asarray(g["w"])) for g in grads]
    np.testing.assert_allclose(
        ex.layer_gradient_norms(params, images, labels, "tanh"), expected, rtol=1e-5
    )


def test_sigmoid_gradients_vanish_with_depth_relu_he_gradients_do_not() -> None:
    sizes = (32,) + (32,) * 12 + (4,)
    images = jax.random.normal(jax.random.key(0), (64, 32))
    labels = jnp.arange(64) % 4
    sigmoid = ex.layer_gradient_norms(
        ex.mlp_init(jax.random.key(1), sizes, 1.0), images, labels, "sigmoid"
    )
    relu = ex.layer_gradient_norms(ex.mlp_init(jax.random.key(1), sizes), images, labels)
    assert sigmoid[0] < 1e-5 * sigmoid[-1]
    assert 0.1 < relu[0] / relu[-1] < 10


def test_update_rms_of_one_sgd_step_is_lr_times_the_gradient_rms() -> None:
    params = ex.mlp_init(jax.random.key(0), (20, 16, 3))
    images = jax.random.normal(jax.random.key(2), (8, 20))
    labels = jnp.arange(8) % 3
    norms = ex.layer_gradient_norms(params, images, labels)
    sizes = np.array([layer["w"].size for layer in params])
    rms = ex.layer_update_rms(optax.sgd(0.1), params, images, labels, steps=1)
    np.testing.assert_allclose(rms, 0.1 * norms / np.sqrt(sizes), rtol=1e-5)
    # Adam's first step is lr * g / (|g| + eps): lr in every coordinate with |g| >> eps.
    adam = ex.layer_update_rms(adam_jax.adam(1e-3), params, images, labels, steps=1)
    np.testing.assert_allclose(adam, 1e-3, rtol=1e-3)


def _templates(n_train: int = 600, n_test: int = 200, seed: int = 0) -> ex.Data:
    """Ten noisy class templates in 64 dimensions: learnable in a few hundred steps."""
    rng = np.random.default_rng(seed)
    templates = rng.uniform(0, 1, (10, 64))

    def split(n: int) -> tuple[jax.Array, jax.Array]:
        labels = rng.integers(0, 10, n)
        images = templates[labels] + 0.3 * rng.standard_normal((n, 64))
        return jnp.asarray(images, jnp.float32), jnp.asarray(labels, jnp.int32)

    return ex.Data(*split(n_train), *split(n_test))


def test_train_mlp_learns_and_records_every_step() -> None:
    history = ex.train_mlp(
        adam_jax.adam(3e-3), _templates(), hidden=(32,), steps=200, batch_size=50, eval_every=50
    )
    assert history.loss.shape == history.grad_norm.shape == history.weight_norm.shape == (200,)
    np.testing.assert_array_equal(history.eval_step, [50, 100, 150, 200])
    assert history.test_accuracy[-1] > 0.95
    assert history.loss[-20:].mean() < 0.2 * history.loss[:5].mean()


def test_train_mlp_records_the_initial_model_when_nothing_moves() -> None:
    """With a zero learning rate each step's loss is the initial model's loss on its batch,
    and the weight norm is the initial one."""
    dataset = _templates()
    history = ex.train_mlp(
        optax.sgd(0.0), dataset, hidden=(16,), steps=20, batch_size=100, eval_every=10
    )
    params = ex.mlp_init(jax.random.key(0), (64, 16, 10))
    batches = ex.shuffled_batches(len(dataset.train_labels), 20, 100, 0)
    expected = [
        float(ex.cross_entropy(params, dataset.train_images[b], dataset.train_labels[b]))
        for b in batches
    ]
    np.testing.assert_allclose(history.loss, expected, rtol=1e-5)
    np.testing.assert_allclose(history.weight_norm, float(ex.weight_norm(params)), rtol=1e-6)


def test_train_mlp_evaluates_what_eval_params_gives() -> None:
    """Evaluated at all-zero params, every logit ties and argmax picks class 0."""
    dataset = _templates()
    history = ex.train_mlp(
        adam_jax.adam(1e-3),
        dataset,
        hidden=(8,),
        steps=20,
        eval_every=10,
        eval_params=lambda params, state: jax.tree.map(jnp.zeros_like, params),
    )
    zero_share = float(jnp.mean(dataset.test_labels == 0))
    np.testing.assert_allclose(history.test_accuracy, zero_share)


def test_train_mlp_donates_a_schedule_free_state() -> None:
    history = ex.train_mlp(
        adam_jax.schedule_free_adamw(3e-3, warmup_steps=10),
        _templates(),
        hidden=(32,),
        steps=200,
        batch_size=50,
        eval_every=50,
        eval_params=lambda params, state: adam_jax.schedule_free_eval_params(state, params),
    )
    assert history.test_accuracy[-1] > 0.8


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"steps": 120, "eval_every": 50}, "steps must be a positive multiple of eval_every"),
        ({"batch_size": 1000}, "batch_size must be at most the 600 examples, got 1000"),
    ],
)
def test_train_mlp_rejects_bad_sizes(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ex.train_mlp(optax.sgd(0.1), _templates(), **options)


def test_batches_are_shuffled_epochs() -> None:
    batches = np.asarray(
        ex.shuffled_batches(100, 7, 30, seed=3)
    )  # 3 batches per epoch, 10 left out
    assert batches.shape == (7, 30)
    for epoch in range(2):
        seen = batches[3 * epoch : 3 * epoch + 3].ravel()
        assert len(set(seen.tolist())) == 90
    assert not np.array_equal(batches[:3], batches[3:6])


def test_smooth_is_the_running_mean() -> None:
    values = np.random.default_rng(0).standard_normal(30)
    expected = [values[max(0, i - 4) : i + 1].mean() for i in range(30)]
    np.testing.assert_allclose(ex.smooth(values, 5), expected, rtol=1e-12)


def test_default_data_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(data.ENV_DATA_DIR, str(tmp_path / "env"))
    assert ex.default_data_dir() == tmp_path / "env"
    monkeypatch.delenv(data.ENV_DATA_DIR)
    monkeypatch.setattr(ex, "BESIDE_THE_CHECKOUT", tmp_path / "beside")
    assert ex.default_data_dir() is None
    (tmp_path / "beside").mkdir()
    assert ex.default_data_dir() == tmp_path / "beside"


def test_load_mnist_gives_flat_scaled_subsets(mnist_dir: Path) -> None:
    subset = ex.load_mnist(train_size=300, test_size=200, data_dir=mnist_dir)
    assert subset.train_images.shape == (300, 784) and subset.test_images.shape == (200, 784)
    assert subset.train_images.dtype == jnp.float32
    assert float(subset.train_images.min()) == 0.0 and float(subset.train_images.max()) == 1.0
    full = data.load("mnist", mnist_dir)
    np.testing.assert_array_equal(subset.test_labels, full.test.labels[:200])
