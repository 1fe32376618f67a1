"""The registry of the Adam family: one row per optimizer, from which the tests' table, the docs,
the benchmarks and the example's ``--optimizer`` choices are derived or checked."""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Mapping
from typing import Any

import optax

from adam_jax._src import aliases, moments
from adam_jax._src.rule import MomentRule
from adam_jax._src.variants import (
    adabelief,
    adam_atan2,
    adam_mini,
    ademamix,
    adopt,
    cautious,
    grams,
    lamb,
    laprop,
    mars,
    radam,
    schedule_free,
    soap,
    spam,
    stable_adamw,
    stable_spam,
)

GROUPS = ("adam", "variant")


@dataclasses.dataclass(frozen=True)
class Paper:
    """Where an optimizer was published.

    Attributes:
      authors: the authors as the paper lists them ("Kingma and Ba").
      title: the title.
      url: a stable link (arXiv or OpenReview).
      venue: where and when ("ICLR 2015", or the year for a preprint).
    """

    authors: str
    title: str
    url: str
    venue: str


@dataclasses.dataclass(frozen=True)
class OptimizerInfo:
    """One optimizer of the family.

    Attributes:
      name: its name in ``adam_jax`` (the alias).
      alias: the optimizer, ``alias(learning_rate, ...)``.
      group: ``"adam"`` (Adam, AdamW and their classic forms) or ``"variant"`` (the modern
        family, each with a float64 reference in the tests).
      summary: what it changes in Adam, in one line.
      paper: where it was published.
      transformation: its moment estimate (``scale_by_*``), or None for a chain of others.
      rule: the :class:`adam_jax.MomentRule` of that moment estimate, or None.
      optax_name: the dotted name of its optax namesake ("optax.contrib.adopt"), or None.
      learning_rate: the peak learning rate of the MNIST example (warm-up + cosine, batch 128).
      example_options: options the example and the benchmarks pass besides the rate.
      schedule_free: replaces the learning-rate decay by averaging (evaluate at the average).
      companions: other public names its module adds (a wrapper, an evaluation helper).
    """

    name: str
    alias: Callable[..., optax.GradientTransformation]
    group: str
    summary: str
    paper: Paper
    transformation: Callable[..., optax.GradientTransformation] | None = None
    rule: type[MomentRule] | None = None
    optax_name: str | None = None
    learning_rate: float = 3e-3
    example_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    schedule_free: bool = False
    companions: tuple[str, ...] = ()

    def create(
        self, learning_rate: optax.ScalarOrSchedule | None = None, **options: Any
    ) -> optax.GradientTransformation:
        """The optimizer with ``learning_rate`` (default :attr:`learning_rate`) and the
        :attr:`example_options` updated by ``options``."""
        rate = self.learning_rate if learning_rate is None else learning_rate
        return self.alias(rate, **{**self.example_options, **options})

    def optax_namesake(self) -> Callable[..., optax.GradientTransformation] | None:
        """optax's optimizer of the same name (imported on demand), or None."""
        if self.optax_name is None:
            return None
        module, _, name = self.optax_name.rpartition(".")
        return getattr(importlib.import_module(module), name)


_KINGMA_BA = Paper(
    "Kingma and Ba",
    "Adam: A Method for Stochastic Optimization",
    "https://arxiv.org/abs/1412.6980",
    "ICLR 2015",
)
_LOSHCHILOV_HUTTER = Paper(
    "Loshchilov and Hutter",
    "Decoupled Weight Decay Regularization",
    "https://arxiv.org/abs/1711.05101",
    "ICLR 2019",
)
_DOZAT = Paper(
    "Dozat",
    "Incorporating Nesterov Momentum into Adam",
    "https://openreview.net/forum?id=OM0jvwB8jIp57ZJjtNEZ",
    "ICLR workshop 2016",
)
_DETTMERS = Paper(
    "Dettmers, Lewis, Shleifer and Zettlemoyer",
    "8-bit Optimizers via Block-wise Quantization",
    "https://arxiv.org/abs/2110.02861",
    "ICLR 2022",
)

OPTIMIZERS: tuple[OptimizerInfo, ...] = (
    OptimizerInfo(
        "adam",
        aliases.adam,
        "adam",
        "bias-corrected first and second moments (Keras' epsilon hat as an option)",
        _KINGMA_BA,
        moments.scale_by_adam,
        moments.AdamRule,
        optax_name="optax.adam",
    ),
    OptimizerInfo(
        "adamw",
        aliases.adamw,
        "adam",
        "Adam with decoupled weight decay",
        _LOSHCHILOV_HUTTER,
        moments.scale_by_adam,
        moments.AdamRule,
        optax_name="optax.adamw",
    ),
    OptimizerInfo(
        "adam_l2",
        aliases.adam_l2,
        "adam",
        "Adam with L2 regularization added to the gradient (torch.optim.Adam's weight_decay)",
        _KINGMA_BA,
        moments.scale_by_adam,
        moments.AdamRule,
    ),
    OptimizerInfo(
        "nadam",
        aliases.nadam,
        "adam",
        "Adam with Nesterov momentum",
        _DOZAT,
        moments.scale_by_adam,
        moments.AdamRule,
        optax_name="optax.nadam",
    ),
    OptimizerInfo(
        "nadamw",
        aliases.nadamw,
        "adam",
        "NAdam with decoupled weight decay",
        _DOZAT,
        moments.scale_by_adam,
        moments.AdamRule,
        optax_name="optax.nadamw",
    ),
    OptimizerInfo(
        "amsgrad",
        aliases.amsgrad,
        "adam",
        "the running maximum of the second moment (PyTorch's form)",
        Paper(
            "Reddi, Kale and Kumar",
            "On the Convergence of Adam and Beyond",
            "https://openreview.net/forum?id=ryQu7f-RZ",
            "ICLR 2018",
        ),
        moments.scale_by_amsgrad,
        moments.AdamRule,
        optax_name="optax.amsgrad",
    ),
    OptimizerInfo(
        "adamax",
        aliases.adamax,
        "adam",
        "the infinity norm in place of the second moment",
        _KINGMA_BA,
        moments.scale_by_adamax,
        moments.AdamaxRule,
        optax_name="optax.adamax",
        learning_rate=6e-3,
    ),
    OptimizerInfo(
        "adamaxw",
        aliases.adamaxw,
        "adam",
        "AdaMax with decoupled weight decay",
        _KINGMA_BA,
        moments.scale_by_adamax,
        moments.AdamaxRule,
        optax_name="optax.adamaxw",
        learning_rate=6e-3,
    ),
    OptimizerInfo(
        "adam_8bit",
        aliases.adam_8bit,
        "adam",
        "Adam with both moments in 8-bit blocks (about 2 bytes of state per parameter)",
        _DETTMERS,
        moments.scale_by_adam,
        moments.AdamRule,
    ),
    OptimizerInfo(
        "adamw_8bit",
        aliases.adamw_8bit,
        "adam",
        "AdamW with both moments in 8-bit blocks",
        _DETTMERS,
        moments.scale_by_adam,
        moments.AdamRule,
    ),
    OptimizerInfo(
        "adopt",
        adopt.adopt,
        "variant",
        "the second moment of earlier steps normalizes the gradient before momentum",
        Paper(
            "Taniguchi, Harada, Minegishi, Oshima, Jeong, Nagahara, Iiyama, Suzuki, Iwasawa and "
            "Matsuo",
            "ADOPT: Modified Adam Can Converge with Any beta2 with the Optimal Rate",
            "https://arxiv.org/abs/2411.02853",
            "NeurIPS 2024",
        ),
        adopt.scale_by_adopt,
        adopt.AdoptRule,
        optax_name="optax.contrib.adopt",
    ),
    OptimizerInfo(
        "ademamix",
        ademamix.ademamix,
        "variant",
        "a second, slow momentum added to Adam's",
        Paper(
            "Pagliardini, Ablin and Grangier",
            "The AdEMAMix Optimizer: Better, Faster, Older",
            "https://arxiv.org/abs/2409.03137",
            "ICLR 2025",
        ),
        ademamix.scale_by_ademamix,
        ademamix.AdemamixRule,
        optax_name="optax.contrib.ademamix",
        # A run of a few thousand steps: the paper's b3 for short runs (its appendix C.1.5).
        example_options={"b3": 0.999},
    ),
    OptimizerInfo(
        "simplified_ademamix",
        ademamix.simplified_ademamix,
        "variant",
        "one momentum accumulator plus alpha times the gradient",
        Paper(
            "Morwani, Shapira, Vyas, Malach, Kakade and Janson",
            "Connections between Schedule-Free Optimizers, AdEMAMix, and Accelerated SGD Variants",
            "https://arxiv.org/abs/2502.02431",
            "2025",
        ),
        ademamix.scale_by_simplified_ademamix,
        ademamix.SimplifiedAdemamixRule,
        optax_name="optax.contrib.simplified_ademamix",
        # An accumulator, not an average: b1 = 0.9 sums ~10 gradients (the lr is ~1/10 of
        # Adam's).
        learning_rate=3e-4,
        example_options={"b1": 0.9},
    ),
    OptimizerInfo(
        "cautious_adamw",
        cautious.cautious_adamw,
        "variant",
        "AdamW whose update is zeroed where it disagrees in sign with the gradient",
        Paper(
            "Liang, Chen, Liu and Liu",
            "Cautious Optimizers: Improving Training with One Line of Code",
            "https://arxiv.org/abs/2411.16085",
            "2024",
        ),
        companions=("cautious",),
    ),
    OptimizerInfo(
        "stable_adamw",
        stable_adamw.stable_adamw,
        "variant",
        "AdamW with each tensor's update clipped by its gradient-to-moment RMS",
        Paper(
            "Wortsman, Dettmers, Zettlemoyer, Morcos, Farhadi and Schmidt",
            "Stable and low-precision training for large-scale vision-language models",
            "https://arxiv.org/abs/2304.13013",
            "NeurIPS 2023",
        ),
        stable_adamw.scale_by_stable_adam,
        stable_adamw.StableAdamwRule,
    ),
    OptimizerInfo(
        "adam_atan2",
        adam_atan2.adam_atan2,
        "variant",
        "atan2 of the moments in place of the division (no epsilon)",
        Paper(
            "Everett, Xiao, Wortsman, Alemi, Novak, Liu, Gur, Sohl-Dickstein, Kaelbling, Lee and "
            "Pennington",
            "Scaling Exponents Across Parameterizations and Optimizers",
            "https://arxiv.org/abs/2407.05872",
            "ICML 2024",
        ),
        adam_atan2.scale_by_adam_atan2,
        adam_atan2.AdamAtan2Rule,
    ),
    OptimizerInfo(
        "schedule_free_adamw",
        schedule_free.schedule_free_adamw,
        "variant",
        "averaging of the iterates in place of a learning-rate decay",
        Paper(
            "Defazio, Yang, Mehta, Mishchenko, Khaled and Cutkosky",
            "The Road Less Scheduled",
            "https://arxiv.org/abs/2405.15682",
            "NeurIPS 2024",
        ),
        rule=schedule_free.ScheduleFreeAdamwRule,
        optax_name="optax.contrib.schedule_free_adamw",
        schedule_free=True,
        companions=("schedule_free_eval_params",),
    ),
    OptimizerInfo(
        "radam",
        radam.radam,
        "variant",
        "momentum steps until the second moment's variance is tractable, then rectified Adam",
        Paper(
            "Liu, Jiang, He, Chen, Liu, Gao and Han",
            "On the Variance of the Adaptive Learning Rate and Beyond",
            "https://arxiv.org/abs/1908.03265",
            "ICLR 2020",
        ),
        radam.scale_by_radam,
        radam.RadamRule,
        optax_name="optax.radam",
        # Momentum steps first, then a small rectifier: it needs more (2 epochs on 12,000
        # images: 96.4% at 3e-3, 98.3% at 2e-2).
        learning_rate=2e-2,
    ),
    OptimizerInfo(
        "adabelief",
        adabelief.adabelief,
        "variant",
        "the variance of the gradient around its mean in place of the second moment",
        Paper(
            "Zhuang, Tang, Ding, Tatikonda, Dvornek, Papademetris and Duncan",
            "AdaBelief Optimizer: Adapting Stepsizes by the Belief in Observed Gradients",
            "https://arxiv.org/abs/2010.07468",
            "NeurIPS 2020",
        ),
        adabelief.scale_by_belief,
        adabelief.AdabeliefRule,
        optax_name="optax.adabelief",
    ),
    OptimizerInfo(
        "lamb",
        lamb.lamb,
        "variant",
        "AdamW's update scaled per layer by the ratio of the param's norm to the update's",
        Paper(
            "You, Li, Reddi, Hseu, Kumar, Bhojanapalli, Song, Demmel, Keutzer and Hsieh",
            "Large Batch Optimization for Deep Learning: Training BERT in 76 minutes",
            "https://arxiv.org/abs/1904.00962",
            "ICLR 2020",
        ),
        lamb.scale_by_trust_ratio,
        optax_name="optax.lamb",
        # A step is a fraction of each layer's norm: it needs more (2 epochs on 12,000 images:
        # 94.7% at 3e-3, 98.4% at 2e-2, 96.7% at 5e-2).
        learning_rate=2e-2,
    ),
    OptimizerInfo(
        "adam_mini",
        adam_mini.adam_mini,
        "variant",
        "one second moment per Hessian block (output neuron, head, token): half Adam's state",
        Paper(
            "Zhang, Chen, Li, Ding, Chen, Kingma, Ye, Luo and Sun",
            "Adam-mini: Use Fewer Learning Rates To Gain More",
            "https://arxiv.org/abs/2406.16793",
            "ICLR 2025",
        ),
        adam_mini.scale_by_adam_mini,
    ),
    OptimizerInfo(
        "laprop",
        laprop.laprop,
        "variant",
        "the gradient normalized by the second moment before the momentum average",
        Paper(
            "Ziyin, Wang and Ueda",
            "LaProp: Separating Momentum and Adaptivity in Adam",
            "https://arxiv.org/abs/2002.04839",
            "2020",
        ),
        laprop.scale_by_laprop,
        laprop.LapropRule,
    ),
    OptimizerInfo(
        "grams",
        grams.grams,
        "variant",
        "Adam's step length with the sign of the current gradient",
        Paper(
            "Cao, Li and Song",
            "Grams: Gradient Descent with Adaptive Momentum Scaling",
            "https://arxiv.org/abs/2412.17107",
            "2024",
        ),
        grams.scale_by_grams,
        grams.GramsRule,
    ),
    OptimizerInfo(
        "soap",
        soap.soap,
        "variant",
        "Adam in the eigenbasis of Shampoo's Kronecker factors, refreshed every few steps",
        Paper(
            "Vyas, Morwani, Zhao, Kwun, Shapira, Brandfonbrener, Janson and Kakade",
            "SOAP: Improving and Stabilizing Shampoo using Adam",
            "https://arxiv.org/abs/2409.11321",
            "ICLR 2025",
        ),
        soap.scale_by_soap,
        soap.SoapRule,
        learning_rate=3e-3,  # the authors' default, not tuned on the MNIST example
    ),
    OptimizerInfo(
        "mars",
        mars.mars,
        "variant",
        "AdamW on a variance-reduced gradient (a scaled change of the gradient added), "
        "clipped to norm 1 per tensor",
        Paper(
            "Yuan, Liu, Wu, Zhou and Gu",
            "MARS: Unleashing the Power of Variance Reduction for Training Large Models",
            "https://arxiv.org/abs/2411.10438",
            "2024",
        ),
        mars.scale_by_mars,
        mars.MarsRule,
        learning_rate=3e-3,  # the authors' default, not tuned on the MNIST example
    ),
    OptimizerInfo(
        "spam",
        spam.spam,
        "variant",
        "Adam with its moments reset every few hundred steps and gradient spikes clipped",
        Paper(
            "Huang, Zhu, Jin, Liu, Wang and Liu",
            "SPAM: Spike-Aware Adam with Momentum Reset for Stable LLM Training",
            "https://arxiv.org/abs/2501.06842",
            "ICLR 2025",
        ),
        spam.scale_by_spam,
        spam.SpamRule,
        learning_rate=3e-3,  # not tuned on the MNIST example
    ),
    OptimizerInfo(
        "stable_spam",
        stable_spam.stable_spam,
        "variant",
        "SPAM's resets with spikes clipped to their running maximum and norms rescaled per tensor",
        Paper(
            "Huang, Zhu, Jin, Liu, Wang and Liu",
            "Stable-SPAM: How to Train in 4-Bit More Stably than 16-Bit Adam",
            "https://arxiv.org/abs/2502.17055",
            "2025",
        ),
        stable_spam.scale_by_stable_spam,
        stable_spam.StableSpamRule,
        learning_rate=3e-3,  # not tuned on the MNIST example
    ),
)

_BY_NAME = {info.name: info for info in OPTIMIZERS}


def get(name: str) -> OptimizerInfo:
    """The row of optimizer ``name``.

    Raises:
      ValueError: for a name that is not in the registry (the message lists the names).
    """
    if name not in _BY_NAME:
        raise ValueError(f"unknown optimizer {name!r}, expected one of {names()}")
    return _BY_NAME[name]


def names(group: str | None = None) -> tuple[str, ...]:
    """The optimizers' names in registry order, all of them or those of ``group``."""
    if group is not None and group not in GROUPS:
        raise ValueError(f"group must be one of {GROUPS} or None, got {group!r}")
    return tuple(info.name for info in OPTIMIZERS if group is None or info.group == group)


def create(
    name: str, learning_rate: optax.ScalarOrSchedule | None = None, **options: Any
) -> optax.GradientTransformation:
    """The optimizer ``name`` with ``learning_rate`` (default: its tuned MNIST rate) and options.

    Example:
      >>> import adam_jax, jax.numpy as jnp
      >>> tx = adam_jax.registry.create("radam", 0.1)
      >>> updates, _ = tx.update(jnp.array([0.5]), tx.init(jnp.zeros(1)))
      >>> print(updates)  # rho_1 = 1 < 5: plain momentum, -0.1 * g
      [-0.05]
    """
    return get(name).create(learning_rate, **options)
