"""Checkpoints of a run, through orbax's ``CheckpointManager``, and what can go wrong with them.

A checkpoint is the step directory ``checkpoints/<steps done>`` with two items: ``state`` (the
arrays, orbax ``StandardSave``) and ``run`` (JSON: the settings a resume must match, a sha256
of the arrays, the number of metrics records and the elapsed time). Orbax writes each step
into a temporary directory and renames it into place when complete, so a crash or a kill
leaves either a whole checkpoint or a temporary directory that the next run deletes.

* **Damage.** Restoring checks each checkpoint, newest first: its JSON, its arrays' structure,
  shapes and dtypes against this model, and the sha256 of what was read. A checkpoint that
  fails is reported in one line, moved to ``damaged_checkpoints/`` and the next older one is
  tried; :class:`~examples.common.errors.CheckpointError` if none is intact.
* **Another run's checkpoints.** Settings that fix the state's structure or the batches (the
  program's, such as :data:`examples.mnist.config.RESUME_SETTINGS`) must match; a resume with
  a different value is refused with a message naming the setting
  (:class:`SettingsMismatch`, exit status 2), unless the program gives a :data:`Conversion` for
  it: the arrays are then read as they were written (those whose shapes differ from this
  run's, replicated, to the host), checked against their sha256, and converted into this run's
  shapes and shardings (the language-model example re-lays SOAP's blocks for another number of
  devices so).
* **Full disk.** A checkpoint is not attempted when the disk has less free space than its
  arrays take in memory, and a write that fails with a storage error (``ENOSPC`` and the
  like) is removed; both are reported, the older checkpoints stay intact, and
  :meth:`Checkpoints.save` returns ``False`` so that the caller can go on (see
  ``examples/mnist/README.md``).
* **Several processes.** Every process calls :meth:`Checkpoints.save` and
  :meth:`Checkpoints.restore_latest`; orbax writes each array's parts from the processes that
  hold them, and the JSON record from the first. The sha256 covers the whole arrays, gathered
  from the processes that hold their parts, so it does not depend on how they are split. What
  one process finds (too little space, a failed write, a damaged checkpoint) is shared with
  the others before anyone acts on it, and only the first process deletes or moves files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import hashlib
import json
import shutil
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

import jax
import numpy as np
import orbax.checkpoint as ocp

from examples.common import distributed
from examples.common.errors import CheckpointError

STATE, RUN = "state", "run"
# Status codes with which TensorStore (orbax's array storage) reports failed I/O, as the
# prefix of a ValueError's message; Python-level writes raise OSError.
_STORAGE_STATUS = (
    "RESOURCE_EXHAUSTED",
    "PERMISSION_DENIED",
    "DATA_LOSS",
    "UNAVAILABLE",
    "ABORTED",
    "INTERNAL",
    "UNKNOWN",
    "NOT_FOUND",
    "FAILED_PRECONDITION",
)
# What a damaged checkpoint makes orbax raise: missing files (OSError), corrupt JSON or array
# metadata (ValueError, of which json.JSONDecodeError), a missing item (KeyError), and for
# unreadable array data a plain Exception ("Encountered error while reading array index").
_RESTORE_ERRORS = (OSError, ValueError, KeyError)
_T = TypeVar("_T")

#: Takes up a checkpoint written with another value of a setting: called with the checkpoint's
#: value and this run's, it returns the function that turns the tree as read (the arrays whose
#: shapes differ from this run's as host NumPy arrays in the shapes written) into one of this
#: run's shapes (the arrays it changes as host arrays; they are placed as this run's), or
#: raises ``ValueError`` saying why it cannot (the resume is refused, naming the setting).
Conversion = Callable[[Any, Any], Callable[[Any], Any]]


class SettingsMismatch(CheckpointError):
    """The checkpoints belong to a run with other settings: a bad setting, exit status 2 (as
    for any other bad option)."""

    exit_status = 2


class _Damaged(Exception):
    """A checkpoint that cannot be restored; the message says why."""


@contextlib.contextmanager
def _quiet_abandoned_reads() -> Iterator[None]:
    """Orbax reads a checkpoint's arrays concurrently; when one read fails, the others'
    coroutines are abandoned and Python reports each, with a traceback, as "Exception
    ignored in ...". The failure itself is reported as damage; this silences the leftovers
    while a checkpoint is read, and collects them before it returns."""
    hook = sys.unraisablehook
    sys.unraisablehook = lambda unraisable: None
    try:
        yield
    finally:
        gc.collect()
        sys.unraisablehook = hook


def _is_restore_error(err: Exception) -> bool:
    # type() is Exception, not a subclass: anything more specific, such as a TypeError, is a
    # bug to surface rather than damage.
    return isinstance(err, _RESTORE_ERRORS) or type(err) is Exception


@dataclasses.dataclass(frozen=True)
class Restored:
    """A checkpoint read back: its step, its arrays (as the target tree) and its JSON."""

    step: int
    tree: Any
    run: dict[str, Any]


def digest(tree: Any) -> str:
    """sha256 of the bytes of the tree's arrays, in leaf order (a collective with several
    processes, for the arrays split over them)."""
    sha = hashlib.sha256()
    for leaf in jax.tree.leaves(distributed.host_copy(tree)):
        sha.update(np.ascontiguousarray(leaf).tobytes())
    return sha.hexdigest()


def is_storage_error(err: BaseException) -> bool:
    """Whether ``err`` is a failed write or read of the storage (full disk, permissions...)."""
    if isinstance(err, OSError):
        return True
    return isinstance(err, ValueError) and str(err).split(":", 1)[0] in _STORAGE_STATUS


class Checkpoints:
    """The checkpoints in ``directory``, numbered by steps done; the newest ``keep`` are kept.

    ``warn`` receives one line for each problem that the run survives; ``describe`` names a
    setting's value in the message of a resume whose settings differ (default: as its flag).
    """

    def __init__(
        self,
        directory: Path,
        keep: int,
        warn: Callable[[str], None],
        describe: Callable[[str, Any], str] | None = None,
    ):
        self.warn = warn
        self.describe = describe or as_flag
        self.options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            # A save returns once the checkpoint is complete on disk: "saved" means saved, and
            # a failed write is reported at the step it belongs to.
            enable_async_checkpointing=False,
            # Temporary directories of writes that a crash interrupted.
            cleanup_tmp_directories=True,
        )
        self._open(directory)

    def _open(self, directory: Path) -> None:
        self.directory = directory.absolute()
        self.damaged_directory = self.directory.parent / "damaged_checkpoints"
        try:
            self.manager = ocp.CheckpointManager(
                self.directory,
                options=self.options,
                item_handlers={
                    STATE: ocp.StandardCheckpointHandler(),
                    RUN: ocp.JsonCheckpointHandler(),
                },
            )
        except OSError as err:
            raise CheckpointError(f"cannot keep checkpoints in {self.directory}: {err}") from err

    def move(self, directory: Path, move: Callable[[], None]) -> None:
        """Closes the checkpoints, calls ``move`` (in every process), which moves them to
        ``directory``, and opens them there."""
        self.manager.close()
        move()
        self._open(directory)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def path(self, step: int) -> Path:
        return self.directory / str(step)

    def save(self, step: int, tree: Any, run: dict[str, Any]) -> bool:
        """Writes checkpoint ``step``: the arrays of ``tree`` and the JSON ``run``.

        Returns ``False``, after a warning, if the disk has too little free space or the
        write fails (a full disk, say): a partial write is deleted and the older checkpoints
        are untouched.
        """
        # Checked first: orbax writes the arrays in parallel, and the writes still under way
        # when one fails go on failing in the background, so it is better not to start.
        needed = sum(leaf.nbytes for leaf in jax.tree.leaves(tree))
        try:
            free = shutil.disk_usage(self.directory).free
            problem = None
            if free < needed:
                problem = (
                    f"it needs about {needed / 2**20:.1f} MiB, {free / 2**20:.1f} MiB are free"
                )
        except OSError as err:
            problem = _one_line(err)
        if not distributed.everywhere(problem is None):
            self._not_saved(step, problem or "another process lacks the space")
            return False
        run = dict(run, digest=digest(tree))
        args = ocp.args.Composite(
            **{STATE: ocp.args.StandardSave(_without_empty(tree)), RUN: ocp.args.JsonSave(run)}
        )
        # Also those of a failed write whose other items were still being written when it
        # was cleaned up (orbax writes the items in parallel).
        self._remove_partial_writes()
        problem = None
        try:
            self.manager.save(step, args=args, force=True)
        except (OSError, ValueError) as err:
            if not is_storage_error(err):
                raise
            problem = _one_line(err)
        if not distributed.everywhere(problem is None):
            self._remove_partial_writes()
            self.manager.reload()
            self._not_saved(step, problem or "the write failed in another process")
            return False
        return True

    def _not_saved(self, step: int, reason: str) -> None:
        latest = self.latest_step()
        newest = (
            "there is no checkpoint yet"
            if latest is None
            else f"the newest checkpoint is step {latest}"
        )
        self.warn(f"could not write the checkpoint of step {step} ({reason}); {newest}")

    def _remove_partial_writes(self) -> None:
        if distributed.is_primary():
            for partial in ocp.utils.tmp_checkpoints(self.directory):
                shutil.rmtree(partial.get(), ignore_errors=True)
        distributed.barrier("partial checkpoint writes removed")

    def restore_latest(
        self,
        target: Any,
        settings: dict[str, Any],
        conversions: Mapping[str, Conversion] | None = None,
    ) -> Restored | None:
        """The newest intact checkpoint, read into the structure and shardings of ``target``;
        ``None`` if there is no checkpoint at all.

        Damaged checkpoints newer than the intact one are reported and moved to
        ``damaged_checkpoints/`` (a later save reuses their step numbers). Raises
        :class:`CheckpointError` if no checkpoint is intact (then nothing is moved) or if the
        checkpoints were written with other ``settings``, except those that ``conversions``
        (by setting name) takes up.
        """
        steps = sorted(self.manager.all_steps(), reverse=True)
        damaged: list[tuple[int, str]] = []
        for step in steps:
            try:
                restored = self._restore(step, target, settings, conversions or {})
            except _Damaged as err:
                damaged.append((step, str(err)))
                continue
            for bad_step, reason in damaged:
                moved = self._move_aside(bad_step)
                self.warn(f"checkpoint {bad_step} is damaged ({reason}); moved to {moved}")
            if damaged:
                distributed.barrier("damaged checkpoints moved")
                self.manager.reload()
                self.warn(f"resuming from the newest intact checkpoint, step {step}")
            return restored
        if damaged:
            reasons = "; ".join(f"step {step}: {reason}" for step, reason in damaged)
            raise CheckpointError(
                f"no intact checkpoint in {self.directory} ({reasons}). Add --restart to "
                "start over (they stay until the new run's first checkpoint)"
            )
        return None

    def _restore(
        self,
        step: int,
        target: Any,
        settings: dict[str, Any],
        conversions: Mapping[str, Conversion],
    ) -> Restored:
        """Checkpoint ``step``, read into the structure and shardings of ``target``, or
        :class:`_Damaged`. Every process reaches the same verdict at each stage. A checkpoint
        of settings that ``conversions`` takes up is read as written, checked, then
        converted."""
        run, stored, convert = _agreed(
            lambda: self._read_record(step, target, settings, conversions)
        )
        tree = _agreed(lambda: self._read_arrays(step, target, None if convert is None else stored))
        if digest(tree) != run["digest"]:
            raise _Damaged("its arrays do not match the checksum written with them")
        if convert is not None:
            tree = _converted(step, tree, target, convert)
        return Restored(step, tree, run)

    def _read_record(
        self,
        step: int,
        target: Any,
        settings: dict[str, Any],
        conversions: Mapping[str, Conversion],
    ) -> tuple[dict[str, Any], Any, Callable[[Any], Any] | None]:
        """The JSON record of checkpoint ``step``, checked against ``settings``, after a check
        of its array metadata against ``target``; that metadata; and the conversion of its
        arrays where a setting differs that ``conversions`` takes up (None: read as they
        are). With a conversion, the arrays' shapes may differ from ``target``'s."""
        try:
            run_args = ocp.args.Composite(**{RUN: ocp.args.JsonRestore()})
            with _quiet_abandoned_reads():
                run = self.manager.restore(step, args=run_args)[RUN]
        except Exception as err:
            if not _is_restore_error(err):
                raise
            raise _Damaged(f"its {RUN} record cannot be read: {_one_line(err)}") from err
        fields = ("settings", "digest", "records", "logged_step", "elapsed_seconds")
        if not (
            isinstance(run, dict)
            and all(field in run for field in fields)
            and isinstance(run["settings"], dict)
        ):
            raise _Damaged(f"its {RUN} record lacks some of {', '.join(fields)}")
        convert = _check_settings(step, run["settings"], settings, self.describe, conversions)
        try:
            stored = self.manager.item_metadata(step)[STATE]
        except Exception as err:
            if not _is_restore_error(err):
                raise
            raise _Damaged(f"its array metadata cannot be read: {_one_line(err)}") from err
        if stored is None:
            raise _Damaged("its array metadata is missing")
        shapes = convert is None
        if mismatch := _structure_mismatch(stored.tree, _without_empty(target), shapes):
            raise _Damaged(mismatch)
        return run, stored.tree, convert

    def _read_arrays(self, step: int, target: Any, stored: Any = None) -> Any:
        """The arrays of checkpoint ``step``, laid out as ``target``'s whatever the layout
        they were written from (each process reads the parts that its devices hold). With
        ``stored`` (the checkpoint's array metadata), those whose shapes there differ from
        ``target``'s are read in their stored shapes, whole, as host NumPy arrays."""
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _without_empty(target))
        as_stored: set[str] = set()
        if stored is not None:
            shapes = {
                _path_name(p): tuple(m.shape)
                for p, m in jax.tree_util.tree_leaves_with_path(stored)
            }

            def read_as(path: tuple[Any, ...], leaf: jax.ShapeDtypeStruct) -> Any:
                name = _path_name(path)
                if shapes[name] == tuple(leaf.shape):
                    return leaf
                as_stored.add(name)
                return jax.ShapeDtypeStruct(shapes[name], leaf.dtype, sharding=_whole(leaf))

            abstract = jax.tree_util.tree_map_with_path(read_as, abstract)
        try:
            with _quiet_abandoned_reads():
                restored = self.manager.restore(
                    step, args=ocp.args.Composite(**{STATE: ocp.args.StandardRestore(abstract)})
                )[STATE]
        except Exception as err:
            if not _is_restore_error(err):
                raise
            raise _Damaged(f"its arrays cannot be read: {_one_line(err)}") from err
        leaves, treedef = jax.tree.flatten(target)
        read = treedef.flatten_up_to(restored)
        tree = treedef.unflatten(
            [t if t.size == 0 else r for t, r in zip(leaves, read, strict=True)]
        )
        return jax.tree_util.tree_map_with_path(
            lambda path, x: jax.device_get(x) if _path_name(path) in as_stored else x, tree
        )

    def _move_aside(self, step: int) -> Path:
        """Moves checkpoint ``step`` into ``damaged_checkpoints/`` (in the first process; the
        others only learn where) and returns where it went."""
        destination = self.damaged_directory / str(step)
        copies = 1
        while destination.exists():
            destination = self.damaged_directory / f"{step}-{copies}"
            copies += 1
        if not distributed.is_primary():
            return destination
        try:
            self.damaged_directory.mkdir(parents=True, exist_ok=True)
            shutil.move(self.path(step), destination)
        except OSError as err:
            raise CheckpointError(
                f"checkpoint {step} is damaged and could not be moved to {destination}: {err}"
            ) from err
        return destination

    def close(self) -> None:
        self.manager.close()


def _agreed(read: Callable[[], _T]) -> _T:
    """``read()``; raises :class:`_Damaged` if it raised it here or in another process, so
    that every process goes on to the same next stage (a collective with several)."""
    try:
        result = read()
    except _Damaged:
        distributed.everywhere(False)
        raise
    if not distributed.everywhere(True):
        raise _Damaged("another process could not read it")
    return result


def _whole(leaf: jax.ShapeDtypeStruct) -> Any:
    """Where to read an array whole: replicated on ``leaf``'s mesh (every process holds it),
    in its memory."""
    sharding = leaf.sharding
    if isinstance(sharding, jax.sharding.NamedSharding):
        return jax.sharding.NamedSharding(
            sharding.mesh, jax.sharding.PartitionSpec(), memory_kind=sharding.memory_kind
        )
    return sharding


def _converted(step: int, tree: Any, target: Any, convert: Callable[[Any], Any]) -> Any:
    """``convert(tree)`` in ``target``'s structure, shapes, dtypes and shardings (the arrays
    it returns on the host placed as ``target``'s, each process copying its devices' parts).
    An intact checkpoint that does not convert is refused as one of other settings
    (:class:`SettingsMismatch`), not taken for damaged: the conversion is the same in every
    process, and so is the verdict."""

    def refused(reason: str) -> SettingsMismatch:
        return SettingsMismatch(
            f"cannot resume from the checkpoint of step {step}: {reason}. Resume with the "
            "settings it was written with, or add --restart to start over (the checkpoints "
            "stay until the new run's first checkpoint)"
        )

    try:
        converted = convert(tree)
    except ValueError as err:
        raise refused(f"its arrays cannot be converted ({_one_line(err)})") from err
    if jax.tree.structure(converted) != jax.tree.structure(target):
        raise refused("its arrays, converted, are not this model's")

    def place(path: tuple[Any, ...], like: Any, leaf: Any) -> Any:
        shape, dtype = tuple(np.shape(leaf)), np.dtype(leaf.dtype)
        if shape != tuple(like.shape) or dtype != like.dtype:
            raise refused(
                f"{_path_name(path)} is {dtype.name}{list(shape)} once converted, "
                f"{like.dtype.name}{list(like.shape)} in this model"
            )
        if like.size == 0:
            return like
        if isinstance(leaf, jax.Array) and leaf.sharding == like.sharding:
            return leaf
        host = np.asarray(leaf)
        return jax.make_array_from_callback(like.shape, like.sharding, lambda i: host[i])

    return jax.tree_util.tree_map_with_path(place, target, converted)


def _one_line(err: BaseException) -> str:
    if type(err) is Exception and err.__cause__ is not None:
        err = err.__cause__  # Orbax wraps TensorStore's error, which says what is wrong.
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:200]}{'...' if len(text) > 200 else ''}"


def _without_empty(tree: Any) -> Any:
    """``tree`` with None for its arrays of no values (SOAP's factors of a leaf that has
    none), which orbax refuses to write; a restore takes them from its target."""
    return jax.tree.map(lambda x: None if x.size == 0 else x, tree)


def _path_name(path: tuple[Any, ...]) -> str:
    """``/``-joined keys; orbax stores integer dict keys as strings, so compare as strings."""
    return "/".join(str(getattr(key, "key", getattr(key, "idx", key))) for key in path)


def _structure_mismatch(stored: Any, target: Any, shapes: bool = True) -> str | None:
    """What differs between the checkpoint's array metadata and this model's arrays (their
    shapes too, unless ``shapes`` is False)."""
    stored_leaves = {_path_name(p): m for p, m in jax.tree_util.tree_leaves_with_path(stored)}
    target_leaves = {_path_name(p): x for p, x in jax.tree_util.tree_leaves_with_path(target)}
    if missing := sorted(target_leaves.keys() - stored_leaves.keys()):
        return f"it lacks {len(missing)} array(s) of this model, such as {missing[0]}"
    if extra := sorted(stored_leaves.keys() - target_leaves.keys()):
        return f"it has {len(extra)} array(s) this model lacks, such as {extra[0]}"
    for name, array in target_leaves.items():
        meta = stored_leaves[name]
        same_shape = tuple(meta.shape) == tuple(array.shape) or not shapes
        if not same_shape or np.dtype(meta.dtype) != array.dtype:
            return (
                f"{name} is {np.dtype(meta.dtype).name}{list(meta.shape)} in the checkpoint, "
                f"{array.dtype.name}{list(array.shape)} in this model"
            )
    return None


def _check_settings(
    step: int,
    stored: dict[str, Any],
    settings: dict[str, Any],
    describe: Callable[[str, Any], str],
    conversions: Mapping[str, Conversion],
) -> Callable[[Any], Any] | None:
    """Refuses ``settings`` that differ from the checkpoint's (:class:`SettingsMismatch`)
    unless ``conversions`` takes them up; returns the conversion of the arrays (None where
    every setting is the same)."""

    def refused(name: str, reason: str = "") -> SettingsMismatch:
        was = describe(name, stored.get(name))
        return SettingsMismatch(
            f"cannot resume: the checkpoint of step {step} was written with {was}, this run "
            f"has {describe(name, settings[name])}{reason}. Resume with the same setting, or "
            "add --restart to start over (the checkpoints stay until the new run's first "
            "checkpoint)"
        )

    # JSON has no tuples and turns every key into a string; compare through it.
    differing = [
        name
        for name, value in settings.items()
        if name not in stored or json.loads(json.dumps(value)) != stored[name]
    ]
    for name in differing:
        if name not in conversions or name not in stored:
            raise refused(name)
    converts = []
    for name in differing:
        try:
            converts.append(conversions[name](stored[name], settings[name]))
        except ValueError as err:
            raise refused(name, f": {err}") from err
    if not converts:
        return None

    def convert(tree: Any) -> Any:
        for step_of_conversion in converts:
            tree = step_of_conversion(tree)
        return tree

    return convert


def as_flag(name: str, value: Any) -> str:
    """A setting as the flag that gives it: ``--name value``, ``--name`` or ``no --name``."""
    flag = "--" + name.replace("_", "-")
    if value is None or value is False:
        return f"no {flag}"
    return flag if value is True else f"{flag} {value}"
