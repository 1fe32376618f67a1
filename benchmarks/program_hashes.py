"""Hashes of the compiled programs of every optimizer: a refactoring check.

For each optimizer of ``adam_jax.registry`` (with its defaults) and each test case of the
family's table (``tests/variants.py``), the StableHLO of one jitted ``update`` on a small tree is
lowered and hashed, source locations removed. With ``--cuda`` (the accelerator compilers
installed: ``bash .ci/install_accelerators``), so is the step of every program of
:mod:`benchmarks.programs` (the offloaded, sliced, 8-bit, 4-bit, flat and ZeRO-1 ones included)
and of a few compositions around them, on the small transformer-like tree, lowered for an H100.
Two checkouts whose hashes agree run the same programs: the same results bit for bit and the
same speed, so a refactoring needs no timing.

    git worktree add /tmp/adam_base <revision>
    PYTHONPATH=/tmp/adam_base python -P benchmarks/program_hashes.py \\
        --tests /tmp/adam_base/tests --out /tmp/base.json [--cuda]
    python benchmarks/program_hashes.py --out /tmp/new.json --compare /tmp/base.json [--cuda]

(run as a file, so that the baseline's ``adam_jax`` is the one imported; for ``--cuda`` the
baseline's checkout needs the compilers too: link its ``.accelerators`` to this one's; and a
path of the same length as this checkout's, as Pallas kernels serialize their source paths).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import re
import sys
from pathlib import Path
from typing import Any

from benchmarks import accelerators

if "--cuda" in sys.argv:
    accelerators.enable()  # before jax is imported

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

import adam_jax  # noqa: E402

# Source locations (which a Pallas kernel's serialized IR also carries) say nothing of the
# program.
jax.config.update("jax_traceback_in_locations_limit", 0)

PARAMS = {"b": jnp.linspace(-0.5, 0.5, 7), "w": jnp.ones((16, 12)), "s": jnp.array(0.3)}
MASK = {"b": False, "s": True, "w": True}
_LOCATIONS = re.compile(r"loc\(.*?\)|#loc\d*")
_MODULE_NAME = re.compile(r"^module @\S+", re.MULTILINE)


def _digest(text: str) -> str:
    # A Pallas kernel's serialized IR names its source files: the checkout's path goes (compare
    # checkouts whose paths have one length, for the serialized lengths to agree).
    text = text.replace(str(Path(adam_jax.__file__).resolve().parents[1]), "<checkout>")
    # The module is named after the jitted function, a name that says nothing of what it does.
    text = _MODULE_NAME.sub("module", _LOCATIONS.sub("", text))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def program_hash(tx: Any) -> str:
    """The hash of ``tx.update``'s lowered program on :data:`PARAMS`."""
    return _digest(jax.jit(tx.update).lower(PARAMS, tx.init(PARAMS), PARAMS).as_text())


def _compositions() -> dict[str, Any]:
    """Wrappers around the library's rules whose programs a schedule of the core reaches."""
    from benchmarks import programs

    def adamw() -> optax.GradientTransformation:
        return adam_jax.adamw(1e-3, weight_decay=0.1)

    def eight_bit() -> optax.GradientTransformation:
        return adam_jax.adamw_8bit(1e-3)

    chained = lambda: optax.chain(optax.clip_by_global_norm(1.0), adamw())  # noqa: E731
    injected = lambda: optax.inject_hyperparams(adam_jax.adamw)(learning_rate=1e-3)  # noqa: E731
    slices = programs.SLICE_ELEMENTS["small"]
    return {
        "offload_state(chain(clip, adamw))": programs.Setting(chained, offload=True),
        "offload_state(inject_hyperparams(adamw))": programs.Setting(injected, offload=True),
        "step_in_slices(offload_state(adamw_8bit))": programs.Setting(
            lambda: adam_jax.step_in_slices(adam_jax.offload_state(eight_bit()), slices)
        ),
        "offload_state(adamw, leaf_by_leaf=False)": programs.Setting(
            lambda: adam_jax.offload_state(adamw(), leaf_by_leaf=False)
        ),
        "step_in_slices(4-bit adamw)": programs.Setting(
            lambda: adam_jax.adamw(1e-3, **adam_jax.four_bit_moments()), in_slices=True
        ),
        "offload_state(step_in_slices(chain(clip, adamw_8bit)))": programs.Setting(
            lambda: optax.chain(optax.clip_by_global_norm(1.0), eight_bit()),
            in_slices=True,
            offload=True,
        ),
    }


def cuda_hashes() -> dict[str, str]:
    """Each program of :mod:`benchmarks.programs` and :func:`_compositions`, lowered for an
    H100 on the small tree."""
    from benchmarks import programs

    target = accelerators.TARGETS["h100"]
    out = {}
    for name, setting in {**programs.SETTINGS, **_compositions()}.items():
        fn, args, out_shardings, _ = programs.step_args(setting, "small", target)
        jitted = jax.jit(fn, donate_argnums=(0, 2), out_shardings=out_shardings)
        out[f"cuda: {name}"] = _digest(jitted.lower(*args).as_text())
    return out


def hashes(tests: Path) -> dict[str, str]:
    """Every registry optimizer's hash, and every test case's of the family's table."""
    out = {name: program_hash(getattr(adam_jax, name)(1e-2)) for name in _optimizer_names()}
    sys.path.insert(0, str(tests))
    for variant in importlib.import_module("variants").VARIANTS:
        for case, options in variant.cases.items():
            options = {**options, **({"mask": MASK} if "mask" in options else {})}
            out[f"{variant.name}/{case}"] = program_hash(variant.make(**options))
    return out


def _optimizer_names() -> tuple[str, ...]:
    # Revisions before the registry (0.3) list the Adam aliases only.
    registry = getattr(adam_jax, "registry", None)
    if registry is not None:
        return registry.names("adam")
    return ("adam", "adamw", "adam_l2", "nadam", "nadamw", "amsgrad", "adamax", "adamaxw")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tests", type=Path, default=Path(__file__).parents[1] / "tests")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--compare", type=Path, help="a JSON of hashes to compare with")
    parser.add_argument("--cuda", action="store_true", help="also the programs lowered for an H100")
    args = parser.parse_args()
    ours = hashes(args.tests)
    if args.cuda:
        ours.update(cuda_hashes())
    args.out.write_text(json.dumps(ours, indent=1, sort_keys=True) + "\n")
    print(f"{len(ours)} programs hashed")
    if args.compare:
        theirs = json.loads(args.compare.read_text())
        shared = sorted(set(ours) & set(theirs))
        differ = [name for name in shared if ours[name] != theirs[name]]
        print(f"{len(shared)} in both, {len(differ)} differ: {differ}")
        if differ:
            raise SystemExit(1)


if __name__ == "__main__":
    main()
