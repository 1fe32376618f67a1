"""Helpers of the optimizer experiments notebook, ``examples/optimizer_experiments.ipynb``.

Small pure-JAX pieces that the notebook's experiments share, each jit-compiled once per
optimizer: two functions of the plane and the paths optimizers take over them, the online
convex problem of Reddi et al. (2018) on which Adam converges to the wrong point, a deep MLP
and its per-layer gradient and update sizes, and an MNIST training loop that records what the
plots show (loss, gradient norm, weight norm, test accuracy).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

Layer = dict[str, jax.Array]  # {"w": (fan_in, fan_out), "b": (fan_out,)}
Params = list[Layer]
EvalParams = Callable[[Params, optax.OptState], Params]

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": jax.nn.relu,
    "sigmoid": jax.nn.sigmoid,
    "tanh": jnp.tanh,
}
# Where README.md's main command reads MNIST: ../shared/data/mnist beside the checkout.
BESIDE_THE_CHECKOUT = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"


# --- Functions of the plane ----------------------------------------------------------------


def rosenbrock(xy: jax.Array) -> jax.Array:
    """Rosenbrock's function ``(1 - x)^2 + 100 (y - x^2)^2``: a curved, narrow valley whose
    floor descends slowly to the minimum 0 at (1, 1)."""
    x, y = xy[0], xy[1]
    return (1 - x) ** 2 + 100 * (y - x**2) ** 2


def ill_conditioned_quadratic(
    xy: jax.Array, condition: float = 50.0, angle: float = np.pi / 6
) -> jax.Array:
    """``(u^2 + condition * v^2) / 2`` in axes ``(u, v)`` rotated by ``angle``: curvatures 1
    and ``condition`` along directions that are not the coordinate axes, minimum 0 at the
    origin. Rotated, because a per-coordinate method sees an axis-aligned one as well
    conditioned."""
    c, s = np.cos(angle), np.sin(angle)
    u = c * xy[0] + s * xy[1]
    v = -s * xy[0] + c * xy[1]
    return (u**2 + condition * v**2) / 2


def trajectory(
    tx: optax.GradientTransformation,
    loss: Callable[[jax.Array], jax.Array],
    start: Sequence[float],
    steps: int,
) -> np.ndarray:
    """The ``steps + 1`` points, shape ``(steps + 1, 2)``, that ``tx`` visits minimizing
    ``loss`` from ``start``."""

    @jax.jit
    def run(x0: jax.Array) -> jax.Array:
        def step(carry: tuple[jax.Array, Any], _: None) -> tuple[tuple[jax.Array, Any], jax.Array]:
            x, state = carry
            updates, state = tx.update(jax.grad(loss)(x), state, x)
            x = optax.apply_updates(x, updates)
            return (x, state), x

        _, path = jax.lax.scan(step, (x0, tx.init(x0)), length=steps)
        return jnp.concatenate([x0[None], path])

    return np.asarray(run(jnp.asarray(start, jnp.float32)))


def plot_paths(
    ax: Any,
    loss: Callable[[jax.Array], jax.Array],
    paths: Mapping[str, np.ndarray],
    bounds: tuple[tuple[float, float], tuple[float, float]],
    minimum: Sequence[float],
) -> None:
    """Contours of ``loss`` (log-spaced levels) over ``bounds`` with each path of ``paths``
    and the ``minimum`` marked."""
    (x0, x1), (y0, y1) = bounds
    xs, ys = np.meshgrid(np.linspace(x0, x1, 200), np.linspace(y0, y1, 200))
    values = np.asarray(jax.vmap(jax.vmap(loss, 1), 1)(jnp.stack([xs, ys])))
    levels = np.geomspace(max(values.min(), 1e-3), values.max(), 20)
    ax.contour(xs, ys, values, levels=levels, cmap="Greys", linewidths=0.6)
    for name, path in paths.items():
        ax.plot(path[:, 0], path[:, 1], lw=1.2, label=name)
    ax.plot(*minimum, "k*", ms=12)
    ax.set(xlim=(x0, x1), ylim=(y0, y1))


# --- The counterexample of Reddi et al. (2018) ----------------------------------------------


def reddi_gradient(step: jax.Array, c: float = 3.0) -> jax.Array:
    """The gradient of the ``step``-th (1-based) loss ``f_t(x) = c x`` if ``t mod 3 == 1``,
    else ``-x``: over three steps the sum is ``(c - 2) x``, smallest at ``x = -1`` for
    ``c > 2``."""
    return jnp.where(step % 3 == 1, c, -1.0)


def online_counterexample(
    tx: optax.GradientTransformation, steps: int, c: float = 3.0, start: float = 0.0
) -> np.ndarray:
    """The points ``x_1 .. x_steps`` of ``tx`` on Reddi et al.'s online problem
    (:func:`reddi_gradient`), each step projected back onto ``[-1, 1]`` (Section 3 of
    "On the Convergence of Adam and Beyond", ICLR 2018)."""

    @jax.jit
    def run(x0: jax.Array) -> jax.Array:
        def step(carry: tuple[jax.Array, Any], t: jax.Array) -> tuple[Any, jax.Array]:
            x, state = carry
            updates, state = tx.update(reddi_gradient(t, c) * jnp.ones_like(x), state, x)
            x = optax.projections.projection_box(optax.apply_updates(x, updates), -1.0, 1.0)
            return (x, state), x[0]

        _, path = jax.lax.scan(step, (x0, tx.init(x0)), jnp.arange(1, steps + 1))
        return path

    return np.asarray(run(jnp.full((1,), start, jnp.float32)))


def average_regret(path: np.ndarray, c: float = 3.0) -> np.ndarray:
    """``R_T / T`` after each step ``T``: the mean over ``t <= T`` of ``f_t(x_t) - f_t(-1)``,
    the loss suffered against the best fixed point ``x = -1``. It goes to 0 exactly when the
    points converge to the optimum."""
    t = np.arange(1, len(path) + 1)
    gradient = np.where(t % 3 == 1, c, -1.0)
    return np.cumsum(gradient * (path + 1.0)) / t


# --- Deep MLPs ---------------------------------------------------------------------------


def mlp_init(key: jax.Array, sizes: Sequence[int], scale: float = np.sqrt(2.0)) -> Params:
    """An MLP of layer widths ``sizes`` (``sizes[0]`` inputs, ``sizes[-1]`` outputs): weights
    normal with standard deviation ``scale / sqrt(fan_in)`` (``sqrt(2)``: He init for ReLU,
    ``1``: LeCun init), biases 0."""
    keys = jax.random.split(key, len(sizes) - 1)
    return [
        {
            "w": scale / np.sqrt(fan_in) * jax.random.normal(k, (fan_in, fan_out), jnp.float32),
            "b": jnp.zeros((fan_out,), jnp.float32),
        }
        for k, fan_in, fan_out in zip(keys, sizes[:-1], sizes[1:], strict=True)
    ]


def mlp_apply(params: Params, x: jax.Array, activation: str = "relu") -> jax.Array:
    """The logits of the MLP ``params`` for inputs ``x``, ``activation`` between layers."""
    act = ACTIVATIONS[activation]
    for layer in params[:-1]:
        x = act(x @ layer["w"] + layer["b"])
    return x @ params[-1]["w"] + params[-1]["b"]


def cross_entropy(
    params: Params, images: jax.Array, labels: jax.Array, activation: str = "relu"
) -> jax.Array:
    """The mean cross entropy of the MLP's predictions of ``labels``."""
    logits = mlp_apply(params, images, activation)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def weight_norm(params: Params) -> jax.Array:
    """The L2 norm of all the weight matrices (biases left out)."""
    return optax.tree.norm([layer["w"] for layer in params])


def layer_gradient_norms(
    params: Params, images: jax.Array, labels: jax.Array, activation: str = "relu"
) -> np.ndarray:
    """The norm of the loss's gradient for each layer's weight matrix, input layer first."""
    return np.asarray(_layer_gradient_norms(params, images, labels, activation))


@functools.partial(jax.jit, static_argnames="activation")
def _layer_gradient_norms(
    params: Params, images: jax.Array, labels: jax.Array, activation: str
) -> jax.Array:
    grads = jax.grad(cross_entropy)(params, images, labels, activation)
    return jnp.stack([jnp.linalg.norm(layer["w"]) for layer in grads])


def layer_update_rms(
    tx: optax.GradientTransformation,
    params: Params,
    images: jax.Array,
    labels: jax.Array,
    activation: str = "relu",
    steps: int = 10,
) -> np.ndarray:
    """The root mean square of ``tx``'s update of each layer's weights, averaged over
    ``steps`` full-batch steps from ``params``, input layer first: how far each layer
    moves per step."""

    @jax.jit
    def run(params: Params, images: jax.Array, labels: jax.Array) -> jax.Array:
        def step(carry: tuple[Params, Any], _: None) -> tuple[Any, jax.Array]:
            params, state = carry
            grads = jax.grad(cross_entropy)(params, images, labels, activation)
            updates, state = tx.update(grads, state, params)
            rms = jnp.stack([jnp.sqrt(jnp.mean(u["w"] ** 2)) for u in updates])
            return (optax.apply_updates(params, updates), state), rms

        _, rms = jax.lax.scan(step, (params, tx.init(params)), length=steps)
        return rms.mean(axis=0)

    return np.asarray(run(params, images, labels))


# --- MNIST -------------------------------------------------------------------------------


class Data(NamedTuple):
    """MNIST as flat float32 vectors scaled to [0, 1], with integer labels."""

    train_images: jax.Array
    train_labels: jax.Array
    test_images: jax.Array
    test_labels: jax.Array


def default_data_dir() -> Path | None:
    """``$ADAM_JAX_DATA_DIR`` if set, else ``../shared/data/mnist`` beside the checkout if it
    exists, else ``None`` (the example's loader then looks in its cache and downloads)."""
    from examples.mnist import data

    if env := os.environ.get(data.ENV_DATA_DIR):
        return Path(env)
    return BESIDE_THE_CHECKOUT if BESIDE_THE_CHECKOUT.is_dir() else None


def load_mnist(
    train_size: int = 10_000, test_size: int = 10_000, data_dir: str | Path | None = None
) -> Data:
    """The first ``train_size`` training and ``test_size`` test images of MNIST, read by the
    example's loader (:func:`examples.mnist.data.load`) from ``data_dir`` (default:
    :func:`default_data_dir`)."""
    from examples.mnist import data

    dataset = data.load("mnist", data_dir if data_dir is not None else default_data_dir())

    def flat(images: np.ndarray, size: int) -> jax.Array:
        return jnp.asarray(images[:size].reshape(size, -1), jnp.float32) / 255.0

    return Data(
        flat(dataset.train.images, train_size),
        jnp.asarray(dataset.train.labels[:train_size]),
        flat(dataset.test.images, test_size),
        jnp.asarray(dataset.test.labels[:test_size]),
    )


class History(NamedTuple):
    """What :func:`train_mlp` recorded: per step (1-based ``step``) the train loss of the
    batch, the gradient norm and the weight norm; every ``eval_every`` steps (``eval_step``)
    the test accuracy."""

    step: np.ndarray
    loss: np.ndarray
    grad_norm: np.ndarray
    weight_norm: np.ndarray
    eval_step: np.ndarray
    test_accuracy: np.ndarray


def train_mlp(
    tx: optax.GradientTransformation,
    data: Data,
    *,
    hidden: Sequence[int] = (128,),
    activation: str = "relu",
    init_scale: float = np.sqrt(2.0),
    steps: int = 500,
    batch_size: int = 128,
    eval_every: int = 50,
    seed: int = 0,
    eval_params: EvalParams | None = None,
) -> History:
    """Trains an MLP of ``hidden`` widths on ``data`` with ``tx`` for ``steps`` steps of
    ``batch_size`` images drawn in shuffled epochs.

    The steps run in jit-compiled ``lax.scan`` chunks of ``eval_every`` steps, the params and
    state donated. ``eval_params(params, state)`` gives the params to evaluate, for optimizers
    that evaluate elsewhere than where they take gradients (Schedule-Free:
    ``lambda p, s: adam_jax.schedule_free_eval_params(s, p)``).
    """
    if steps < eval_every or steps % eval_every:
        raise ValueError(f"steps must be a positive multiple of eval_every, got {steps}")
    sizes = (data.train_images.shape[1], *hidden, 10)
    params = mlp_init(jax.random.key(seed), sizes, init_scale)
    state = tx.init(params)
    order = shuffled_batches(len(data.train_labels), steps, batch_size, seed)

    # The images are arguments, not constants closed over: XLA compiles a step that embeds
    # 30 MB of constants several times slower.
    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def chunk(
        params: Params, state: Any, batches: jax.Array, images: jax.Array, labels: jax.Array
    ) -> tuple[Any, Any, jax.Array]:
        def step(carry: tuple[Params, Any], batch: jax.Array) -> tuple[Any, jax.Array]:
            params, state = carry
            loss, grads = jax.value_and_grad(cross_entropy)(
                params, images[batch], labels[batch], activation
            )
            updates, state = tx.update(grads, state, params)
            params = optax.apply_updates(params, updates)
            return (params, state), jnp.stack([loss, optax.tree.norm(grads), weight_norm(params)])

        (params, state), records = jax.lax.scan(step, (params, state), batches)
        return params, state, records

    records, accuracies = [], []
    for begin in range(0, steps, eval_every):
        params, state, record = chunk(
            params, state, order[begin : begin + eval_every], data.train_images, data.train_labels
        )
        records.append(record)
        evaluated = eval_params(params, state) if eval_params else params
        accuracies.append(_accuracy(evaluated, data.test_images, data.test_labels, activation))
    record = np.asarray(jnp.concatenate(records), np.float64)
    return History(
        step=np.arange(1, steps + 1),
        loss=record[:, 0],
        grad_norm=record[:, 1],
        weight_norm=record[:, 2],
        eval_step=np.arange(eval_every, steps + 1, eval_every),
        test_accuracy=np.asarray(jax.device_get(accuracies), np.float64),
    )


@functools.partial(jax.jit, static_argnames="activation")
def _accuracy(params: Params, images: jax.Array, labels: jax.Array, activation: str) -> jax.Array:
    """The fraction of ``images`` whose ``labels`` the MLP predicts (one compile per shape)."""
    return jnp.mean(jnp.argmax(mlp_apply(params, images, activation), axis=-1) == labels)


def shuffled_batches(size: int, steps: int, batch_size: int, seed: int) -> jax.Array:
    """``steps`` batches of indices into ``size`` examples: shuffled epochs, each example
    once per epoch, the tail of an epoch that does not fill a batch dropped."""
    rng = np.random.default_rng(seed)
    per_epoch = size // batch_size
    if per_epoch == 0:
        raise ValueError(f"batch_size must be at most the {size} examples, got {batch_size}")
    epochs = -(-steps // per_epoch)
    order = np.concatenate([rng.permutation(size)[: per_epoch * batch_size] for _ in range(epochs)])
    return jnp.asarray(order[: steps * batch_size].reshape(steps, batch_size), jnp.int32)


def smooth(values: np.ndarray, window: int = 20) -> np.ndarray:
    """The running mean of ``values`` over ``window`` steps (shorter at the start)."""
    sums = np.cumsum(np.insert(np.asarray(values, np.float64), 0, 0.0))
    counts = np.minimum(np.arange(1, len(values) + 1), window)
    return (sums[1:] - sums[np.arange(1, len(values) + 1) - counts]) / counts
