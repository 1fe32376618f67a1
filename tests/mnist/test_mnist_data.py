"""The IDX loader: checks, search order, and downloads from a local HTTP server."""

from __future__ import annotations

import dataclasses
import functools
import gzip
import hashlib
import http.server
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import mnist_helpers
import numpy as np
import pytest
from mnist_helpers import find_real_mnist

from examples.mnist import data

N_TRAIN, N_TEST = 8, 4


def idx_bytes(array: np.ndarray, magic: int | None = None) -> bytes:
    """Uncompressed IDX encoding of a uint8 array (optionally with a wrong magic number)."""
    magic = magic if magic is not None else 0x800 + array.ndim
    return struct.pack(f">I{array.ndim}I", magic, *array.shape) + array.tobytes()


def gz(raw: bytes, level: int = 9) -> bytes:
    return gzip.compress(raw, compresslevel=level, mtime=0)


def make_files(seed: int = 0) -> dict[str, bytes]:
    """Small valid gzip IDX files, keyed by file name."""
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte.gz": rng.integers(0, 256, (N_TRAIN, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte.gz": rng.integers(0, 10, N_TRAIN, dtype=np.uint8),
        "t10k-images-idx3-ubyte.gz": rng.integers(0, 256, (N_TEST, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte.gz": rng.integers(0, 10, N_TEST, dtype=np.uint8),
    }
    return {name: gz(idx_bytes(a)) for name, a in arrays.items()}


def sha(blob: bytes) -> str:
    return hashlib.sha256(blob).hexdigest()


def spec_for(files: dict[str, bytes], mirrors: tuple[str, ...] = ()) -> data.DatasetSpec:
    """A dataset spec whose published sums are those of ``files``."""

    def file_spec(name: str, count: int, is_images: bool) -> data.FileSpec:
        blob = files[name]
        return data.FileSpec(name, sha(blob), sha(gzip.decompress(blob)), count, is_images)

    return data.DatasetSpec(
        name="tiny",
        train_images=file_spec("train-images-idx3-ubyte.gz", N_TRAIN, True),
        train_labels=file_spec("train-labels-idx1-ubyte.gz", N_TRAIN, False),
        test_images=file_spec("t10k-images-idx3-ubyte.gz", N_TEST, True),
        test_labels=file_spec("t10k-labels-idx1-ubyte.gz", N_TEST, False),
        mirrors=mirrors,
    )


def write(directory: Path, files: dict[str, bytes]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, blob in files.items():
        (directory / name).write_bytes(blob)
    return directory


@pytest.fixture(autouse=True)
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No test sees the real data directory or the user's cache."""
    monkeypatch.delenv(data.ENV_DATA_DIR, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def test_loads_valid_files(tmp_path: Path) -> None:
    files = make_files()
    dataset = data.load(spec_for(files), write(tmp_path / "d", files))
    assert dataset.train.images.shape == (N_TRAIN, 28, 28)
    assert dataset.train.images.dtype == np.uint8
    assert dataset.test.labels.shape == (N_TEST,)
    assert dataset.test.labels.dtype == np.int32
    raw = gzip.decompress(files["train-images-idx3-ubyte.gz"])
    np.testing.assert_array_equal(dataset.train.images.ravel(), np.frombuffer(raw[16:], np.uint8))


def test_accepts_recompressed_copy(tmp_path: Path) -> None:
    """A packager's recompressed file (other gzip bytes, same data) passes the check."""
    files = make_files()
    spec = spec_for(files)
    recompressed = {n: gz(gzip.decompress(b), level=1) for n, b in files.items()}
    assert recompressed != files
    dataset = data.load(spec, write(tmp_path / "d", recompressed))
    assert dataset.train.images.shape == (N_TRAIN, 28, 28)


def test_missing_file_without_mirrors(tmp_path: Path) -> None:
    files = make_files()
    spec = spec_for(files)
    del files["t10k-labels-idx1-ubyte.gz"]
    write(data.cache_dir("tiny"), files)
    with pytest.raises(data.DataError, match="t10k-labels-idx1-ubyte.gz: could not download"):
        data.load(spec)


def test_explicit_data_dir_must_exist_and_hold_the_files(tmp_path: Path) -> None:
    """A folder named explicitly is checked first: no download, no cache folder created."""
    files = make_files()
    spec = spec_for(files, mirrors=("http://127.0.0.1:9/",))  # never reached
    with pytest.raises(data.DataError, match=f"data folder {tmp_path / 'nowhere'} does not exist"):
        data.load(spec, tmp_path / "nowhere")
    del files["t10k-labels-idx1-ubyte.gz"], files["train-images-idx3-ubyte.gz"]
    partial = write(tmp_path / "partial", files)
    expected = f"data folder {partial} lacks train-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz"
    with pytest.raises(data.DataError, match=expected):
        data.load(spec, partial)
    assert not (tmp_path / "cache").exists()


def test_wrong_checksum(tmp_path: Path) -> None:
    files = make_files()
    spec = spec_for(files)
    files["train-images-idx3-ubyte.gz"] = make_files(seed=1)["train-images-idx3-ubyte.gz"]
    expected = spec.train_images.sha256
    with pytest.raises(
        data.DataError,
        match=f"train-images-idx3-ubyte.gz: sha256 mismatch, expected {expected}, got",
    ):
        data.load(spec, write(tmp_path / "d", files))


def test_truncated_gzip(tmp_path: Path) -> None:
    files = make_files()
    spec = spec_for(files)
    files["train-images-idx3-ubyte.gz"] = files["train-images-idx3-ubyte.gz"][:-100]
    with pytest.raises(data.DataError, match="train-images-idx3-ubyte.gz: not a complete gzip"):
        data.load(spec, write(tmp_path / "d", files))


def test_corrupt_gzip(tmp_path: Path) -> None:
    files = make_files()
    spec = spec_for(files)
    blob = bytearray(files["train-labels-idx1-ubyte.gz"])
    blob[20] ^= 0xFF
    files["train-labels-idx1-ubyte.gz"] = bytes(blob)
    with pytest.raises(data.DataError, match="train-labels-idx1-ubyte.gz"):
        data.load(spec, write(tmp_path / "d", files))


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (
            idx_bytes(np.zeros((N_TRAIN, 28, 28), np.uint8), magic=0x801),
            r"bad IDX magic 0x00000801 \(expected 0x00000803\)",
        ),
        (
            idx_bytes(np.zeros((N_TRAIN, 28, 27), np.uint8)),
            r"IDX dimensions \(8, 28, 27\), expected \(8, 28, 28\)",
        ),
        (
            idx_bytes(np.zeros((N_TRAIN, 28, 28), np.uint8))[:-10],
            "truncated: expected 6272 bytes of image data, got 6262",
        ),
        (idx_bytes(np.zeros((N_TRAIN, 28, 28), np.uint8))[:10], "truncated IDX header"),
    ],
)
def test_bad_header_or_length(tmp_path: Path, raw: bytes, message: str) -> None:
    """Files whose checksums are right but whose IDX contents are not what the spec says."""
    files = make_files()
    files["train-images-idx3-ubyte.gz"] = gz(raw)
    spec = spec_for(files)  # Published sums of the malformed file: only the header check fails.
    spec = dataclasses.replace(
        spec, train_images=dataclasses.replace(spec.train_images, count=N_TRAIN)
    )
    with pytest.raises(data.DataError, match=f"train-images-idx3-ubyte.gz: {message}"):
        data.load(spec, write(tmp_path / "d", files))


def test_label_out_of_range(tmp_path: Path) -> None:
    files = make_files()
    files["t10k-labels-idx1-ubyte.gz"] = gz(idx_bytes(np.full(N_TEST, 10, np.uint8)))
    with pytest.raises(data.DataError, match="label 10 out of range"):
        data.load(spec_for(files), write(tmp_path / "d", files))


def test_search_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--data-dir, then $ADAM_JAX_DATA_DIR, then system directories, then the cache."""
    files = make_files()
    system = write(tmp_path / "system", files)
    spec = dataclasses.replace(spec_for(files), system_dirs=(str(system),))
    env = write(tmp_path / "env", files)
    explicit = write(tmp_path / "explicit", files)
    monkeypatch.setenv(data.ENV_DATA_DIR, str(env))
    file = spec.train_images
    assert data.locate(file, spec, explicit) == explicit / file.name
    assert data.locate(file, spec) == env / file.name
    monkeypatch.delenv(data.ENV_DATA_DIR)
    assert data.locate(file, spec) == system / file.name
    spec = dataclasses.replace(spec, system_dirs=())
    cached = write(data.cache_dir("tiny"), files)
    assert cached == tmp_path / "cache" / "adam_jax" / "tiny"
    assert data.locate(file, spec) == cached / file.name


def test_bad_file_is_an_error_not_skipped(tmp_path: Path) -> None:
    """A bad copy found first is reported, even if a good copy exists further down the list."""
    files = make_files()
    spec = spec_for(files)
    write(data.cache_dir("tiny"), files)
    bad = dict(files, **{"train-images-idx3-ubyte.gz": b"not gzip"})
    with pytest.raises(data.DataError, match="not a complete gzip"):
        data.load(spec, write(tmp_path / "d", bad))


def test_published_specs_are_consistent() -> None:
    for spec in data.DATASETS.values():
        assert [f.count for f in spec.files] == [60_000, 60_000, 10_000, 10_000]
        assert [f.is_images for f in spec.files] == [True, False, True, False]
        assert all(m.endswith("/") for m in spec.mirrors)
    assert "/usr/share/datasets/fashion-mnist" in data.FASHION_MNIST.system_dirs


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Serves a directory; ``truncate`` announces the full length but sends half the body."""

    truncate = False

    def log_message(self, *args: object) -> None:
        pass

    def copyfile(self, source, outputfile) -> None:  # noqa: ANN001
        body = source.read()
        outputfile.write(body[: len(body) // 2] if self.truncate else body)


class _TruncatingHandler(_Handler):
    truncate = True


@pytest.fixture
def serve(tmp_path: Path) -> Iterator:
    """``serve(files, truncate=False)`` starts a server on 127.0.0.1 and returns its URL."""
    servers = []

    def start(files: dict[str, bytes], truncate: bool = False) -> str:
        root = write(tmp_path / f"served{len(servers)}", files)
        handler = functools.partial(
            _TruncatingHandler if truncate else _Handler, directory=str(root)
        )
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}/"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def test_download_tries_mirrors_in_turn(serve, tmp_path: Path) -> None:
    files = make_files()
    empty = serve({})  # 404 for everything
    wrong = serve(make_files(seed=1))  # right names, wrong contents
    truncated = serve(files, truncate=True)
    good = serve(files)
    spec = spec_for(files, mirrors=(empty, wrong, truncated, good))
    dataset = data.load(spec)
    cache = data.cache_dir("tiny")
    assert sorted(p.name for p in cache.iterdir()) == sorted(files)
    for name, blob in files.items():
        assert (cache / name).read_bytes() == blob
    assert dataset.train.images.shape == (N_TRAIN, 28, 28)
    # A second load reads the cache: no mirror needed.
    assert data.load(dataclasses.replace(spec, mirrors=())).train.labels.shape == (N_TRAIN,)


def test_failed_download_leaves_nothing(serve) -> None:
    files = make_files()
    wrong = serve(make_files(seed=1))
    truncated = serve(files, truncate=True)
    spec = spec_for(files, mirrors=(wrong, truncated))
    with pytest.raises(data.DataError) as info:
        data.load(spec)
    message = str(info.value)
    assert message.startswith("train-images-idx3-ubyte.gz: could not download")
    assert f"{wrong}train-images-idx3-ubyte.gz: sha256 mismatch, expected" in message
    assert f"{truncated}train-images-idx3-ubyte.gz:" in message
    assert not (data.cache_dir("tiny").parent.parent).exists()  # no empty cache folders


def test_real_mnist(mnist: data.Dataset) -> None:
    """Figures from the data folder's README."""
    train_counts = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    test_counts = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert np.bincount(mnist.train.labels).tolist() == train_counts
    assert np.bincount(mnist.test.labels).tolist() == test_counts
    pixels = mnist.train.images / 255.0
    assert pixels.mean() == pytest.approx(0.1307, abs=1e-4)
    assert pixels.std() == pytest.approx(0.3081, abs=1e-4)


def test_tests_find_real_mnist_where_the_readme_command_reads_it(tmp_path: Path) -> None:
    """``$ADAM_JAX_DATA_DIR`` if set, else the folder beside the checkout; the skip reason
    names the folder and what it lacks."""
    beside = write(tmp_path / "shared" / "data" / "mnist", make_files())
    assert find_real_mnist(None, beside) == (beside, "")
    elsewhere = write(tmp_path / "elsewhere", make_files())
    assert find_real_mnist(str(elsewhere), beside) == (elsewhere, "")
    (beside / "t10k-labels-idx1-ubyte.gz").unlink()
    assert find_real_mnist(None, beside) == (
        None,
        f"no real MNIST data: $ADAM_JAX_DATA_DIR unset, so {beside} lacks "
        "t10k-labels-idx1-ubyte.gz",
    )
    assert find_real_mnist(str(tmp_path / "nowhere"), beside)[1] == (
        f"no real MNIST data: $ADAM_JAX_DATA_DIR {tmp_path / 'nowhere'} is no folder"
    )
    assert mnist_helpers.REPO_ROOT.parent / "shared/data/mnist" == mnist_helpers.BESIDE_THE_CHECKOUT
