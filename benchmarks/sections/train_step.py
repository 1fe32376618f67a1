"""``train_step``: a full jitted train step (forward, backward, optimizer) and its compile time.

Models: the examples' MNIST CNN (batch 128) and a transformer-like model with about 200
leaves (batch 8 x 33 tokens); variants: ``optax.adam``, ``adam_jax.adam`` on the tree and on
flat params (the model reads views ``fp.to_tree()``), ``adam_jax.adam`` with 8-bit moments.
"""

from __future__ import annotations

from typing import Any

import jax
import optax

import adam_jax
from adam_jax import flat
from benchmarks.harness import (
    LR,
    Row,
    Runner,
    Settings,
    Step,
    copy_tree,
    interleaved,
    time_compile,
)
from benchmarks.models import Loss, cnn_model, transformer_loss, transformer_params

REPEATS = 7


def tree_train_step(tx: optax.GradientTransformation, loss: Loss) -> Step:
    def train_step(params: Any, batch: Any, state: Any) -> tuple[Any, Any]:
        grads = jax.grad(loss)(params, batch)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return train_step


def flat_train_step(tx: optax.GradientTransformation, loss: Loss) -> Step:
    """The model reads views of the flat buffer; the gradient comes back flat."""

    def train_step(fp: flat.FlatParams, batch: Any, state: Any) -> tuple[Any, Any]:
        grads = jax.grad(lambda f, b: loss(f.to_tree(), b))(fp, batch)
        updates, state = tx.update(grads, state, fp)
        return optax.apply_updates(fp, updates), state

    return train_step


def models() -> dict[str, tuple[Any, Loss, Any]]:
    """Name -> (params, loss, batch)."""
    key = jax.random.key(0)
    cnn_params, cnn_loss = cnn_model()
    images = (jax.random.normal(key, (128, 28, 28, 1)), jax.random.randint(key, (128,), 0, 10))
    return {
        "transformer-like": (
            transformer_params(key),
            transformer_loss,
            jax.random.randint(key, (8, 33), 0, 256),
        ),
        "mnist_cnn": (cnn_params, cnn_loss, images),
    }


def measure(repeats: int) -> list[Row]:
    rows = []
    for model_name, (params, loss, batch) in models().items():
        num_leaves = len(jax.tree.leaves(params))
        n = sum(x.size for x in jax.tree.leaves(params))
        variants = [
            ("optax.adam", optax.adam(LR), tree_train_step, params),
            ("adam_jax.adam", adam_jax.adam(LR), tree_train_step, params),
            ("adam_jax.adam flat params", adam_jax.adam(LR), flat_train_step, flat.flatten(params)),
            (
                "adam_jax.adam 8-bit moments",
                adam_jax.adam_8bit(LR),
                tree_train_step,
                params,
            ),
        ]
        runners, compile_times = [], {}
        for name, tx, make_step, p in variants:
            p = copy_tree(p)
            state = tx.init(p)
            step = make_step(tx, loss)
            compile_times[name] = time_compile(step, (p, batch, state))
            runners.append(Runner(name, step, p, batch, state))
        interleaved(runners, repeats)
        for runner in runners:
            traced, compiled = compile_times[runner.name]
            rows.append(
                {
                    "model": model_name,
                    "num_leaves": num_leaves,
                    "num_params": n,
                    "variant": runner.name,
                    "median_ms": 1e3 * runner.median,
                    "min_ms": 1e3 * min(runner.times),
                    "trace_s": traced,
                    "compile_s": compiled,
                    "repeats": len(runner.times),
                }
            )
            print(
                f"  {model_name:16s} ({num_leaves} leaves, {n} params) {runner.name:30s} "
                f"{1e3 * runner.median:8.2f} ms  compile {traced + compiled:6.2f} s",
                flush=True,
            )
            runner.release()
    return rows


def run(settings: Settings) -> list[Row]:
    return measure(settings.repeats_or(REPEATS, quick=2))
