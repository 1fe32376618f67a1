"""Training the decoder on a mesh of devices: the placement of params, optimizer state and
batches, the compiled step, and the loop.

The mesh has two axes (:func:`parse_mesh`): ``data`` and ``fsdp``. Every batch is split over
both (each device sees its own windows). The params and the optimizer state are split over
``fsdp`` (FSDP: each weight on the first dimension that ``fsdp`` divides, as
:func:`adam_jax.sharding.with_data_axis` places it, so a device keeps ``1 / fsdp`` of them) and
kept whole along ``data``; with ``zero1`` the optimizer state is split over ``data`` as well
(:func:`adam_jax.sharding.state_shardings`). SOAP with ``block_size`` spreads its blocks'
factors and bases over every device of the mesh (:func:`spread_blocks`): each device keeps
and refreshes its own. The model gathers each weight as it uses it
(:func:`examples.lm.model.gathered`); XLA's partitioner writes the rest of the communication.
With several processes (``jax.distributed``) the mesh spans the devices of all of them and
every process runs the same code.

With ``grad_accumulation`` N the step splits its batch into N micro-batches (each still split
over the mesh) and sums their gradients in a ``lax.scan`` inside the compiled step, then makes
one optimizer update: the step of the whole batch, with the activations of one micro-batch.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

import adam_jax
from adam_jax.sharding import state_shardings, with_data_axis
from examples.common import distributed
from examples.lm import model as model_lib
from examples.mnist import optimizers

AXES = ("data", "fsdp")
SCHEDULES = ("warmup_cosine", "constant")
# The options every optimizer gets unless --opt says otherwise: the usual language-model
# settings (GPT-3's b2 and decay), the decay on matrices only.
LM_OPTIONS: dict[str, Any] = {"b2": 0.95, "weight_decay": 0.1}


# Peak dense bfloat16 FLOP/s of one device, by a name in its ``device_kind`` (the vendors'
# figures; H100 and H200: the SXM parts).
PEAK_FLOPS = {
    "H100": 989e12,
    "H200": 989e12,
    "A100": 312e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,
}


#: Builds a run's optimizer from its learning-rate schedule.
OptimizerFactory = Callable[[optax.Schedule], optax.GradientTransformation]


class ConfigError(ValueError):
    """A setting that cannot work; the message names its flag and what it accepts."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
    """Everything a run depends on."""

    model: model_lib.ModelConfig = model_lib.ModelConfig()
    optimizer: str = "adamw"
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    learning_rate: float = 3e-3  # the peak of the schedule
    schedule: str = "warmup_cosine"
    warmup_fraction: float = 0.05
    steps: int = 1000
    batch_size: int = 32
    eval_every: int = 100
    eval_windows: int = 256
    mesh: dict[str, int] | None = None  # None: every device on ``data``
    zero1: bool = False
    moments: str = "default"  # a key of examples.mnist.optimizers.MOMENTS: 8bit, 4bit
    second_moment: str = "default"  # or factored
    low_precision: str = "none"  # for bfloat16 params: kahan or stochastic
    offload_state: bool = False  # the optimizer state in host memory between steps
    # Micro-batches a step's batch is split into, their gradients summed before one update.
    grad_accumulation: int = 1
    seed: int = 0


def parse_mesh(text: str) -> dict[str, int]:
    """``"data=2,fsdp=4"`` as ``{"data": 2, "fsdp": 4}``; an axis left out has size 1."""
    sizes = dict.fromkeys(AXES, 1)
    for item in filter(None, text.split(",")):
        name, _, size = item.partition("=")
        if name not in AXES or not size.isdigit() or int(size) < 1:
            raise ConfigError(
                f"--mesh {text}: expected AXIS=SIZE pairs separated by commas, AXIS one of "
                f"{', '.join(AXES)} and SIZE an integer >= 1 (e.g. data=2,fsdp=4)"
            )
        sizes[name] = int(size)
    return sizes


def format_mesh(sizes: dict[str, int]) -> str:
    return ",".join(f"{axis}={sizes[axis]}" for axis in AXES)


def make_mesh(sizes: dict[str, int] | None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The ``(data, fsdp)`` mesh over ``devices`` (default: every device of every process)."""
    devices = jax.devices() if devices is None else list(devices)
    count = len(devices)
    sizes = sizes or {"data": count, "fsdp": 1}
    if math.prod(sizes.values()) != count:
        platform = devices[0].platform
        raise ConfigError(
            f"--mesh {format_mesh(sizes)} has {math.prod(sizes.values())} devices, but the run "
            f"has {count} ({platform}): the sizes must multiply to {count}"
            f"{distributed.host_device_count_note(platform)}"
        )
    shape = tuple(sizes[axis] for axis in AXES)
    return jax.make_mesh(shape, AXES, axis_types=(AxisType.Explicit,) * len(AXES), devices=devices)


def optimizer_info(config: Config) -> adam_jax.registry.OptimizerInfo:
    """The registry's row of ``config.optimizer``."""
    if config.optimizer not in adam_jax.registry.names():
        raise ConfigError(
            f"--optimizer {config.optimizer}: not in the registry; choose from "
            f"{', '.join(adam_jax.registry.names())}"
        )
    return adam_jax.registry.get(config.optimizer)


def schedule(config: Config, schedule_free: bool) -> optax.Schedule:
    """The learning rate: linear warm-up, then cosine decay to a tenth of the peak, or constant
    (``schedule_free`` optimizers average instead of decaying: warm-up, then constant)."""
    warmup = max(1, int(config.warmup_fraction * config.steps))
    if config.schedule == "constant":
        return optax.constant_schedule(config.learning_rate)
    if schedule_free:
        return optax.join_schedules(
            [
                optax.linear_schedule(0.0, config.learning_rate, warmup),
                optax.constant_schedule(config.learning_rate),
            ],
            [warmup],
        )
    return optax.warmup_cosine_decay_schedule(
        0.0, config.learning_rate, warmup, max(config.steps, warmup + 1), config.learning_rate / 10
    )


def matrices(params: Any) -> Any:
    """The decay mask: the weight matrices, not the biases, norms or position table."""
    return jax.tree.map(lambda p: p.ndim == 2, params)


def create_optimizer(
    config: Config,
    learning_rate: optax.Schedule,
    optimizer: OptimizerFactory | None = None,
    mesh_shape: dict[str, int] | None = None,
    leaf_order: Sequence[int] | None = None,
) -> optax.GradientTransformation:
    """``optimizer`` at ``learning_rate`` (default: :func:`registry_optimizer` on a mesh of
    ``mesh_shape``), wrapped as ``config.low_precision`` and ``config.offload_state`` ask (an
    offloaded state coming over in ``leaf_order``, ``adam_jax.offload_state``'s)."""
    if optimizer is None:
        tx = registry_optimizer(config, learning_rate, mesh_shape)
    else:
        tx = optimizer(learning_rate)
    tx = optimizers.with_low_precision(tx, config.low_precision, config.seed)
    if config.offload_state:
        try:
            tx = adam_jax.offload_state(tx, leaf_order=leaf_order)
        except ValueError as error:
            raise ConfigError(f"--offload-state: {error}") from error
    return tx


def registry_optimizer(
    config: Config, learning_rate: optax.Schedule, mesh_shape: dict[str, int] | None = None
) -> optax.GradientTransformation:
    """The registry's ``config.optimizer`` with :data:`LM_OPTIONS` and ``config.options``; on
    a mesh of ``mesh_shape`` (the sizes of :data:`AXES`), an optimizer that spreads its blocks
    over a mesh axis (SOAP with ``block_size``) spreads them over :func:`block_axis`'s."""
    info = optimizer_info(config)
    accepted = inspect.signature(info.alias).parameters
    options = {k: v for k, v in LM_OPTIONS.items() if k in accepted} | dict(config.options)
    if "block_axis" in accepted:
        options = spread_blocks(options, mesh_shape)
    try:
        storages = optimizers.moment_storages(
            config.optimizer, config.moments, config.second_moment
        )
    except ValueError as error:
        raise ConfigError(f"--moments, --second-moment: {error}") from error
    # A storage that --opt names wins over --moments' (--moments 8bit --opt nu_dtype=bfloat16:
    # an 8-bit first moment, a bfloat16 second).
    options |= {name: value for name, value in storages.items() if name not in config.options}
    if "mask" in accepted and "weight_decay" in options:
        options.setdefault("mask", matrices)
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ConfigError(
            f"--opt {unknown[0]}: {config.optimizer} has no such option; it takes "
            f"{', '.join(name for name in accepted if name != 'learning_rate')}"
        )
    for name, value in config.options.items():
        default = LM_OPTIONS.get(name, accepted[name].default)
        if problem := option_type_problem(value, default):
            raise ConfigError(f"--opt {name}={value}: {problem}")
    try:
        return info.alias(learning_rate, **options)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"--opt: {error}") from error


def block_axis(mesh_shape: dict[str, int]) -> str | tuple[str, ...] | None:
    """The mesh axes that an optimizer's blocks are spread over (SOAP's ``block_axis``): every
    axis of more than one device (a name for one, a tuple for both), so that on
    ``data=D,fsdp=F`` each device keeps the factors and bases of ``1 / (D F)`` of the blocks;
    None on one device."""
    axes = tuple(name for name in AXES if mesh_shape.get(name, 1) > 1)
    if not axes:
        return None
    return axes[0] if len(axes) == 1 else axes


def spread_blocks(options: dict[str, Any], mesh_shape: dict[str, int] | None) -> dict[str, Any]:
    """``options`` of an optimizer that takes ``block_axis``, with the axes of
    :func:`block_axis` where they give ``block_size`` and none: each device keeps and refreshes
    its own blocks' factors and bases. ``--opt block_axis=AXIS`` (one axis, the other's devices
    holding copies; or ``None``: every device all of them) is kept, checked against the mesh's
    axes."""
    if "block_axis" in options:
        axis = options["block_axis"]
        if axis is not None and axis not in AXES:
            raise ConfigError(
                f"--opt block_axis={axis}: expected an axis of the mesh ({', '.join(AXES)}) or "
                f"None (default: every axis of the mesh, with --opt block_size)"
            )
        return options
    if options.get("block_size") is None or mesh_shape is None:
        return options
    axis = block_axis(mesh_shape)
    return options if axis is None else options | {"block_axis": axis}


def block_devices(config: Config, mesh_shape: dict[str, int]) -> int | None:
    """The devices the registry optimizer spreads its blocks over on a mesh of ``mesh_shape``
    (SOAP with ``block_size``, :func:`spread_blocks`; 1: whole on every device), on which the
    length and order of its factor and basis vectors depend; None for an optimizer without
    blocks."""
    accepted = inspect.signature(optimizer_info(config).alias).parameters
    if "block_axis" not in accepted:
        return None
    options = spread_blocks(dict(config.options), mesh_shape)
    if options.get("block_size") is None:
        return None
    axis = options.get("block_axis")
    names = () if axis is None else (axis,) if isinstance(axis, str) else tuple(axis)
    return math.prod(mesh_shape[name] for name in names)


# SOAP's options whose storages keep its factors and bases as codes in blocks that span its
# blocks (8-bit, 4-bit) where they are a storage other than a cast.
FACTOR_STORAGES = ("factor_dtype", "basis_dtype")


def relayout_blocks(
    config: Config, devices_from: int, devices_to: int
) -> Callable[[Any, Any], Any]:
    """How the registry optimizer's state (SOAP with ``block_size``), its blocks spread over
    ``devices_from`` devices, is re-laid for ``devices_to``: a function of the state and the
    params (:func:`adam_jax.relayout_soap_state` with the run's options), returning the factor
    and basis vectors re-laid as host arrays.

    Raises:
      ValueError: for factors or bases stored as 8-bit or 4-bit codes (``--opt factor_dtype``,
        ``basis_dtype``), which cannot be re-laid exactly, naming the option.
    """
    for name in FACTOR_STORAGES:
        value = config.options.get(name)
        if isinstance(value, adam_jax.MomentStorage) and not isinstance(
            value, adam_jax.CastStorage
        ):
            raise ValueError(
                f"--opt {name}={value!r} stores SOAP's factors or bases as codes in blocks that "
                "span its blocks, which cannot be re-laid exactly for another number of devices"
            )
    accepted = inspect.signature(optimizer_info(config).alias).parameters
    layout = [
        name
        for name in inspect.signature(adam_jax.relayout_soap_state).parameters
        if name not in ("state", "params", "devices_from", "devices_to")
    ]
    options = {name: config.options.get(name, accepted[name].default) for name in layout}

    def relaid(state: Any, params: Any) -> Any:
        return adam_jax.relayout_soap_state(
            state, params, devices_from=devices_from, devices_to=devices_to, **options
        )

    return relaid


def placement_note(config: Config, mesh_shape: dict[str, int]) -> str | None:
    """One line for a run whose optimizer could split its factors over the mesh but will
    not: SOAP without ``block_size`` on several devices keeps them whole on every device."""
    if math.prod(mesh_shape.values()) == 1 or "block_size" in config.options:
        return None
    accepted = inspect.signature(optimizer_info(config).alias).parameters
    if "block_axis" not in accepted:
        return None
    return (
        f"note: {config.optimizer} keeps its factors and bases whole on every device; "
        f"--opt block_size=N (blocks of N x N, e.g. 64) splits them over the mesh, each device "
        f"keeping its own blocks"
    )


def option_type_problem(value: Any, default: Any) -> str | None:
    """What is wrong with ``value`` for an option whose default is ``default``: a number or a
    switch given as text (``--opt b2=abc``), which the optimizer would only reject as a
    traceback from inside the compiled step."""
    if isinstance(value, str) and isinstance(default, bool):
        return f"expected True or False (the default is {default})"
    if isinstance(value, str) and isinstance(default, (int, float)):
        return f"expected a number (the default is {default})"
    return None


class Trainer:
    """The model's params and optimizer state placed on ``mesh``, and its compiled steps.

    ``optimizer`` builds, from the run's schedule, a transformation that the registry has no
    name for (Muon on the hidden matrices and AdamW on the rest, say); ``config.optimizer`` then
    only names it, and ``config.options``, ``moments`` and ``second_moment`` are not read.
    """

    def __init__(self, config: Config, mesh: Mesh, optimizer: OptimizerFactory | None = None):
        check_accumulation(config.batch_size, config.grad_accumulation)
        if config.batch_size % mesh.size:
            raise ConfigError(
                f"--batch-size {config.batch_size} does not split over the {mesh.size} devices "
                f"of --mesh {format_mesh(dict(mesh.shape))}: give a multiple of {mesh.size}"
            )
        micro_batch = config.batch_size // config.grad_accumulation
        if micro_batch % mesh.size:
            raise ConfigError(
                f"--batch-size {config.batch_size} / --grad-accumulation "
                f"{config.grad_accumulation} = {micro_batch} windows a micro-batch, which do not "
                f"split over the {mesh.size} devices of --mesh {format_mesh(dict(mesh.shape))}: "
                f"give a batch size that is a multiple of {config.grad_accumulation * mesh.size}"
            )
        self.config, self.mesh = config, mesh
        self.schedule_free = optimizer is None and optimizer_info(config).schedule_free
        self.schedule = schedule(config, self.schedule_free)
        self.block_devices = None if optimizer else block_devices(config, dict(mesh.shape))
        self.batch_sharding = NamedSharding(mesh, PartitionSpec(AXES))

        def create() -> nnx.Module:
            return model_lib.GPT(config.model, rngs=nnx.Rngs(config.seed))

        self.graphdef, abstract = nnx.split(nnx.eval_shape(create))
        replicated = NamedSharding(mesh, PartitionSpec())
        # Without FSDP the params stay replicated, not typed as split over an axis of one
        # device: transformations that contract a weight with itself (Muon's Newton-Schulz)
        # need no output sharding then.
        fsdp = mesh.shape["fsdp"] > 1
        self.param_shardings = jax.tree.map(
            lambda leaf: with_data_axis(replicated, leaf.shape, "fsdp") if fsdp else replicated,
            abstract,
        )
        # With --offload-state: the params' leaves in the order their state comes over.
        self.leaf_order: tuple[int, ...] | None = None
        if config.offload_state:
            # The state comes over in the order the backward pass computes the gradients, so
            # that its copies can start during the backward pass.
            placed = jax.tree.map(
                lambda leaf, sharding: jax.ShapeDtypeStruct(
                    leaf.shape, leaf.dtype, sharding=sharding
                ),
                abstract,
                self.param_shardings,
            )
            tokens = jax.ShapeDtypeStruct(
                (micro_batch, config.model.seq_len + 1), jnp.int32, sharding=self.batch_sharding
            )
            with jax.set_mesh(mesh):
                self.leaf_order = adam_jax.gradient_order(self._loss_of, placed, tokens)
        self.tx = create_optimizer(
            config, self.schedule, optimizer, dict(mesh.shape), leaf_order=self.leaf_order
        )
        with jax.set_mesh(mesh):
            self.params = jax.jit(lambda: nnx.state(create()), out_shardings=self.param_shardings)()
            shardings = (
                state_shardings(self.tx, self.params, mesh, "data") if config.zero1 else None
            )
            self.opt_state = jax.jit(self.tx.init, out_shardings=shardings)(self.params)
            self.loss_sum = self._zero()
        self.state_shardings = jax.tree.map(lambda leaf: leaf.sharding, self.opt_state)
        self.param_count = sum(leaf.size for leaf in jax.tree.leaves(abstract))
        batch = jax.ShapeDtypeStruct(
            (config.batch_size, config.model.seq_len + 1), jnp.int32, sharding=self.batch_sharding
        )
        with jax.set_mesh(mesh):  # compiled ahead, so that no step's time includes it
            self._step = (
                jax.jit(self.train_step, donate_argnums=(0, 1, 2))
                .lower(self.params, self.opt_state, self.loss_sum, batch)
                .compile()
            )
        self._loss = jax.jit(self._loss_of)

    def model_flops_utilization(self, tokens_per_second: float) -> float | None:
        """The share of the devices' peak FLOP/s that the model's arithmetic takes at this
        speed: 6 N + 12 L T d FLOPs per token (PaLM's appendix B: N params, L blocks, windows
        of T, width d); None where the devices' peak is unknown (CPUs)."""
        kind = self.mesh.devices.flat[0].device_kind
        peak = next((flops for name, flops in PEAK_FLOPS.items() if name in kind), None)
        if peak is None:
            return None
        model = self.config.model
        per_token = 6 * self.param_count + 12 * model.layers * model.seq_len * model.d_model
        return per_token * tokens_per_second / (peak * self.mesh.size)

    def _loss_of(self, params: Any, tokens: jax.Array) -> jax.Array:
        return model_lib.loss_fn(nnx.merge(self.graphdef, params), tokens)

    def _zero(self) -> jax.Array:
        replicated = NamedSharding(self.mesh, PartitionSpec())
        return jax.jit(lambda: jnp.zeros((), jnp.float32), out_shardings=replicated)()

    def train_step(
        self, params: Any, opt_state: Any, loss_sum: jax.Array, tokens: jax.Array
    ) -> tuple[Any, Any, jax.Array]:
        """The step as a pure function: new params and state, ``loss_sum`` plus the loss of
        ``tokens`` (``(batch, seq_len + 1)``); :meth:`step` runs it compiled, in place."""
        loss, grads = self.loss_and_grads(params, tokens)
        params, opt_state = self.update(params, opt_state, grads)
        return params, opt_state, loss_sum + loss

    def loss_and_grads(self, params: Any, tokens: jax.Array) -> tuple[jax.Array, Any]:
        """The mean loss of ``tokens`` and its gradient: in one pass, or with
        ``grad_accumulation`` N the mean of N micro-batches' (equal sizes, so the mean of the
        whole batch's), summed in float32 in a scan."""
        count = self.config.grad_accumulation
        if count == 1:
            return jax.value_and_grad(self._loss_of)(params, tokens)
        batch, length = tokens.shape
        # Micro-batch i is rows i, i + N, i + 2N, ...: splitting the rows as (batch / N, N)
        # keeps each device's rows on it, so every micro-batch stays split over the mesh.
        strided = PartitionSpec(AXES, None, None)
        micro_batches = jnp.swapaxes(
            jnp.reshape(tokens, (batch // count, count, length), out_sharding=strided), 0, 1
        )

        def accumulate(carry: tuple[jax.Array, Any], micro_batch: jax.Array) -> Any:
            loss_sum, grad_sum = carry
            loss, grads = jax.value_and_grad(self._loss_of)(params, micro_batch)
            grad_sum = jax.tree.map(lambda s, g: s + g.astype(s.dtype), grad_sum, grads)
            return (loss_sum + loss, grad_sum), None

        zeros = jax.tree.map(lambda p: jnp.zeros_like(p, dtype=jnp.float32), params)
        initial = (jnp.zeros((), jnp.float32), zeros)
        (loss_sum, grad_sum), _ = jax.lax.scan(accumulate, initial, micro_batches)
        grads = jax.tree.map(lambda s, p: (s / count).astype(p.dtype), grad_sum, params)
        return loss_sum / count, grads

    def update(self, params: Any, opt_state: Any, grads: Any) -> tuple[Any, Any]:
        """The optimizer's update of ``params`` by ``grads``: new params and state."""
        if self.config.zero1:
            # The gradients split as the moments are (a reduce-scatter over data), the
            # updates gathered back to the params' layout.
            grads = jax.sharding.reshard(grads, self._like_moments(grads))
        updates, opt_state = self.tx.update(grads, opt_state, params)
        updates = jax.sharding.reshard(updates, self.param_shardings)
        return optax.apply_updates(params, updates), opt_state

    def optimizer_seconds(self, updates: int = 10) -> float:
        """The seconds one optimizer update takes (:meth:`update` alone, compiled, on copies of
        the params and state and gradients of random normals), the mean of ``updates`` in a row
        after one to warm up: the default 10 include one refresh of SOAP's bases at its default
        frequency. Costs a compilation of the update and twice the memory of the params and
        state; off the training loop."""
        update = jax.jit(self.update, donate_argnums=(0, 1))
        with jax.set_mesh(self.mesh):
            # The copies where the run keeps its arrays (an offloaded state in host memory).
            params, opt_state = jax.jit(
                lambda tree: jax.tree.map(jnp.copy, tree),
                out_shardings=(self.param_shardings, self.state_shardings),
            )((self.params, self.opt_state))
            keys = jax.random.split(jax.random.key(self.config.seed), len(jax.tree.leaves(params)))
            grads = jax.jit(
                lambda keys, params: jax.tree.map(
                    lambda key, p: 1e-3 * jax.random.normal(key, p.shape, p.dtype),
                    jax.tree.unflatten(jax.tree.structure(params), list(keys)),
                    params,
                ),
                out_shardings=self.param_shardings,
            )(keys, params)
            params, opt_state = update(params, opt_state, grads)
            jax.block_until_ready((params, opt_state))
            begin = time.perf_counter()
            for _ in range(updates):
                params, opt_state = update(params, opt_state, grads)
            jax.block_until_ready((params, opt_state))
        return (time.perf_counter() - begin) / updates

    def _like_moments(self, tree: Any) -> Any:
        return jax.tree.map(
            lambda leaf: with_data_axis(jax.typeof(leaf).sharding, leaf.shape, "data"), tree
        )

    def put(self, windows: np.ndarray) -> jax.Array:
        """The global batch of ``windows``, which every process holds whole; each process
        copies only the rows its own devices take."""
        return jax.make_array_from_callback(
            windows.shape, self.batch_sharding, lambda index: windows[index]
        )

    def step(self, windows: np.ndarray) -> None:
        """One step on ``windows`` (``(batch, seq_len + 1)`` bytes), queued on the devices;
        its loss joins :attr:`loss_sum`."""
        with jax.set_mesh(self.mesh):
            self.params, self.opt_state, self.loss_sum = self._step(
                self.params, self.opt_state, self.loss_sum, self.put(windows)
            )

    def wait(self) -> None:
        """Waits for the step in flight (its outputs become ready together)."""
        self.loss_sum.block_until_ready()

    def take_loss_sum(self) -> float:
        """The sum of the losses since the last call (waits for the steps)."""
        total = float(self.loss_sum)
        self.loss_sum = self._zero()
        return total

    def checkpoint_tree(self) -> dict[str, Any]:
        """What a checkpoint keeps: the params, the optimizer state and the losses summed
        since the last record, so that a resumed run reports what an unbroken one does."""
        return {
            "params": nnx.to_pure_dict(self.params),
            "opt_state": by_path(self.opt_state),
            "loss_sum": self.loss_sum,
        }

    def relaid(
        self, tree: dict[str, Any], relaid_state: Callable[[Any, Any], Any]
    ) -> dict[str, Any]:
        """A :meth:`checkpoint_tree` read back from a run whose optimizer spread its blocks over
        another number of devices (its factor and basis vectors in their written shapes, on the
        host), with them re-laid for this run's :attr:`block_devices` (host arrays) by
        ``relaid_state`` (:func:`relayout_blocks`)."""
        stored = tree["opt_state"]
        state = jax.tree.unflatten(
            jax.tree.structure(self.opt_state), [stored[path] for path in by_path(self.opt_state)]
        )

        # The vectors on the host, whole (a collective with several processes): a vector whose
        # length is the same for both counts was read in this run's layout, and may be split.
        def on_host(path: tuple[Any, ...], leaf: Any) -> Any:
            vector = any(getattr(key, "name", None) in ("gg", "q") for key in path)
            return distributed.host_copy(leaf) if vector else leaf

        state = jax.tree_util.tree_map_with_path(on_host, state)
        return tree | {"opt_state": by_path(relaid_state(state, self.params))}

    def restore(self, tree: dict[str, Any]) -> None:
        """Takes up the arrays of a :meth:`checkpoint_tree` read back."""
        nnx.replace_by_pure_dict(self.params, tree["params"])
        leaves = tree["opt_state"]
        self.opt_state = jax.tree.unflatten(
            jax.tree.structure(self.opt_state), [leaves[path] for path in by_path(self.opt_state)]
        )
        self.loss_sum = tree["loss_sum"]

    def evaluation_params(self) -> Any:
        """The params to evaluate: the schedule-free average for schedule-free optimizers."""
        if self.schedule_free:
            return adam_jax.schedule_free_eval_params(self.opt_state, self.params)
        return self.params

    def loss(self, windows: np.ndarray) -> float:
        with jax.set_mesh(self.mesh):
            return float(self._loss(self.evaluation_params(), self.put(windows)))


def check_accumulation(batch_size: int, grad_accumulation: int) -> None:
    """Refuses a ``grad_accumulation`` below 1 or that does not divide ``batch_size``."""
    if grad_accumulation < 1:
        raise ConfigError(f"--grad-accumulation must be an integer >= 1, got {grad_accumulation}")
    if batch_size % grad_accumulation:
        raise ConfigError(
            f"--batch-size {batch_size} does not split into --grad-accumulation "
            f"{grad_accumulation} micro-batches of equal size: give a batch size that "
            f"{grad_accumulation} divides"
        )


def by_path(tree: Any) -> dict[str, Any]:
    """The leaves of ``tree`` by their paths (``"0/mu/blocks/0/up/kernel"``), in leaf order: a
    form that checkpoints keep whatever containers the optimizer's state uses (named tuples
    become dicts there, which would not match the tree read back into)."""
    return {
        jax.tree_util.keystr(path, simple=True, separator="/"): leaf
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
    }
