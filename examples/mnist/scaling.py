"""Seconds per epoch on N devices against one device::

    python -m examples.mnist.scaling --devices 8 --rounds 3

Trains the default recipe (or ``--model``) three ways in one process: on one device, on
``--devices`` devices, and on as many with the optimizer state split over them (ZeRO-1). After
one warm-up epoch each (compilation), their epochs alternate, so that all three see the same
machine load, and the medians are reported. On CPU the process has ``--devices`` host devices
(the one-device trainer uses the first), as ``python -m examples.mnist --devices N`` has.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
from collections.abc import Sequence

from examples.common import distributed


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m examples.mnist.scaling", description=__doc__)
    parser.add_argument("--devices", type=int, default=8, help="devices of the parallel runs")
    parser.add_argument("--model", default="cnn", help="cnn, mlp or deep_cnn")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3, help="epochs of each, alternating")
    parser.add_argument("--train-limit", type=int, default=None)
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args(argv)
    if args.devices < 2 or args.rounds < 1:
        parser.error(f"--devices must be >= 2 and --rounds >= 1, got {args.devices}, {args.rounds}")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    # Before JAX starts (importing the trainer starts it: adam_jax computes on import).
    distributed.request_host_devices(args.devices)
    import jax

    from examples.mnist import data
    from examples.mnist.config import Config
    from examples.mnist.trainer import Trainer

    dataset = data.load("mnist", args.data_dir)
    config = Config(
        model=args.model, batch_size=args.batch_size, train_limit=args.train_limit, progress=False
    )
    parallel = dataclasses.replace(config, devices=args.devices)
    trainers = {
        "1 device": Trainer(config, dataset),
        f"{args.devices} devices": Trainer(parallel, dataset),
        f"{args.devices} devices, ZeRO-1": Trainer(
            dataclasses.replace(parallel, shard_optimizer=True), dataset
        ),
    }
    seconds: dict[str, list[float]] = {name: [] for name in trainers}
    for epoch in range(args.rounds + 1):
        for name, trainer in trainers.items():
            figures = trainer.train_epoch(epoch)
            if epoch:  # Epoch 0 compiles.
                seconds[name].append(figures["train_seconds"])
        if epoch:
            times = ", ".join(f"{name} {seconds[name][-1]:.1f} s" for name in trainers)
            print(f"round {epoch}: {times}", flush=True)
    one = trainers["1 device"]
    print(
        f"device: {jax.devices()[0].device_kind}; model {args.model}, batch {args.batch_size}, "
        f"{one.steps_per_epoch * args.batch_size} images per epoch"
    )
    reference = statistics.median(seconds["1 device"])
    for name, values in seconds.items():
        median = statistics.median(values)
        print(f"median seconds per epoch, {name}: {median:.1f} ({reference / median:.2f}x)")


if __name__ == "__main__":
    main()
