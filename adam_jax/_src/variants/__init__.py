"""The modern Adam family, one module per variant, each a :class:`adam_jax.MomentRule` (or a
wrapper) with its ``scale_by_*`` transformation and its alias; all re-exported from
:mod:`adam_jax`.

======================  ==========================================================
module                  optimizers
======================  ==========================================================
:mod:`.adopt`           ADOPT (Taniguchi et al., 2024)
:mod:`.ademamix`        AdEMAMix (Pagliardini et al., 2024), Simplified AdEMAMix
:mod:`.cautious`        the Cautious wrapper (Liang et al., 2024), Cautious AdamW
:mod:`.stable_adamw`    StableAdamW (Wortsman et al., 2023)
:mod:`.adam_atan2`      Adam-atan2 (Everett et al., 2024)
:mod:`.schedule_free`   Schedule-Free AdamW (Defazio et al., 2024)
:mod:`.radam`           RAdam (Liu et al., 2020)
:mod:`.adabelief`       AdaBelief (Zhuang et al., 2020)
:mod:`.lamb`            LAMB (You et al., 2020)
======================  ==========================================================
"""
