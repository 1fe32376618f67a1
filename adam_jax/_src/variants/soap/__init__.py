r"""SOAP: Adam in the eigenbasis of Shampoo's preconditioner (Vyas et al., 2024).

Shampoo preconditions a matrix gradient :math:`G` by running averages of :math:`GG^\top` and
:math:`G^\top G`. SOAP keeps those averages (one :math:`d \times d` factor per preconditioned
dimension of a tensor), rotates the gradient into their eigenbases, runs Adam there, and
rotates the result back. The eigenbases are refreshed only every ``precondition_frequency``
steps, by one step of power iteration and a QR decomposition, which Adam's moments in the
rotated basis tolerate well.

One concept per module: ``layout`` (a leaf's working shape and its blocks), ``factors`` (the
Kronecker factors and their eigenbases: storage, rotations, refresh), ``blocks`` (a leaf's
blocks as batches, spread over a mesh axis), ``mesh`` (the arrays' places on the mesh),
``rule`` (the state, the step's scalars and phases, :class:`SoapRule`), ``solves`` (the
calls stacked across leaves), ``stacks`` (the state stacked by block shape,
``stack_blocks=True``), ``transform`` (:func:`scale_by_soap`, :func:`soap` and the registry
row) and ``relayout`` (the state re-laid for another number of devices,
:func:`relayout_soap_state`). The package re-exports the names
that the library, its registry and the tests import from it.
"""

from adam_jax._src.variants.soap.factors import _rectify, _refresh_blocks, bjorck_iterations
from adam_jax._src.variants.soap.layout import SoapLayout, merged_shape
from adam_jax._src.variants.soap.relayout import relayout_soap_state
from adam_jax._src.variants.soap.rule import SoapRule
from adam_jax._src.variants.soap.transform import REGISTRY_ROWS, scale_by_soap, soap

__all__ = [
    "REGISTRY_ROWS",
    "SoapLayout",
    "SoapRule",
    "_rectify",
    "_refresh_blocks",
    "bjorck_iterations",
    "merged_shape",
    "relayout_soap_state",
    "scale_by_soap",
    "soap",
]
