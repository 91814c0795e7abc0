"""The bundled sample dataset: a balanced Fashion-MNIST subset in the csv-split layout (METHODS §5).

    python -m sslfg.data.build.sample [--out data/sample] [--per-class 1000] [--test-per-class 200]

Source: Fashion-MNIST (Zalando Research, MIT licence) as packaged by Debian
(`dataset-fashion-mnist`), read from /usr/share/datasets/fashion-mnist when the package is
installed, else from a cache folder, which is filled without root by `apt-get download` +
`dpkg -x`. Output (28x28 grey PNGs, 10 classes):

    <out>/images/train/<class_id>/<index>.png   index = position in the idx train file
    <out>/images/test/<class_id>/<index>.png    index = position in the idx t10k file
    <out>/train.csv, val.csv, train_val.csv, test.csv   (class_id,dir)
    <out>/classid_classname.csv
    <out>/.complete                              the parameters, written last

Per class, `per_class` train images are drawn with a fixed seed and split 90/10 into train/val;
`test_per_class` test images are drawn from t10k. The folder is built under a temporary name and
renamed when complete, so a run that is interrupted leaves no half-written `<out>`; a second run
with the same parameters returns at once. Two runs for the same `<out>` must not overlap.
`build_from_fashion_mnist` does all this for any per-image rendering (`sslfg.data.build.cluttered`).
"""

from __future__ import annotations

import csv
import gzip
import json
import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from sslfg.data.images import DataError
from sslfg.entrypoints import CommandParser

logger = logging.getLogger(__name__)

PACKAGE = "dataset-fashion-mnist"
SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
SOURCE_FILES = {  # part -> (images, labels)
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
CLASS_NAMES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
MARKER = ".complete"
SEED = 0
VAL_FRACTION = 0.1
_FORMAT_VERSION = 1  # bump when the output layout changes, so old folders are rebuilt

Row = tuple[int, str, int]  # (class_id, part, index in that part's idx file)
Parts = dict[str, tuple[np.ndarray, np.ndarray]]  # part -> (images (N, 28, 28) uint8, labels (N,))
Render = Callable[[Row], tuple[np.ndarray, Sequence[object]]]  # row -> (grey image, extra csv values)


def prepare_sample(
    out_dir: str | os.PathLike[str],
    per_class: int = 1000,
    test_per_class: int = 200,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    system_dir: str | os.PathLike[str] = SYSTEM_DIR,
) -> Path:
    """Build the sample dataset in `out_dir` (skipped if already built with these parameters).

    Args:
        out_dir: output folder; must not exist, or be a folder this function built.
        per_class: train_val images per class (from the train file); 10% of them (at least 1) go
            to val, the rest to train.
        test_per_class: test images per class (from the t10k file).
        cache_dir: where the idx files are kept when the Debian package is not installed;
            default `<out_dir's parent>/.cache/fashion-mnist` (data/.cache/fashion-mnist for
            the default output data/sample).
        system_dir: where the installed Debian package keeps the idx files.

    Returns:
        `out_dir` as a Path.
    """
    params = {"dataset": "fashion-mnist", "licence": "MIT (Zalando Research)"}
    return build_from_fashion_mnist(out_dir, params, per_class, test_per_class, _copy_garment, (),
                                    cache_dir=cache_dir, system_dir=system_dir, builder="sslfg.data.build.sample")


def _copy_garment(data: Parts) -> Render:
    return lambda row: (data[row[1]][0][row[2]], ())


def build_from_fashion_mnist(
    out_dir: str | os.PathLike[str],
    params: dict[str, object],
    per_class: int,
    test_per_class: int,
    renderer: Callable[[Parts], Render],
    extra_columns: Sequence[str],
    *,
    cache_dir: str | os.PathLike[str] | None,
    system_dir: str | os.PathLike[str],
    builder: str,
) -> Path:
    """Build `out_dir` from the sample's rows (see `prepare_sample`), each image drawn by `renderer(parts)(row)`,
    which also gives the row's values of `extra_columns` for the csv files. `params` (plus the split sizes)
    identify a build in the marker; `builder` (the module) is named in errors."""
    out = Path(out_dir)
    if per_class < 2 or test_per_class < 1:
        raise ValueError(f"need per_class >= 2 and test_per_class >= 1, got {per_class}, {test_per_class}")
    params = {**params, "per_class": per_class, "test_per_class": test_per_class, "val_fraction": VAL_FRACTION,
              "seed": SEED, "version": _FORMAT_VERSION}
    if out.exists():
        if _read_marker(out) == params:
            logger.info("dataset already complete: %s", out)
            return out
        if not (out / MARKER).exists():
            raise DataError(
                f"{out} exists but was not built by {builder} (no {MARKER} file); remove it or "
                "choose another output folder."
            )
        logger.info("%s was built with other parameters; rebuilding it", out)

    source = find_source(cache_dir or out.parent / ".cache" / "fashion-mnist", system_dir)
    data = {part: _read_part(source, part) for part in SOURCE_FILES}
    rng = np.random.default_rng(SEED)
    train_val = _pick_per_class(data["train"][1], per_class, rng, "train", source)
    test = _pick_per_class(data["test"][1], test_per_class, rng, "test", source)
    n_val = max(1, round(per_class * VAL_FRACTION))
    # train_val rows are drawn in random order within a class.
    splits = {
        "train": sorted(row for rows in train_val for row in rows[n_val:]),
        "val": sorted(row for rows in train_val for row in rows[:n_val]),
        "test": sorted(row for rows in test for row in rows),
    }
    splits["train_val"] = sorted(splits["train"] + splits["val"])

    partial = out.parent / f".{out.name}.partial"  # a fixed name: a crashed run's leftover is replaced
    if partial.exists():
        shutil.rmtree(partial)
    try:
        _write_layout(partial, splits, renderer(data), extra_columns)
        (partial / MARKER).write_text(json.dumps(params, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        partial.rename(out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    logger.info("wrote %d images to %s", len(splits["train_val"]) + len(splits["test"]), out)
    return out


def find_source(cache_dir: str | os.PathLike[str], system_dir: str | os.PathLike[str] = SYSTEM_DIR) -> Path:
    """The folder holding the four Fashion-MNIST idx .gz files: `system_dir` if the Debian package
    is installed, else `cache_dir`, which is filled from the package (apt-get download) if needed."""
    folders = (Path(system_dir), Path(cache_dir))
    for folder in folders:
        if all((folder / name).is_file() for name in _all_source_files()):
            return folder
    _download_to(Path(cache_dir), searched=folders)
    return Path(cache_dir)


def read_idx(path: Path) -> np.ndarray:
    """Decode a gzipped idx file of unsigned bytes (MNIST format) -> uint8 array of its shape."""
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as err:
        raise _bad_source(path, f"cannot be read ({err})") from err
    # Header: two zero bytes, type code 0x08 (unsigned byte), number of dimensions, then each
    # dimension as a big-endian uint32.
    if len(raw) < 4 or raw[:3] != b"\x00\x00\x08":
        raise _bad_source(path, "is not an idx file of unsigned bytes")
    ndim = raw[3]
    offset = 4 + 4 * ndim
    shape = tuple(int(n) for n in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    if len(raw) - offset != int(np.prod(shape)):
        raise _bad_source(path, f"is truncated (its header says {shape})")
    return np.frombuffer(raw, np.uint8, offset=offset).reshape(shape)


def _bad_source(path: Path, why: str) -> DataError:
    return DataError(f"{path} {why}. Replace it; a file in the cache folder is fetched again once deleted.")


def _read_part(source: Path, part: str) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 28, 28) uint8, labels (N,) uint8) of the `part` ("train" or "test") files."""
    images_file, labels_file = (source / name for name in SOURCE_FILES[part])
    images, labels = read_idx(images_file), read_idx(labels_file)
    if images.ndim != 3 or labels.shape != images.shape[:1] or labels.max(initial=0) >= len(CLASS_NAMES):
        raise DataError(
            f"{images_file} {images.shape} and {labels_file} {labels.shape} are not a matching pair of "
            f"Fashion-MNIST image and label files with {len(CLASS_NAMES)} classes."
        )
    return images, labels


def _pick_per_class(labels: np.ndarray, n: int, rng: np.random.Generator, part: str, source: Path) -> list[list[Row]]:
    """For each class, `n` random indices of `labels` as (class_id, part, index) rows, in drawing order."""
    picked = []
    for class_id in range(len(CLASS_NAMES)):
        pool = np.flatnonzero(labels == class_id)
        if len(pool) < n:
            raise DataError(
                f"{source / SOURCE_FILES[part][1]} has {len(pool)} images of class {class_id}, fewer than "
                f"the {n} asked for; lower --per-class / --test-per-class."
            )
        picked.append([(class_id, part, int(i)) for i in rng.permutation(pool)[:n]])
    return picked


def _write_layout(root: Path, splits: dict[str, list[Row]], render: Render, extra_columns: Sequence[str]) -> None:
    """Write the PNGs (drawn by `render`) and csv files of `splits` under `root`."""
    rows = splits["train_val"] + splits["test"]
    for class_id, part in {(c, p) for c, p, _ in rows}:
        (root / "images" / part / str(class_id)).mkdir(parents=True, exist_ok=True)

    def save(row: Row) -> Sequence[object]:
        class_id, part, index = row
        image, extra = render(row)
        Image.fromarray(image).save(root / "images" / part / str(class_id) / f"{index}.png", compress_level=1)
        return extra

    # Writing 12k tiny files is file-system bound; threads overlap it (about 3x faster).
    with ThreadPoolExecutor(max_workers=8) as pool:
        extras = dict(zip(rows, pool.map(save, rows), strict=True))  # re-raises the first error
    for split, rows in splits.items():
        with open(root / f"{split}.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["class_id", "dir", *extra_columns])
            writer.writerows((class_id, f"{part}/{class_id}/{index}.png", *extras[class_id, part, index])
                             for class_id, part, index in rows)
    with open(root / "classid_classname.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["class_id", "class_name"])
        writer.writerows(enumerate(CLASS_NAMES))


def _read_marker(out: Path) -> dict | None:
    """The parameters recorded in `out`'s marker, or None if absent or unreadable."""
    try:
        return json.loads((out / MARKER).read_text())
    except (OSError, ValueError):
        return None


def _all_source_files() -> list[str]:
    return [name for pair in SOURCE_FILES.values() for name in pair]


def _download_to(cache: Path, searched: tuple[Path, ...]) -> None:
    """Fetch the Debian package without root (apt-get download + dpkg -x); copy its idx files to `cache`."""

    def fail(detail: str) -> DataError:
        return DataError(
            f"Fashion-MNIST not found in {' or '.join(map(str, searched))}, and fetching the Debian package "
            f"{PACKAGE} failed: {detail}. Run `sudo apt-get update` (apt-get download needs the package "
            f"lists) or `sudo apt-get install {PACKAGE}`, or copy {', '.join(_all_source_files())} into "
            f"{cache}."
        )

    if shutil.which("apt-get") is None or shutil.which("dpkg") is None:
        raise fail("apt-get/dpkg are not available on this system")
    logger.info("fetching %s with apt-get download into %s", PACKAGE, cache)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            done = subprocess.run(
                ["apt-get", "download", PACKAGE], cwd=tmp, capture_output=True, text=True, timeout=600
            )
            debs = sorted(Path(tmp).glob("*.deb"))
            if done.returncode != 0 or not debs:
                raise fail(done.stderr.strip() or f"exit status {done.returncode}, no .deb file")
            unpacked = Path(tmp) / "unpacked"
            done = subprocess.run(
                ["dpkg", "-x", str(debs[0]), str(unpacked)], capture_output=True, text=True, timeout=600
            )
            if done.returncode != 0:
                raise fail(f"dpkg -x: {done.stderr.strip()}")
        except subprocess.TimeoutExpired as err:
            raise fail(f"{err.cmd[0]} timed out") from err
        src = unpacked / SYSTEM_DIR.relative_to("/")
        cache.mkdir(parents=True, exist_ok=True)
        for name in _all_source_files():
            if not (src / name).is_file():
                raise fail(f"the package has no {name}")
            shutil.copyfile(src / name, cache / f"{name}.part")
            os.replace(cache / f"{name}.part", cache / name)  # never leave a half-copied file


def main(argv: list[str] | None = None) -> None:
    """Command line: build the sample dataset and print its folder."""
    command_line(argv, "sslfg.data.build.sample", __doc__, "data/sample", prepare_sample)


def command_line(argv: list[str] | None, module: str, doc: str, default_out: str, prepare: Callable[..., Path]) -> None:
    """The command line of a builder `module` (`prepare` has prepare_sample's signature): build, print the folder."""
    parser = CommandParser(prog=f"python -m {module}", description=doc.split("\n")[0])
    parser.add_argument("--out", default=default_out, help=f"output folder (default: {default_out})")
    parser.add_argument("--per-class", type=int, default=1000, help="train_val images per class")
    parser.add_argument("--test-per-class", type=int, default=200, help="test images per class")
    parser.add_argument(
        "--cache", default=None, help="idx file cache (default: <out parent>/.cache/fashion-mnist)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        out = prepare(args.out, args.per_class, args.test_per_class, cache_dir=args.cache)
    except ValueError as err:  # DataError included: a message for the user, not a traceback
        parser.exit(1, f"error: {err}\n")
    print(out)


if __name__ == "__main__":
    main()
