"""SOAP as optax transformations: its moment estimate :func:`scale_by_soap` (the step's phase
chosen once for the whole tree, or in each leaf for blocks on the CPU), its optimizer
:func:`soap`, and its registry row."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax

from adam_jax._src.branching import on_platform
from adam_jax._src.variants.soap.rule import PHASES, SoapRule
from adam_jax._src.variants.soap.solves import ALL_AT_ONCE, DIRECT, Solves, stacked
from adam_jax._src.variants.soap.stacks import scale_by_soap_stacks
from adam_jax.rules import Mask, OptimizerInfo, Paper, descend, scale_by_rule, switch

#: How SOAP's step branches on its phase: ``"tree"``, one ``lax.switch`` a step for the whole
#: tree; ``"leaf"``, each leaf's own ``lax.cond``; ``"auto"``, the leaves' on the CPU where a
#: leaf is cut into blocks and the tree's otherwise (docs/speed.md, "One branch a step").
BRANCHINGS = ("auto", "tree", "leaf")


def _scale_by_soap(
    rule: SoapRule, branching: str = "auto", stack: bool | None = None, **others: Any
) -> optax.GradientTransformation:
    """The transformation of ``rule``, its step's phase (:meth:`SoapRule.phase_of`) chosen
    once for the whole tree (``branching="tree"``): one branch a step, in which every leaf
    takes that phase's arithmetic, where a branch per leaf cost a GPU twice the step between
    refreshes; or in each leaf (``"leaf"``, the rule's own branches), which XLA:CPU runs faster
    where the leaves have blocks (at d = 256 the blocked step between refreshes about 0.75x
    the tree's branch's) and slower without (unblocked SOAP's mean step at d = 64 about 1.3x);
    ``"auto"`` takes the leaves' on the CPU where a leaf is cut into blocks, the tree's
    otherwise (with blocks both traced: ``jax.lax.platform_dependent`` keeps the backend's when
    the step is lowered). With ``stagger_refresh``, the blocks numbered across the whole tree
    of each step's updates (their shapes are static, so the numbering is too).

    In the tree's branches of the first step and of a refresh, ``stack`` makes the
    eigendecompositions and orthonormalizations of every leaf's factors of one size one call
    (:func:`~adam_jax._src.variants.soap.solves.stacked`): ``None`` off the CPU only, where
    XLA:CPU runs the leaves' calls side by side on its threads (a refresh of the d = 256 tree
    took 1.2x as long stacked, one matrix after another); ``True`` everywhere, ``False``
    nowhere."""
    if branching not in BRANCHINGS:
        raise ValueError(f"branching must be one of {BRANCHINGS}, got {branching!r}")

    def update_fn(
        updates: optax.Updates, state: Any, params: optax.Params | None = None, **extra: Any
    ) -> tuple[optax.Updates, Any]:
        numbered = rule.with_leaf_starts(updates) if rule.stagger_refresh else rule

        def per_leaf(updates: Any, state: Any, params: Any) -> Any:
            return scale_by_rule(numbered, **others).update(updates, state, params, **extra)

        def phase_step(phase: str, updates: Any, state: Any, params: Any) -> Any:
            def step(solves: Solves, updates: Any, state: Any, params: Any, **extra: Any) -> Any:
                phased = dataclasses.replace(numbered, phase=phase, solves=solves)
                return scale_by_rule(phased, **others).update(updates, state, params, **extra)

            def in_stacks(updates: Any, state: Any, params: Any) -> Any:
                def traced(solves: Solves) -> Any:
                    return step(solves, updates, state, params, leaf_schedule=ALL_AT_ONCE, **extra)

                return stacked(traced)

            def in_leaves(updates: Any, state: Any, params: Any) -> Any:
                return step(DIRECT, updates, state, params, **extra)

            # The calls are stacked where there are some (the steps between refreshes have
            # none, or, staggered, make them in branches) and they are not in a mesh's
            # shard_map (blocks spread over devices) or a leaf schedule's turn (state brought
            # from host memory).
            if (
                stack is False
                or phase == "step"
                or rule.block_axis is not None
                or "leaf_schedule" in extra
            ):
                return in_leaves(updates, state, params)
            if stack:
                return in_stacks(updates, state, params)
            return on_platform(updates, state, params, cpu=in_leaves, default=in_stacks)

        def per_tree(updates: Any, state: Any, params: Any) -> Any:
            phases = [
                functools.partial(phase_step, phase)
                for phase in PHASES[: 2 if rule.stagger_refresh else 3]
            ]
            return switch(rule.phase_of(state.count), phases, updates, state, params)

        if branching == "leaf":
            return per_leaf(updates, state, params)
        if branching == "tree":
            return per_tree(updates, state, params)
        shapes = [tuple(jnp.shape(leaf)) for leaf in jax.tree.leaves(updates)]
        if all(rule.layout.num_blocks(shape) <= 1 for shape in shapes):
            return per_tree(updates, state, params)
        return on_platform(updates, state, params, cpu=per_leaf, default=per_tree)

    return optax.GradientTransformationExtraArgs(scale_by_rule(rule, **others).init, update_fn)


def scale_by_soap(
    b1: float | jax.Array = 0.95,
    b2: float | jax.Array = 0.95,
    shampoo_beta: float | jax.Array = -1.0,
    eps: float | jax.Array = 1e-8,
    *,
    precondition_frequency: int = 10,
    stagger_refresh: bool = False,
    max_precond_dim: int | None = None,
    block_size: int | None = None,
    block_axis: str | tuple[str, ...] | None = None,
    merge_dims: bool = False,
    precondition_1d: bool = False,
    normalize_grads: bool = False,
    correct_bias: bool = True,
    mu_dtype: Any = None,
    nu_dtype: Any = None,
    factor_dtype: Any = None,
    basis_dtype: Any = None,
    basis_rectification: int | None = None,
    orthogonalization: str = "auto",
    first_basis: str = "eigh",
    stack_blocks: bool = False,
    weight_decay: optax.ScalarOrSchedule = 0.0,
    mask: Mask | None = None,
) -> optax.GradientTransformation:
    r"""Rescales gradients by SOAP: Adam in the eigenbasis of Shampoo's preconditioner
    (Vyas et al., 2024, Algorithms 2 and 3).

    For each leaf :math:`G_t` (viewed in its working shape, see ``merge_dims``) and each of its
    preconditioned dimensions :math:`i` (size at most ``max_precond_dim``; 1-D leaves only with
    ``precondition_1d``, scalars never), a Kronecker factor and its eigenbasis:

    .. math::
        L^{(i)}_t = \beta_s L^{(i)}_{t-1} + (1-\beta_s)\, G_{(i)} G_{(i)}^\top, \qquad
        \tilde G = G \times_1 Q^{(1)\top} \cdots \times_k Q^{(k)\top},

    (:math:`G_{(i)}` the unfolding of :math:`G` along :math:`i`, :math:`\times_i` the product
    along dimension :math:`i`, the identity for a dimension without factor), then Adam in the
    rotated basis, rotated back:

    .. math::
        m_t = \beta_1 m_{t-1} + (1-\beta_1) \tilde G_t, \qquad
        v_t = \beta_2 v_{t-1} + (1-\beta_2) \tilde G_t^2, \\
        u_t = \frac{\sqrt{1-\beta_2^t}}{1-\beta_1^t}\,
        \Big(\frac{m_t}{\sqrt{v_t} + \epsilon}\Big) \times_1 Q^{(1)} \cdots \times_k Q^{(k)}
        + \lambda_t \theta_{t-1}.

    The first call only sets :math:`L_1` and :math:`Q = \mathrm{eigh}(L_1)` (eigenvectors by
    decreasing eigenvalue; with ``first_basis="power"``, a refresh of the identity, below:
    :math:`\mathrm{qr}(L_1 P)`, :math:`P` the permutation that sorts :math:`\mathrm{diag}(L_1)`
    decreasing) and returns a zero update; Adam's step :math:`t` counts from the
    second call. After every step whose :math:`t` is a multiple of ``precondition_frequency``,
    each basis is refreshed by one power-iteration step: the columns of :math:`Q` sorted by
    :math:`\mathrm{diag}(Q^\top L Q)` decreasing (and :math:`v` permuted alike), then
    :math:`Q \leftarrow \mathrm{qr}(L Q)`, and :math:`m` moved into the new basis. The
    refresh is a branch of the compiled step (no host round trip), its products at float32's
    accuracy on every backend (TF32 products would corrupt the estimated eigenvalues on a
    GPU): ``Precision.HIGHEST``, on a GPU six bfloat16 passes on the tensor cores
    (``BF16_BF16_F32_X6``, what a TPU's ``HIGHEST`` is).

    ``orthogonalization`` chooses how :math:`\mathrm{qr}(LQ)` is computed: ``"qr"``, the
    authors' Householder QR; ``"cholesky_qr"``, Cholesky QR (:math:`X \leftarrow X R^{-1}`,
    :math:`R^\top R = X^\top X`) repeated until the columns are orthonormal, made of batched
    products, Cholesky factorizations and triangular solves only, after scaling the columns to
    unit norm, with a shift while the Gram matrix is far from the identity or its unshifted
    factorization fails or has a small pivot (a singular Gram matrix), and with a column
    that depends on the others (a rank-deficient factor's) completed by the previous basis; its
    Q is QR's up to the columns' signs, which leave the update unchanged. ``"auto"`` (the
    default) takes QR on the CPU (the authors' arithmetic; on the 2-core machine
    neither method was faster on both settings measured) and Cholesky QR on GPU and TPU, where
    jaxlib's QR loops over a batch of blocks (on an H100 the blocks' Cholesky QRs took 1/34 of
    their QRs' time; docs/speed.md, "SOAP on a GPU").

    Without ``correct_bias`` the factor :math:`\sqrt{1-\beta_2^t}/(1-\beta_1^t)` is 1; with
    ``normalize_grads`` the rotated-back direction is divided by :math:`10^{-30}` plus its RMS
    first.

    With ``block_size`` :math:`b`, each preconditioned dimension of the working shape is cut
    into blocks of :math:`b` values (the last one smaller where :math:`b` does not divide it;
    a dimension without factor stays whole), and each block :math:`G^{[j]}` of the tensor (a
    product of one cut per dimension) is preconditioned as its own SOAP: its own factors
    :math:`L^{[j](i)}`, bases :math:`Q^{[j](i)}` and refreshes, so no ``eigh`` or QR is
    larger than :math:`b \times b`. Adam's moments stay elementwise, and ``normalize_grads``
    takes the RMS of the whole leaf's direction (levanter's SOAP and Distributed Shampoo cut
    matrices alike). Blocks of one shape are batched (one ``eigh``, QR or product per group
    of blocks, not per block); off the CPU, the first step's ``eigh`` and a refresh's sorts,
    power iterates and orthonormalizations of every leaf's factors of one size are one call
    (in chunks of 64 MiB), so that their number does not grow with the leaves.

    With ``block_axis`` (a mesh axis of the mesh set by ``jax.set_mesh``, or a tuple of axes:
    ``("data", "fsdp")`` spreads over all the devices of a 2-D mesh), each leaf's blocks of one
    shape are dealt out in order over the axis's devices, ``ceil(n / devices)`` each:
    a device keeps, accumulates, rotates by and refreshes its own blocks' factors and bases
    only (``jax.shard_map``), and the rotated gradient and the update are gathered into the
    leaf's shape for Adam's moments; the updates are those of one device.

    With ``stagger_refresh``, the blocks that have a factor are numbered across the tree
    (:math:`j = 0, 1, \dots`, leaf after leaf in flattening order, a leaf without blocks one
    block; with ``stack_blocks``, stack after stack, each in its leaves' order) and block
    :math:`j` is refreshed after the steps :math:`t > 0` with

    .. math::
        t \equiv j \pmod{f}, \qquad f = \texttt{precondition\_frequency},

    so every step refreshes about :math:`1/f` of the blocks, where without it every basis is
    refreshed after the steps :math:`t \equiv 0 \pmod f` and that step carries the whole
    refresh. The default is ``False``: the authors' schedule; staggering changes when each
    basis turns (a block may refresh as early as :math:`t = 1`), not how.

    The step's phase (the first step, which only builds the bases; a step; a step after which
    every basis is refreshed) is chosen once for the whole tree on GPU and TPU: one
    ``jax.lax.switch`` a step, in whose branch every leaf takes that phase's arithmetic (a branch
    per leaf made the step between refreshes twice as long on an H100), and on the CPU where no
    leaf is cut into blocks; where one is, on the CPU each leaf branches on its own, which
    XLA:CPU runs faster (docs/speed.md, "One branch a step"). The same arithmetic either way;
    the program lowered for a backend holds its branching alone.

    Factors and bases are kept per leaf, flattened (state fields ``gg`` and ``q``), in the
    compute dtype (at least float32) by default. ``factor_dtype`` stores the factors in another
    form (``jnp.bfloat16`` halves them), loaded back in the compute dtype for the step.
    ``basis_dtype`` stores the bases so (``jnp.bfloat16``; 8-bit block-wise codes,
    ``quantization.BlockwiseQuantized()``, about 1.02 bytes a value; 4-bit,
    ``quantization.FourBitBlockwise()``, about 0.53), the flat vector quantized in blocks. As
    in 4-bit Shampoo (Wang et al., 2024), a decoded basis :math:`\hat Q` is rectified before
    use by Björck orthonormalization, per matrix (per block with ``block_size``):

    .. math::
        \hat Q \leftarrow \tfrac12\, \hat Q \big(3I - \hat Q^\top \hat Q\big),

    which takes :math:`\|\hat Q^\top \hat Q - I\| = \varepsilon` to about
    :math:`\tfrac34 \varepsilon^2` (:func:`bjorck_iterations`): two iterations take 8-bit
    and bfloat16 bases (:math:`\varepsilon \approx` 1e-2, 1.5e-3 at :math:`d = 48, 64`) to
    float32 rounding (~4e-7), where one leaves 8-bit ones at ~3e-4; 4-bit bases
    (:math:`\varepsilon` 0.16 to 0.2) get three, which take them to ~1e-4 where two leave
    5e-3 to 8e-3. Each iteration costs two :math:`d \times d` products per basis and step,
    as many as the step's own rotations of the gradient: ``basis_rectification`` sets their
    number (``0`` rotates by the decoded basis as it is, whose preconditioner
    :math:`\hat Q D \hat Q^\top` stays symmetric and positive; one iteration takes
    bfloat16 bases from ~3e-3 to ~1e-5 at :math:`d` = 64 and 128). ``eigh`` and QR produce a
    new basis in the compute dtype, then it is stored compressed, and the refresh moves :math:`m`
    into the basis as the steps will decode and rectify it (exactly for a leaf without blocks; with
    blocks, each block's bases rounded as one row, which is the state's rounding where the storage's
    blocks of codes align with the blocks', as for ``block_size`` 128 and 8-bit or 4-bit codes of
    256 or 128 values); between refreshes the stored codes are kept as they are (the rectified basis
    is not re-rounded). The defaults (``None``) store the factors and bases as computed. On
    Explicit meshes each leaf is preconditioned replicated (ZeRO-1 may shard the stored state).
    ``FlatParams`` buffers and complex params are refused. Unlike the authors' code, ``eigh``
    and QR run in that compute dtype (the authors' in float32 whatever the params'), and
    their ``data_format`` (channels-last convolutions) is not offered: in JAX the layout is the
    param's.

    Args:
      b1: decay of the first moment, in [0, 1).
      b2: decay of the second moment, in [0, 1).
      shampoo_beta: decay :math:`\beta_s` of the Kronecker factors, in [0, 1); negative (the
        authors' -1) uses ``b2``.
      eps: added to the denominator outside the square root, >= 0.
      precondition_frequency: steps between refreshes of the eigenbases, an integer >= 1.
      stagger_refresh: refresh each block (each leaf, without ``block_size``) at its own offset
        within the ``precondition_frequency`` window, so that every step carries about
        ``1/precondition_frequency`` of the refresh work; ``False`` (the authors' schedule, and this
        library's before the option): every basis at the same step.
      max_precond_dim: dimensions larger than this get no factor (the identity), an integer >= 1;
        ``None`` is the authors' 10000. ``None`` rather than a number because
        ``optax.inject_hyperparams`` would inject a number as an array, and this fixes shapes: pass
        ``static_args=("max_precond_dim",)`` to set it there.
      block_size: cut each preconditioned dimension of a leaf's working shape into blocks of at most
        this many values (the last one smaller where it does not divide), each block of the tensor
        preconditioned as its own SOAP, so that no ``eigh`` or QR is larger; an integer >= 1, or
        ``None``: no blocks. It fixes shapes: pass ``static_args=("block_size",)`` to
        ``optax.inject_hyperparams``.
      block_axis: the name of a mesh axis (of the mesh set by ``jax.set_mesh`` around ``init`` and
        ``update``), or a tuple of names (their devices in row-major order), to spread each leaf's
        blocks over: a device keeps, accumulates, rotates by and refreshes the factors and bases of
        its own blocks only (``ceil(n / devices)`` of a leaf's ``n``); ``None``: every device all
        of them. Needs ``block_size``. With ``stagger_refresh``, each device refreshes its own
        blocks at their offsets.
      merge_dims: merge consecutive dimensions of tensors of two or more dimensions while their
        product stays at most ``max_precond_dim`` (the authors' ``merge_dims``).
      precondition_1d: give 1-D leaves a factor too.
      normalize_grads: divide each leaf's direction by :math:`10^{-30}` plus its RMS.
      correct_bias: Adam's bias correction, in the step size:
        :math:`\sqrt{1-\beta_2^t}/(1-\beta_1^t)`.
      mu_dtype: storage of the first moment (``None``: the params' dtype; a dtype; or a
        :class:`adam_jax.MomentStorage`).
      nu_dtype: storage of the second moment, as ``mu_dtype``.
      factor_dtype: storage of the Kronecker factors ``gg``: ``None`` (the compute dtype, at least
        float32), a floating dtype such as ``jnp.bfloat16``, or a :class:`adam_jax.MomentStorage`
        that keeps every value of a signed vector; loaded back in the compute dtype for the step. A
        dtype is callable, which ``optax.inject_hyperparams`` would take for a schedule: pass
        ``static_args=("factor_dtype", "basis_dtype")`` there.
      basis_dtype: storage of the eigenbases ``q``, as ``factor_dtype`` (e.g. ``jnp.bfloat16``,
        ``quantization.BlockwiseQuantized()`` for 8 bits, ``quantization.FourBitBlockwise()`` for
        4); a stored basis is decoded and rectified (Björck orthonormalization) before use.
      basis_rectification: Björck iterations that rectify each basis before use, an integer >= 0;
        ``None``: :func:`bjorck_iterations` of ``basis_dtype`` (none for float bases, two for
        bfloat16 and 8-bit ones, three for 4-bit). Each iteration costs as many products as the
        step's rotations of the gradient; ``0`` rotates by the decoded basis as it is. It fixes the
        compiled step: pass ``static_args=("basis_rectification",)`` to
        ``optax.inject_hyperparams``.
      orthogonalization: how a refresh orthonormalizes the power iterate :math:`LQ`: ``"qr"``, the
        authors' Householder QR; ``"cholesky_qr"``, Cholesky QR repeated until orthonormal, made of
        batched products, Cholesky factorizations and triangular solves (the same Q up to its
        columns' signs, which the update does not see); ``"auto"``: QR on the CPU (the authors'
        arithmetic), Cholesky QR on GPU and TPU, where QR loops over a batch of blocks
        (docs/speed.md).
      first_basis: how the first step builds each basis from its factor :math:`L_1`:
        ``"eigh"``, its eigenvectors by decreasing eigenvalue (the authors' ``eigh``);
        ``"power"``, a refresh from the identity: :math:`L_1`'s columns by decreasing diagonal,
        orthonormalized by ``orthogonalization``. ``"power"`` compiles no eigendecomposition,
        which on a TPU takes minutes for a large factor (docs/speed.md); its bases then improve
        with each refresh.
      stack_blocks: keep the state of the blocks of every leaf that share a shape (of the
        whole matrices of one shape, without ``block_size``) in one stack, and step each stack
        as one batch: a step's products, moments and refreshes no longer one per leaf (a GPU's
        kernels), the gradient's blocks gathered into the stacks and the update's put back.
        Each block's arithmetic is the same; the moments' values lie in another order, so a
        compressed moment's blocks of codes hold others. A stack's factors and bases are
        kept as matrices, one batch ``(n, d, d)`` a dimension (``"dim0"``, ...), where a
        leaf's are one vector. With ``block_axis`` each stack's blocks are spread. Not with a
        moment storage that keeps per-tensor statistics.
      weight_decay: decoupled weight decay :math:`\lambda`, a constant >= 0 or a schedule of the
        step.
      mask: which leaves to decay (a tree of bools or a callable of the params).

    Returns:
      An ``optax.GradientTransformation`` with state :class:`ScaleBySoapState` (with
      ``stack_blocks``, two of them: the stacks' and the other leaves').

    References:
      Vyas, Morwani, Zhao, Kwun, Shapira, Brandfonbrener, Janson and Kakade, `SOAP: Improving
      and Stabilizing Shampoo using Adam <https://arxiv.org/abs/2409.11321>`_, ICLR 2025; the
      authors' code, https://github.com/nikhilvyas/SOAP. Wang, Li, Zhou and Huang, `4-bit
      Shampoo for Memory-Efficient Network Training <https://arxiv.org/abs/2405.18144>`_,
      NeurIPS 2024 (the rectification of decoded bases).

    Example:
      >>> import adam_jax, jax.numpy as jnp
      >>> tx = adam_jax.scale_by_soap()
      >>> params = jnp.zeros((2, 2))
      >>> state = tx.init(params)
      >>> updates, state = tx.update(jnp.array([[1.0, 0.0], [0.0, 2.0]]), state)
      >>> print(jnp.abs(updates).max())  # the first call only builds the bases
      0.0
      >>> updates, state = tx.update(jnp.array([[1.0, 0.0], [0.0, 2.0]]), state)
      >>> print(jnp.round(updates, 4))  # then Adam's first step in their eigenbasis: signs
      [[1. 0.]
       [0. 1.]]
    """
    rule = SoapRule(
        b1=b1,
        b2=b2,
        shampoo_beta=shampoo_beta,
        eps=eps,
        precondition_frequency=precondition_frequency,
        stagger_refresh=stagger_refresh,
        max_precond_dim=max_precond_dim,
        block_size=block_size,
        block_axis=block_axis,
        merge_dims=merge_dims,
        precondition_1d=precondition_1d,
        normalize_grads=normalize_grads,
        correct_bias=correct_bias,
        mu_dtype=mu_dtype,
        nu_dtype=nu_dtype,
        factor_dtype=factor_dtype,
        basis_dtype=basis_dtype,
        basis_rectification=basis_rectification,
        orthogonalization=orthogonalization,
        first_basis=first_basis,
    )
    if not stack_blocks:
        return _scale_by_soap(rule, weight_decay=weight_decay, mask=mask)
    return scale_by_soap_stacks(rule, _scale_by_soap, weight_decay=weight_decay, mask=mask)


def soap(
    learning_rate: optax.ScalarOrSchedule,
    b1: float | jax.Array = 0.95,
    b2: float | jax.Array = 0.95,
    shampoo_beta: float | jax.Array = -1.0,
    eps: float | jax.Array = 1e-8,
    *,
    precondition_frequency: int = 10,
    stagger_refresh: bool = False,
    max_precond_dim: int | None = None,
    block_size: int | None = None,
    block_axis: str | tuple[str, ...] | None = None,
    merge_dims: bool = False,
    precondition_1d: bool = False,
    normalize_grads: bool = False,
    correct_bias: bool = True,
    mu_dtype: Any = None,
    nu_dtype: Any = None,
    factor_dtype: Any = None,
    basis_dtype: Any = None,
    basis_rectification: int | None = None,
    orthogonalization: str = "auto",
    first_basis: str = "eigh",
    stack_blocks: bool = False,
    weight_decay: optax.ScalarOrSchedule = 0.01,
    mask: Mask | None = None,
    maximize: bool = False,
) -> optax.GradientTransformation:
    r"""SOAP (Vyas et al., 2024): Adam in the eigenbasis of Shampoo's preconditioner, with
    decoupled weight decay.

    .. math::
        \theta_t = \theta_{t-1} - \eta_t \big(u_t + \lambda_t \theta_{t-1}\big),

    with :math:`u_t` of :func:`scale_by_soap` (zero at the first step, which only builds the
    eigenbases: no decay either). The defaults are the authors' (``lr=3e-3`` aside, which
    is yours to give). The decay is optax's AdamW's, on the params before the step, where the
    authors' code multiplies the params after the step by :math:`1-\eta\lambda`, which scales
    the step by :math:`1-\eta\lambda` too.

    Args:
      learning_rate: a constant >= 0 or a schedule of the 0-based step.
      b1: decay of the first moment, in [0, 1).
      b2: decay of the second moment, in [0, 1).
      shampoo_beta: decay :math:`\beta_s` of the Kronecker factors, in [0, 1); negative (the
        authors' -1) uses ``b2``.
      eps: added to the denominator outside the square root, >= 0.
      precondition_frequency: steps between refreshes of the eigenbases, an integer >= 1.
      stagger_refresh: refresh each block (each leaf, without ``block_size``) at its own offset
        within the ``precondition_frequency`` window, so that every step carries about
        ``1/precondition_frequency`` of the refresh work; ``False`` (the authors' schedule, and this
        library's before the option): every basis at the same step.
      max_precond_dim: dimensions larger than this get no factor (the identity), an integer >= 1;
        ``None`` is the authors' 10000. ``None`` rather than a number because
        ``optax.inject_hyperparams`` would inject a number as an array, and this fixes shapes: pass
        ``static_args=("max_precond_dim",)`` to set it there.
      block_size: cut each preconditioned dimension of a leaf's working shape into blocks of at most
        this many values (the last one smaller where it does not divide), each block of the tensor
        preconditioned as its own SOAP, so that no ``eigh`` or QR is larger; an integer >= 1, or
        ``None``: no blocks. It fixes shapes: pass ``static_args=("block_size",)`` to
        ``optax.inject_hyperparams``.
      block_axis: the name of a mesh axis (of the mesh set by ``jax.set_mesh`` around ``init`` and
        ``update``), or a tuple of names (their devices in row-major order), to spread each leaf's
        blocks over: a device keeps, accumulates, rotates by and refreshes the factors and bases of
        its own blocks only (``ceil(n / devices)`` of a leaf's ``n``); ``None``: every device all
        of them. Needs ``block_size``. With ``stagger_refresh``, each device refreshes its own
        blocks at their offsets.
      merge_dims: merge consecutive dimensions of tensors of two or more dimensions while their
        product stays at most ``max_precond_dim`` (the authors' ``merge_dims``).
      precondition_1d: give 1-D leaves a factor too.
      normalize_grads: divide each leaf's direction by :math:`10^{-30}` plus its RMS.
      correct_bias: Adam's bias correction, in the step size:
        :math:`\sqrt{1-\beta_2^t}/(1-\beta_1^t)`.
      mu_dtype: storage of the first moment (``None``: the params' dtype; a dtype; or a
        :class:`adam_jax.MomentStorage`).
      nu_dtype: storage of the second moment, as ``mu_dtype``.
      factor_dtype: storage of the Kronecker factors ``gg``: ``None`` (the compute dtype, at least
        float32), a floating dtype such as ``jnp.bfloat16``, or a :class:`adam_jax.MomentStorage`
        that keeps every value of a signed vector; loaded back in the compute dtype for the step. A
        dtype is callable, which ``optax.inject_hyperparams`` would take for a schedule: pass
        ``static_args=("factor_dtype", "basis_dtype")`` there.
      basis_dtype: storage of the eigenbases ``q``, as ``factor_dtype`` (e.g. ``jnp.bfloat16``,
        ``quantization.BlockwiseQuantized()`` for 8 bits, ``quantization.FourBitBlockwise()`` for
        4); a stored basis is decoded and rectified (Björck orthonormalization) before use.
      basis_rectification: Björck iterations that rectify each basis before use, an integer >= 0;
        ``None``: :func:`bjorck_iterations` of ``basis_dtype`` (none for float bases, two for
        bfloat16 and 8-bit ones, three for 4-bit). Each iteration costs as many products as the
        step's rotations of the gradient; ``0`` rotates by the decoded basis as it is. It fixes the
        compiled step: pass ``static_args=("basis_rectification",)`` to
        ``optax.inject_hyperparams``.
      orthogonalization: how a refresh orthonormalizes the power iterate :math:`LQ`: ``"qr"``, the
        authors' Householder QR; ``"cholesky_qr"``, Cholesky QR repeated until orthonormal, made of
        batched products, Cholesky factorizations and triangular solves (the same Q up to its
        columns' signs, which the update does not see); ``"auto"``: QR on the CPU (the authors'
        arithmetic), Cholesky QR on GPU and TPU, where QR loops over a batch of blocks
        (docs/speed.md).
      first_basis: how the first step builds each basis from its factor :math:`L_1`:
        ``"eigh"``, its eigenvectors by decreasing eigenvalue (the authors' ``eigh``);
        ``"power"``, a refresh from the identity: :math:`L_1`'s columns by decreasing diagonal,
        orthonormalized by ``orthogonalization``. ``"power"`` compiles no eigendecomposition,
        which on a TPU takes minutes for a large factor (docs/speed.md); its bases then improve
        with each refresh.
      stack_blocks: keep the state of the blocks of every leaf that share a shape (of the
        whole matrices of one shape, without ``block_size``) in one stack, and step each stack
        as one batch: a step's products, moments and refreshes no longer one per leaf (a GPU's
        kernels), the gradient's blocks gathered into the stacks and the update's put back.
        Each block's arithmetic is the same; the moments' values lie in another order, so a
        compressed moment's blocks of codes hold others. A stack's factors and bases are
        kept as matrices, one batch ``(n, d, d)`` a dimension (``"dim0"``, ...), where a
        leaf's are one vector. With ``block_axis`` each stack's blocks are spread. Not with a
        moment storage that keeps per-tensor statistics.
      weight_decay: decoupled weight decay :math:`\lambda`, a constant >= 0 or a schedule of the
        step.
      mask: which leaves to decay (a tree of bools or a callable of the params).
      maximize: ascend the objective instead of descending (PyTorch's ``maximize``).

    Returns:
      An ``optax.GradientTransformation`` (a chain ending in the learning rate).

    References:
      Vyas et al., `SOAP: Improving and Stabilizing Shampoo using Adam
      <https://arxiv.org/abs/2409.11321>`_, ICLR 2025; the authors' code,
      https://github.com/nikhilvyas/SOAP.

    Example:
      >>> import adam_jax, jax, jax.numpy as jnp, optax
      >>> tx = adam_jax.soap(3e-2, weight_decay=0.0)
      >>> params = jnp.array([[2.0, -1.0], [0.5, 1.0]])
      >>> loss = lambda p: jnp.sum(p**2)
      >>> state = tx.init(params)
      >>> for _ in range(50):
      ...     updates, state = tx.update(jax.grad(loss)(params), state, params)
      ...     params = optax.apply_updates(params, updates)
      >>> print(round(float(loss(params)), 3))  # from 6.25
      0.646
    """
    return descend(
        learning_rate,
        scale_by_soap(
            b1=b1,
            b2=b2,
            shampoo_beta=shampoo_beta,
            eps=eps,
            precondition_frequency=precondition_frequency,
            stagger_refresh=stagger_refresh,
            max_precond_dim=max_precond_dim,
            block_size=block_size,
            block_axis=block_axis,
            merge_dims=merge_dims,
            precondition_1d=precondition_1d,
            normalize_grads=normalize_grads,
            correct_bias=correct_bias,
            mu_dtype=mu_dtype,
            nu_dtype=nu_dtype,
            factor_dtype=factor_dtype,
            basis_dtype=basis_dtype,
            basis_rectification=basis_rectification,
            orthogonalization=orthogonalization,
            first_basis=first_basis,
            stack_blocks=stack_blocks,
            weight_decay=weight_decay,
            mask=mask,
        ),
        maximize=maximize,
    )


REGISTRY_ROWS = (
    OptimizerInfo(
        name="soap",
        alias=soap,
        group="variant",
        summary="Adam in the eigenbasis of Shampoo's Kronecker factors, refreshed every few steps",
        paper=Paper(
            authors="Vyas, Morwani, Zhao, Kwun, Shapira, Brandfonbrener, Janson and Kakade",
            title="SOAP: Improving and Stabilizing Shampoo using Adam",
            url="https://arxiv.org/abs/2409.11321",
            venue="ICLR 2025",
        ),
        transformation=scale_by_soap,
        rule=SoapRule,
        companions=("relayout_soap_state",),
        # The default rate (3e-3): the authors' default, not tuned on the MNIST example.
    ),
)
