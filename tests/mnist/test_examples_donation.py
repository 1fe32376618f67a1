"""The examples' training steps give every donated buffer back to the output it came from.

JAX pairs donated arguments with outputs by shape and dtype, in order: a step that returns
``(params, state)`` while it donates ``(state, params)`` hands a moment's buffer to a param
and XLA copies each leaf to make room (a copy kernel a leaf on a GPU). The compiled program's
header says which argument each output reuses; here each reuses its own.
"""

from __future__ import annotations

import jax
from mnist_helpers import synthetic_dataset

from benchmarks.hlo_program import aliased_buffers
from examples.lm import model as lm_model
from examples.lm import train as lm_train
from examples.mnist import train as mnist_train
from examples.mnist.config import Config


def _misrouted(compiled: jax.stages.Compiled) -> tuple[list[str], int]:
    """The outputs that reuse another argument's buffer than their own, and how many donated
    buffers are reused at all."""
    arguments = [
        jax.tree_util.keystr(p) for p, _ in jax.tree.flatten_with_path(compiled.args_info)[0]
    ]
    outputs = [jax.tree_util.keystr(p) for p, _ in jax.tree.flatten_with_path(compiled.out_info)[0]]
    pairs = aliased_buffers(compiled.as_text())
    # args_info is ((arguments...), {keywords}): an argument's path starts with "[0]".
    wrong = [
        f"{outputs[o]} reuses {arguments[a]}"
        for o, a in pairs
        if arguments[a].removeprefix("[0]") != outputs[o]
    ]
    return wrong, len(pairs)


def test_language_model_step_donates_in_place():
    config = lm_train.Config(
        model=lm_model.ModelConfig(layers=1, d_model=32, heads=2, seq_len=16),
        steps=2,
        batch_size=8,
    )
    trainer = lm_train.Trainer(
        config, lm_train.make_mesh(lm_train.parse_mesh("data=1"), jax.devices()[:1])
    )
    wrong, reused = _misrouted(trainer._step)
    donated = len(jax.tree.leaves((trainer.params, trainer.opt_state, trainer.loss_sum)))
    assert not wrong
    assert reused == donated


def test_mnist_step_donates_in_place():
    trainer = mnist_train.Trainer(
        Config(model="mlp", batch_size=64), synthetic_dataset(n_train=128)
    )
    order = trainer.epoch_order_on_devices(0)
    compiled = trainer._train_step.lower(
        trainer.state, trainer.running, trainer.train_images, trainer.train_labels, order[0], 0
    ).compile()
    wrong, reused = _misrouted(compiled)
    assert not wrong
    assert reused == len(jax.tree.leaves(trainer.state))
