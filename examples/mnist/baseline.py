"""Epoch time of the training program against a naive optax.adam + ``nnx.jit`` loop.

The baseline is the loop of the Flax NNX MNIST tutorial: ``optax.adam`` at a constant 1e-3 in
an ``nnx.Optimizer``, an ``nnx.jit`` train step called once per batch, batches normalized on
the host. Both train the same model at the same batch size on the same data; their epochs
alternate so that both see the same machine load, and the medians are reported::

    python -m examples.mnist.baseline --model cnn --rounds 3
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import numpy as np
import optax
from flax import nnx

from examples.mnist import data as data_lib
from examples.mnist import models
from examples.mnist.config import Config
from examples.mnist.step import cross_entropy
from examples.mnist.trainer import Trainer


class NaiveBaseline:
    """optax.adam(1e-3) with ``nnx.jit`` per step."""

    def __init__(self, model_name: str, batch_size: int, seed: int, dataset: data_lib.Dataset):
        self.model = models.create(model_name, seed)
        self.optimizer = nnx.Optimizer(self.model, optax.adam(1e-3), wrt=nnx.Param)
        spec = dataset.spec
        self.images = ((dataset.train.images / np.float32(255) - spec.mean) / spec.std)[..., None]
        self.images = self.images.astype(np.float32)
        self.labels = dataset.train.labels
        self.batch_size = batch_size
        self.seed = seed

        @nnx.jit
        def train_step(model, optimizer, images, labels):
            def loss_fn(model):
                logits = model(images, train=True)
                return cross_entropy(logits, labels).mean()

            loss, grads = nnx.value_and_grad(loss_fn)(model)
            optimizer.update(model, grads)
            return loss

        self.train_step = train_step

    def train_epoch(self, epoch: int) -> float:
        """Trains one epoch; returns its wall time in seconds."""
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.labels))
        start = time.perf_counter()
        loss = None
        for begin in range(0, len(order) - self.batch_size + 1, self.batch_size):
            batch = order[begin : begin + self.batch_size]
            loss = self.train_step(
                self.model, self.optimizer, self.images[batch], self.labels[batch]
            )
        jax.block_until_ready(loss)
        return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="cnn", choices=sorted(models.MODELS))
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3, help="epochs of each, alternating")
    parser.add_argument("--train-limit", type=int, default=None)
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args(argv)

    dataset = data_lib.load("mnist", args.data_dir)
    if args.train_limit is not None:
        dataset = data_lib.Dataset(
            train=data_lib.Split(
                dataset.train.images[: args.train_limit], dataset.train.labels[: args.train_limit]
            ),
            test=dataset.test,
            spec=dataset.spec,
        )
    config = Config(model=args.model, batch_size=args.batch_size, progress=False)
    program = Trainer(config, dataset)
    baseline = NaiveBaseline(args.model, args.batch_size, config.seed, dataset)
    # One warm-up epoch each: compilation is not part of an epoch's time.
    baseline.train_epoch(0)
    program.train_epoch(0)
    times: dict[str, list[float]] = {"baseline": [], "program": []}
    for epoch in range(1, args.rounds + 1):
        times["baseline"].append(baseline.train_epoch(epoch))
        times["program"].append(program.train_epoch(epoch)["train_seconds"])
        print(
            f"round {epoch}: baseline {times['baseline'][-1]:.1f} s, "
            f"program {times['program'][-1]:.1f} s"
        )
    base, prog = (statistics.median(times[k]) for k in ("baseline", "program"))
    print(
        f"device: {jax.devices()[0].device_kind}; model {args.model}, batch {args.batch_size}, "
        f"{len(dataset.train.labels)} images per epoch"
    )
    print(
        f"median seconds per epoch: optax.adam + nnx.jit baseline {base:.1f}, "
        f"adam_jax program {prog:.1f} ({base / prog:.2f}x)"
    )


if __name__ == "__main__":
    main()
