"""optax's own tests of its Adam family, run against adam_jax.

The installed optax ships its test modules (``optax._src.alias_test`` and
``optax._src.transform_test``); nothing of them is copied here. Their absl-parameterized test
methods keep their parameters in the generated methods' closures. This module reads them, keeps
only the cases of the Adam family and builds test classes holding just those cases, under
descriptive names, so every other optimizer is deselected at collection time (not skipped).

Substitution, confined to these classes: each test's ``setUp`` patches the optax test module's
global ``alias`` (or ``transform``) with a namespace that hands out adam_jax's functions and
raises ``AttributeError`` for any other optimizer, and restores it on cleanup; parameters that
are optax functions themselves (``transform_test``'s ``scale_by_adam`` and ``scale_by_adamax``
cases) are replaced by adam_jax's before the test body is called. Nothing of optax is patched
outside a running test of this module. ``test_substitution_*`` check that the wrapper really runs
adam_jax: a deliberately broken optimizer makes the substituted tests fail.
"""

from __future__ import annotations

import inspect
import unittest
from collections.abc import Callable, Mapping
from types import FunctionType, ModuleType
from typing import Any
from unittest import mock

import jax
import jax.numpy as jnp
import optax
from optax._src import alias_test, transform_test
from optax._src import test_utils as optax_test_utils
from optax.contrib import _common_test as contrib_test

import adam_jax

ADAM_FAMILY = (
    "adam", "adamw", "nadam", "nadamw", "amsgrad", "adamax", "adamaxw",
    "radam", "adabelief", "lamb",
)  # fmt: skip


class _Namespace:
    """Stands in for an optax module inside optax's test module: only the given names exist."""

    def __init__(self, label: str, members: Mapping[str, Any]) -> None:
        self._label = label
        self._members = dict(members)

    def __getattr__(self, name: str) -> Any:
        try:
            return self._members[name]
        except KeyError:
            raise AttributeError(
                f"{self._label}.{name} is not substituted: only adam_jax's Adam family runs here"
            ) from None


def _adam_jax_aliases() -> _Namespace:
    return _Namespace("alias", {name: getattr(adam_jax, name) for name in ADAM_FAMILY})


# optax.contrib's optimizers that adam_jax implements, run through optax's ContribTest.
CONTRIB_FAMILY = ("adopt", "ademamix", "simplified_ademamix", "schedule_free_adamw")


def _adam_jax_contrib() -> _Namespace:
    members = {name: getattr(adam_jax, name) for name in CONTRIB_FAMILY}
    return _Namespace(
        "contrib", {**members, "schedule_free_eval_params": adam_jax.schedule_free_eval_params}
    )


def _adam_jax_transforms() -> _Namespace:
    # scale_by_rms is the reference that test_rms_match_adam compares scale_by_adam against.
    return _Namespace(
        "transform",
        {"scale_by_adam": adam_jax.scale_by_adam, "scale_by_rms": optax.scale_by_rms},
    )


# Parameters of transform_test's cases that are optax functions, replaced by adam_jax's.
_TRANSFORM_SUBSTITUTES = {
    optax.scale_by_adam: adam_jax.scale_by_adam,
    optax.scale_by_adamax: adam_jax.scale_by_adamax,
}


def _case_parameters(method: Callable[..., Any]) -> tuple[Callable[..., Any], dict[str, Any]]:
    """The undecorated test function and the keyword arguments absl's generated test method
    calls it with (``{}`` for a plain test method)."""
    closure = inspect.getclosurevars(method).nonlocals
    if "testcase_params" not in closure:
        return method, {}
    function, params = closure["test_method"], closure["testcase_params"]
    if not isinstance(params, Mapping):
        params = inspect.signature(function).bind(None, *params).arguments
        params.pop(next(iter(params)))  # self
    return function, dict(params)


def _label(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return value
    if isinstance(value, FunctionType):
        return value.__name__.removeprefix("_setup_").removeprefix("scale_by_")
    return jnp.dtype(value).name


def _select(
    source: type[unittest.TestCase], keep: Callable[[str, dict[str, Any]], bool]
) -> dict[str, tuple[Callable[..., Any], dict[str, Any]]]:
    """``{descriptive name: (test function, parameters)}`` for the cases of ``source`` to keep."""
    cases: dict[str, tuple[Callable[..., Any], dict[str, Any]]] = {}
    for method_name in unittest.TestLoader().getTestCaseNames(source):
        function, params = _case_parameters(getattr(source, method_name))
        if not keep(function.__name__, params):
            continue
        labels = [_label(v) for k, v in params.items() if k not in ("opt_kwargs", "wrapper_kwargs")]
        name = "__".join([function.__name__, *labels])
        assert name not in cases, f"two cases of {source.__name__} are both named {name}"
        cases[name] = (function, params)
    return cases


Body = Callable[[unittest.TestCase], Any]


def _body(function: Callable[..., Any], params: Mapping[str, Any]) -> Body:
    """Calls optax's test function with its case's parameters, optax functions among them
    replaced by adam_jax's."""
    arguments = {
        k: _TRANSFORM_SUBSTITUTES.get(v, v) if callable(v) else v for k, v in params.items()
    }

    def body(self: unittest.TestCase) -> Any:
        return function(self, **arguments)

    body.__doc__ = f"optax's {function.__qualname__}({params})"
    return body


def _bodies(cases: Mapping[str, tuple[Callable[..., Any], dict[str, Any]]]) -> dict[str, Body]:
    return {name: _body(function, params) for name, (function, params) in cases.items()}


def _substituted_class(
    source: type[unittest.TestCase],
    bodies: Mapping[str, Body],
    module: ModuleType,
    attribute: str,
    namespace: Callable[[], _Namespace],
) -> type[unittest.TestCase]:
    """A subclass of ``source`` whose tests are exactly ``bodies`` (the inherited ones hidden),
    run with ``module.attribute`` replaced by ``namespace()``."""

    def setUp(self: unittest.TestCase) -> None:  # noqa: N802
        super(cls, self).setUp()
        self.enterContext(mock.patch.object(module, attribute, namespace()))

    members: dict[str, Any] = dict.fromkeys(unittest.TestLoader().getTestCaseNames(source))
    members.update(setUp=setUp, __module__=__name__, __qualname__=f"AdamJax{source.__name__}")
    for name, body in bodies.items():

        def test(self: unittest.TestCase, _body: Body = body) -> Any:
            return _body(self)

        test.__name__ = test.__qualname__ = name
        test.__doc__ = body.__doc__
        members[name] = test
    cls = type(f"AdamJax{source.__name__}", (source,), members)
    return cls


def _is_adam_family(test_name: str, params: dict[str, Any]) -> bool:
    return params.get("opt_name") in ADAM_FAMILY


_ALIAS_CASES = _select(alias_test.AliasTest, _is_adam_family)

_CONTRIB_CASES = _select(
    contrib_test.ContribTest,
    lambda name, params: (
        params.get("opt_name") in CONTRIB_FAMILY and params.get("wrapper_name") is None
    ),
)

_TRANSFORM_CASES = _select(
    transform_test.TransformTest,
    lambda name, params: (
        name == "test_rms_match_adam"
        or (name.startswith("test_scalers") and params["scaler_constr"] in _TRANSFORM_SUBSTITUTES)
    ),
)


def _rms_match_adam(self: unittest.TestCase, x64: bool) -> tuple[Any, Any]:
    """Runs optax's test_rms_match_adam (float64 params if ``x64``) and returns what it compares,
    ``(scale_by_adam's params, scale_by_rms's params)``, instead of asserting on them."""
    compared: list[tuple[Any, Any]] = []
    capture = _Namespace(
        "test_utils", {"assert_trees_all_close": lambda *pair: compared.append(pair)}
    )
    function, params = _TRANSFORM_CASES["test_rms_match_adam"]
    init_params = self.init_params
    with jax.enable_x64(x64), mock.patch.object(transform_test, "test_utils", capture):
        dtype = jnp.float64 if x64 else jnp.float32
        self.init_params = jax.tree.map(lambda x: x.astype(dtype), init_params)
        _body(function, params)(self)
    self.init_params = init_params
    [(adam_params, rms_params)] = compared
    assert {x.dtype for x in jax.tree.leaves(compared)} == {jnp.dtype(dtype)}
    return adam_params, rms_params


def _rms_match_adam_float32(self: unittest.TestCase) -> None:
    """optax's test_rms_match_adam as shipped (float32) fails, and on optax's side.

    It compares scale_by_adam(b1=0) with optax's scale_by_rms(decay=0.999, bias_correction=True)
    at rtol=1e-6 after five steps. Both compute the same function, but optax's reference takes
    its bias correction as ``1 - 0.999**t`` in float32, off by 1.3e-5 relative to the weight it
    averages with (0.999 rounds to 0.99900001), and its params end 7e-6 (relative) from the
    float64 result. adam_jax takes the correction for the weight it uses and ends 4e-8 from it.
    Asserted here: adam_jax meets the test's rtol against float64, optax's reference does not,
    and so the two float32 results differ by more than the rtol.
    """
    adam_params, rms_params = _rms_match_adam(self, x64=False)
    reference, _ = _rms_match_adam(self, x64=True)
    assert_close = optax_test_utils.assert_trees_all_close
    assert_close(adam_params, reference, rtol=1e-6)
    with self.assertRaisesRegex(AssertionError, "Not equal to tolerance rtol=1e-06"):
        assert_close(rms_params, reference, rtol=1e-6)
    with self.assertRaisesRegex(AssertionError, "Not equal to tolerance rtol=1e-06"):
        assert_close(adam_params, rms_params)  # the shipped test's assertion


def _rms_match_adam_float64(self: unittest.TestCase) -> None:
    """optax's test_rms_match_adam on float64 params, its assertion unchanged: adam_jax's
    scale_by_adam(b1=0) is optax's scale_by_rms with bias correction."""
    function, params = _TRANSFORM_CASES["test_rms_match_adam"]
    with jax.enable_x64(True):
        self.init_params = jax.tree.map(lambda x: x.astype(jnp.float64), self.init_params)
        _body(function, params)(self)


AdamJaxAliasTest = _substituted_class(
    alias_test.AliasTest, _bodies(_ALIAS_CASES), alias_test, "alias", _adam_jax_aliases
)
AdamJaxContribTest = _substituted_class(
    contrib_test.ContribTest, _bodies(_CONTRIB_CASES), contrib_test, "contrib", _adam_jax_contrib
)
AdamJaxTransformTest = _substituted_class(
    transform_test.TransformTest,
    {
        **_bodies({k: v for k, v in _TRANSFORM_CASES.items() if k != "test_rms_match_adam"}),
        "test_rms_match_adam__float32": _rms_match_adam_float32,
        "test_rms_match_adam__float64": _rms_match_adam_float64,
    },
    transform_test,
    "transform",
    _adam_jax_transforms,
)


# ------------------------------------------------------------------------------------------------
# Checks of the wrapper itself.


def test_selection_covers_the_adam_family() -> None:
    """Every test of optax's AliasTest that runs over its optimizer list runs here for all seven
    aliases (as many cases as optax has for each), and nothing else is collected."""
    per_test: dict[str, dict[str, int]] = {}
    for method_name in unittest.TestLoader().getTestCaseNames(alias_test.AliasTest):
        function, params = _case_parameters(getattr(alias_test.AliasTest, method_name))
        counts = per_test.setdefault(function.__name__, {})
        counts[params.get("opt_name")] = counts.get(params.get("opt_name"), 0) + 1
    expected = sum(
        n for counts in per_test.values() for name, n in counts.items() if name in ADAM_FAMILY
    )
    assert len(_ALIAS_CASES) == expected
    for test_name, counts in per_test.items():
        if test_name != "test_explicit_dtype":  # optax runs it for adam and adamw only
            assert set(ADAM_FAMILY) <= set(counts), test_name
    assert sorted(unittest.TestLoader().getTestCaseNames(AdamJaxAliasTest)) == sorted(_ALIAS_CASES)
    assert sorted(unittest.TestLoader().getTestCaseNames(AdamJaxTransformTest)) == [
        "test_rms_match_adam__float32",
        "test_rms_match_adam__float64",
        "test_scalers__adam",
        "test_scalers__adamax",
    ]


def _run_case(cls: type[unittest.TestCase], name: str) -> unittest.TestResult:
    result = unittest.TestResult()
    cls(name).run(result)
    return result


def _zero_updates(factory: Callable[..., optax.GradientTransformation]) -> Callable[..., Any]:
    def broken(*args: Any, **kwargs: Any) -> optax.GradientTransformation:
        return optax.chain(factory(*args, **kwargs), optax.scale(0.0))

    return broken


def test_substitution_runs_adam_jax_and_can_fail() -> None:
    """The substituted optimization test fails for an adam whose updates are zero, and passes
    with adam_jax's; optax's module is left as it was."""
    name = "test_optimization__adam__parabola__float32"

    def broken_aliases() -> _Namespace:
        return _Namespace("alias", {"adam": _zero_updates(adam_jax.adam)})

    body = _bodies(_ALIAS_CASES)[name]
    broken = _substituted_class(alias_test.AliasTest, {name: body}, alias_test, "alias",
                                broken_aliases)  # fmt: skip
    result = _run_case(broken, name)
    assert result.testsRun == 1 and not result.skipped and not result.errors, result.errors
    assert len(result.failures) == 1, result.failures
    assert result.failures[0][0].id().endswith("[Test that optimization works]")
    result = _run_case(AdamJaxAliasTest, name)
    assert result.wasSuccessful() and not result.skipped, result.failures + result.errors
    from optax._src import alias as optax_alias

    assert alias_test.alias is optax_alias


def test_substitution_reaches_state_dtypes() -> None:
    """test_explicit_dtype reads the state that adam_jax builds: an adamw that ignores
    ``mu_dtype`` fails it."""
    name = "test_explicit_dtype__bfloat16__float32__adamw"

    def ignore_mu_dtype(learning_rate: float, mu_dtype: Any = None) -> Any:
        return adam_jax.adamw(learning_rate)

    body = _bodies(_ALIAS_CASES)[name]
    broken = _substituted_class(
        alias_test.AliasTest, {name: body}, alias_test, "alias",
        lambda: _Namespace("alias", {"adamw": ignore_mu_dtype}),
    )  # fmt: skip
    result = _run_case(broken, name)
    assert len(result.failures) == 1 and not result.errors, result.errors
    assert _run_case(AdamJaxAliasTest, name).wasSuccessful()


def test_substitution_of_transform_parameters() -> None:
    """transform_test's scale_by_adam case calls adam_jax's scale_by_adam, not optax's."""
    calls: list[Any] = []

    def spy(*args: Any, **kwargs: Any) -> optax.GradientTransformation:
        calls.append(args)
        return adam_jax.scale_by_adam(*args, **kwargs)

    cases = {"test_scalers__adam": _TRANSFORM_CASES["test_scalers__adam"]}
    assert cases["test_scalers__adam"][1] == {"scaler_constr": optax.scale_by_adam}
    with mock.patch.dict(_TRANSFORM_SUBSTITUTES, {optax.scale_by_adam: spy}):
        cls = _substituted_class(transform_test.TransformTest, _bodies(cases), transform_test,
                                 "transform", _adam_jax_transforms)  # fmt: skip
    assert _run_case(cls, "test_scalers__adam").wasSuccessful()
    assert calls == [()]
