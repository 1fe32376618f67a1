"""Hashes of the compiled programs of every optimizer: a refactoring check.

For each optimizer of ``adam_jax.registry`` (with its defaults) and each test case of the
family's table (``tests/variants.py``), the StableHLO of one jitted ``update`` on a small tree is
lowered and hashed, source locations removed. Two checkouts whose hashes agree run the same
programs: the same results bit for bit and the same speed, so a refactoring needs no timing.

    git worktree add /tmp/adam_base <revision>
    PYTHONPATH=/tmp/adam_base python -P benchmarks/program_hashes.py \\
        --tests /tmp/adam_base/tests --out /tmp/base.json
    python benchmarks/program_hashes.py --out /tmp/new.json --compare /tmp/base.json

(run as a file, so that the baseline's ``adam_jax`` is the one imported).
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

import jax
import jax.numpy as jnp

import adam_jax

PARAMS = {"b": jnp.linspace(-0.5, 0.5, 7), "w": jnp.ones((16, 12)), "s": jnp.array(0.3)}
MASK = {"b": False, "s": True, "w": True}
_LOCATIONS = re.compile(r"loc\(.*?\)|#loc\d*")


def program_hash(tx: Any) -> str:
    """The hash of ``tx.update``'s lowered program on :data:`PARAMS`."""
    text = jax.jit(tx.update).lower(PARAMS, tx.init(PARAMS), PARAMS).as_text()
    return hashlib.sha256(_LOCATIONS.sub("", text).encode()).hexdigest()[:16]


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
    args = parser.parse_args()
    ours = hashes(args.tests)
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
