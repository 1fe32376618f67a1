"""NumPy-only loader for MNIST and Fashion-MNIST in their original gzip IDX format.

An explicit data directory must hold the four files (an error says which are missing).
Without one, files are looked up in, in order: ``$ADAM_JAX_DATA_DIR``, the dataset's system
directories (Debian's ``dataset-fashion-mnist`` package) and the cache directory
``~/.cache/adam_jax/<dataset>``. Missing files are downloaded into the cache from the
canonical mirrors, one after the other, into a temporary file that is checked against the
published sha256 before it is renamed into place, so the cache never holds a partial or
unverified file. Every file is checked again when it is read: checksum, IDX magic, shape and
length. Anything wrong raises :class:`DataError` naming the file and what was expected.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import http.client
import os
import struct
import tempfile
import urllib.request
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from examples.common.metrics import default_file_mode

ENV_DATA_DIR = "ADAM_JAX_DATA_DIR"
IMAGES_MAGIC = 0x00000803  # unsigned bytes, 3 dimensions
LABELS_MAGIC = 0x00000801  # unsigned bytes, 1 dimension
_CHUNK = 1 << 16


class DataError(RuntimeError):
    """A data file is missing, truncated, corrupt or not the one that was published."""


@dataclasses.dataclass(frozen=True)
class FileSpec:
    """One published IDX file.

    ``sha256`` is the sum of the gzip file as published. ``raw_sha256`` is the sum of its
    decompressed contents: it accepts copies that were recompressed by a packager (Debian's
    Fashion-MNIST files are), which have the same data but different gzip bytes.
    """

    name: str
    sha256: str
    raw_sha256: str
    count: int
    is_images: bool


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """Where a dataset lives and what its four files must be."""

    name: str
    train_images: FileSpec
    train_labels: FileSpec
    test_images: FileSpec
    test_labels: FileSpec
    mirrors: tuple[str, ...]
    system_dirs: tuple[str, ...] = ()
    # Training-set pixel statistics (of values scaled to [0, 1]), used to normalize inputs.
    mean: float = 0.5
    std: float = 0.5

    @property
    def files(self) -> tuple[FileSpec, ...]:
        return (self.train_images, self.train_labels, self.test_images, self.test_labels)


MNIST = DatasetSpec(
    name="mnist",
    train_images=FileSpec(
        "train-images-idx3-ubyte.gz",
        "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
        "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
        60_000,
        True,
    ),
    train_labels=FileSpec(
        "train-labels-idx1-ubyte.gz",
        "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
        "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
        60_000,
        False,
    ),
    test_images=FileSpec(
        "t10k-images-idx3-ubyte.gz",
        "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
        "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
        10_000,
        True,
    ),
    test_labels=FileSpec(
        "t10k-labels-idx1-ubyte.gz",
        "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
        "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
        10_000,
        False,
    ),
    mirrors=(
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "https://storage.googleapis.com/cvdf-datasets/mnist/",
        "http://yann.lecun.com/exdb/mnist/",
    ),
    mean=0.1307,
    std=0.3081,
)

FASHION_MNIST = DatasetSpec(
    name="fashion_mnist",
    train_images=FileSpec(
        "train-images-idx3-ubyte.gz",
        "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
        "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
        60_000,
        True,
    ),
    train_labels=FileSpec(
        "train-labels-idx1-ubyte.gz",
        "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
        "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
        60_000,
        False,
    ),
    test_images=FileSpec(
        "t10k-images-idx3-ubyte.gz",
        "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
        "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
        10_000,
        True,
    ),
    test_labels=FileSpec(
        "t10k-labels-idx1-ubyte.gz",
        "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
        "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
        10_000,
        False,
    ),
    mirrors=(
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        "https://github.com/zalandoresearch/fashion-mnist/raw/master/data/fashion/",
    ),
    system_dirs=("/usr/share/datasets/fashion-mnist",),
    mean=0.2860,
    std=0.3530,
)

DATASETS: dict[str, DatasetSpec] = {spec.name: spec for spec in (MNIST, FASHION_MNIST)}


@dataclasses.dataclass(frozen=True)
class Split:
    """Images as uint8 ``(n, 28, 28)`` and labels as int32 ``(n,)``."""

    images: np.ndarray
    labels: np.ndarray


@dataclasses.dataclass(frozen=True)
class Dataset:
    train: Split
    test: Split
    spec: DatasetSpec


def cache_dir(dataset: str) -> Path:
    """``$XDG_CACHE_HOME/adam_jax/<dataset>``: ``~/.cache/adam_jax/<dataset>`` by default."""
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "adam_jax" / dataset


def search_dirs(spec: DatasetSpec) -> list[Path]:
    """The directories searched for the dataset's files when no data directory is given,
    most specific first."""
    dirs = []
    if env := os.environ.get(ENV_DATA_DIR):
        dirs.append(Path(env))
    dirs.extend(Path(d) for d in spec.system_dirs)
    dirs.append(cache_dir(spec.name))
    return dirs


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )


def download(
    file: FileSpec, dest_dir: Path, mirrors: Sequence[str], *, timeout: float = 30.0
) -> Path:
    """Downloads ``file`` into ``dest_dir`` from the first mirror that serves the right bytes.

    Each attempt streams into a temporary file in ``dest_dir`` (so the final rename is atomic,
    on the same file system) and hashes while writing; only a file with the published sha256
    is renamed to its final name. Raises :class:`DataError` listing every mirror's failure,
    after removing the folders it created for the file (no empty cache is left behind).
    """
    created = [d for d in (dest_dir, *dest_dir.parents) if not d.exists()]  # deepest first
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest = dest_dir / file.name
    failures = []
    for mirror in mirrors:
        url = mirror + file.name
        fd, tmp_name = tempfile.mkstemp(dir=dest_dir, prefix=f".{file.name}.", suffix=".part")
        tmp = Path(tmp_name)
        try:
            os.fchmod(fd, default_file_mode())
            digest = hashlib.sha256()
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
                total = int(resp.headers.get("Content-Length") or 0) or None
                with _progress() as progress:
                    task = progress.add_task(f"{file.name}", total=total)
                    while chunk := resp.read(_CHUNK):
                        out.write(chunk)
                        digest.update(chunk)
                        progress.advance(task, len(chunk))
            if digest.hexdigest() != file.sha256:
                raise DataError(
                    f"sha256 mismatch, expected {file.sha256}, got {digest.hexdigest()}"
                )
            os.replace(tmp, dest)
            return dest
        except (OSError, http.client.HTTPException, DataError) as err:
            failures.append(f"  {url}: {err}")
        finally:
            tmp.unlink(missing_ok=True)
    for directory in created:
        directory.rmdir()
    raise DataError(
        f"{file.name}: could not download a file with sha256 {file.sha256}:\n" + "\n".join(failures)
    )


def _parse_idx(file: FileSpec, raw: bytes) -> np.ndarray:
    magic = IMAGES_MAGIC if file.is_images else LABELS_MAGIC
    shape = (file.count, 28, 28) if file.is_images else (file.count,)
    header_len = 4 + 4 * len(shape)
    if len(raw) < header_len:
        raise DataError(f"{file.name}: truncated IDX header ({len(raw)} of {header_len} bytes)")
    (got_magic,) = struct.unpack(">I", raw[:4])
    if got_magic != magic:
        raise DataError(f"{file.name}: bad IDX magic 0x{got_magic:08x} (expected 0x{magic:08x})")
    dims = struct.unpack(f">{len(shape)}I", raw[4:header_len])
    if dims != shape:
        raise DataError(f"{file.name}: IDX dimensions {dims}, expected {shape}")
    n_bytes = int(np.prod(shape))
    if len(raw) - header_len != n_bytes:
        what = "image" if file.is_images else "label"
        raise DataError(
            f"{file.name}: truncated: expected {n_bytes} bytes of {what} data, "
            f"got {len(raw) - header_len}"
        )
    return np.frombuffer(raw, np.uint8, offset=header_len).reshape(shape)


def read_idx(path: Path, file: FileSpec) -> np.ndarray:
    """Reads and fully checks one gzip IDX file against its :class:`FileSpec`."""
    try:
        raw = gzip.decompress(path.read_bytes())
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(f"{path}: not a complete gzip file ({err})") from err
    if hashlib.sha256(raw).hexdigest() != file.raw_sha256 and _sha256(path) != file.sha256:
        raise DataError(
            f"{path}: sha256 mismatch, expected {file.sha256}, got {_sha256(path)} "
            f"(decompressed: expected {file.raw_sha256}, got {hashlib.sha256(raw).hexdigest()})"
        )
    array = _parse_idx(file, raw)
    if not file.is_images and array.max(initial=0) > 9:
        raise DataError(f"{path}: label {array.max()} out of range 0-9")
    return array


def check_data_dir(spec: DatasetSpec, data_dir: str | os.PathLike) -> None:
    """Raises :class:`DataError` unless ``data_dir`` is a folder with all of the dataset's
    files: a folder named explicitly is where the data should be, not a hint."""
    directory = Path(data_dir)
    cache = cache_dir(spec.name)
    instead = f"leave the data folder out to use ${ENV_DATA_DIR} or {cache} (downloading there)"
    if not directory.is_dir():
        raise DataError(f"data folder {directory} does not exist; create it or {instead}")
    missing = [f.name for f in spec.files if not (directory / f.name).is_file()]
    if missing:
        raise DataError(
            f"data folder {directory} lacks {', '.join(missing)}; add them or {instead}"
        )


def locate(file: FileSpec, spec: DatasetSpec, data_dir: str | os.PathLike | None = None) -> Path:
    """The first copy of ``file`` in :func:`search_dirs`, downloaded into the cache if none;
    with ``data_dir``, the copy there (see :func:`check_data_dir`)."""
    if data_dir:
        check_data_dir(spec, data_dir)
        return Path(data_dir) / file.name
    for directory in search_dirs(spec):
        if (directory / file.name).is_file():
            return directory / file.name
    return download(file, cache_dir(spec.name), spec.mirrors)


def load(
    dataset: str | DatasetSpec = "mnist", data_dir: str | os.PathLike | None = None
) -> Dataset:
    """Loads (downloading if needed) and checks the train and test splits of ``dataset``."""
    spec = DATASETS[dataset] if isinstance(dataset, str) else dataset

    def read(file: FileSpec) -> np.ndarray:
        return read_idx(locate(file, spec, data_dir), file)

    train = Split(read(spec.train_images), read(spec.train_labels).astype(np.int32))
    test = Split(read(spec.test_images), read(spec.test_labels).astype(np.int32))
    return Dataset(train=train, test=test, spec=spec)
