"""Datasets for the layouts of METHODS §5: csv splits, ImageFolder, and unlabelled image trees.

Every dataset validates its files at construction (fail fast, before any training) and then only
keeps plain lists, so it is cheap to index and picklable for DataLoader workers. All three expose

- `paths: list[str]`: absolute image paths, in a deterministic order;
- `labels: list[int]`: class ids in [0, num_classes), or -1 for every unlabelled image;
- `classes: list[str]`: class names indexed by id (empty when unlabelled);
- `num_classes: int` (0 when unlabelled);
- `skipped: list[tuple[str, str]]`: (path, reason) of every image dropped by `on_bad_image="skip"`;
- `source: str`: the csv file or folder that lists the split, for messages;
- `overlaps_train: int`: for `data.test_split`, how many of its images the training split lists too
  (all of them when the two are one split); 0 otherwise;
- `boxes: list[Box] | None`: per sample, the object box (x0, y0, x1, y1) in pixels of the image as loaded
  (x1, y1 exclusive: a box over pixels 2..5 is (2, 6)); None unless the csv layout is read with boxes
  (`data.boxes`). Boxes are checked when read (numbers, x0 < x1, y0 < y1, not negative), and, when the
  images are checked, against the size of their image (read from its header, kept in `sizes`), so a box
  past its image's right or bottom edge stops every command at start-up, `--check` included;
- `sizes: list[tuple[int, int]] | None`: (width, height) of each image as loaded, read with the boxes;
- `__getitem__(i) -> (transform(image) or the RGB PIL image, label)`; `image(i)`: the RGB PIL image.

Splits share one class mapping: `build_dataset` gives every split other than `data.train_split` the
training split's classes (ImageFolder: by folder name; csv: its class count when neither
classid_classname.csv nor data.num_classes declares one), then warns about test classes without
training images, training classes a split lacks, and images listed in both the training and the
test split (by real path, also when data.test_split names the training split itself).

Bad images (`on_bad_image`): with "error" (the default) a missing csv-listed file fails at construction
and an unreadable one when it is loaded, both naming the file and where it was listed; with "skip"
every image is decoded once at construction and the missing or unreadable ones are dropped, each
logged with its reason and kept in `skipped`. Annotation errors (a bad class id, a missing column)
are errors in both modes.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from sslfg.data.images import IMAGE_EXTENSIONS, MAX_PIXELS, DataError, has_image_extension, load_image, loaded_size
from sslfg.files import read_utf8
from sslfg.schema import DataConfig

CLASS_NAMES_FILE = "classid_classname.csv"
BAD_IMAGE_POLICIES = ("error", "skip")
_MAX_LISTED = 5  # problems spelled out in one error message; the rest are counted
_SCAN_THREADS = 8  # PIL decodes without the GIL: the skip-mode scan reads this many images at once

BOX_COLUMNS = ("x0", "y0", "x1", "y1")
_CLASS_ID = re.compile("-?[0-9]+")  # a minus is read only to say that the id is negative
# a box coordinate: a plain decimal number (float() would also read "1_0" as 10 and non-ASCII digits)
_NUMBER = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?|[+-]?(nan|inf)", re.IGNORECASE)
# where labels are missing: pretraining reads images without them, the evaluations (kNN, linear, online kNN) cannot
LABELS_HINT = "; to pretrain on images without labels set data.labels=false (evaluations need labels)"
CLASS_ID_RULE = "no spaces, signs, decimals, underscores or non-ASCII digits"

Transform = Callable[[Image.Image], Any]
Box = tuple[float, float, float, float]
OnBadImage = Literal["error", "skip"]
log = logging.getLogger(__name__)


class _ImageListDataset(Dataset):
    """Indexing shared by the datasets below: parallel lists `paths` and `labels`."""

    paths: list[str]
    labels: list[int]
    classes: list[str]
    num_classes: int
    source: str
    boxes: list[Box] | None = None
    sizes: list[tuple[int, int]] | None = None
    overlaps_train: int = 0  # for data.test_split: images the training split lists too (`check_leakage`)
    _per_sample: tuple[str, ...] = ("paths", "labels", "boxes")  # the parallel lists that dropping an image shortens

    def __init__(self, transform: Transform | None, on_bad_image: OnBadImage, max_pixels: int) -> None:
        if on_bad_image not in BAD_IMAGE_POLICIES:
            raise DataError(f"data.on_bad_image: expected one of {', '.join(BAD_IMAGE_POLICIES)}, "
                            f"got {on_bad_image!r}")
        self.transform = transform
        self.max_pixels = max_pixels  # data.max_image_pixels
        self.skipped: list[tuple[str, str]] = []

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        img = self._load(index)
        return (self.transform(img) if self.transform is not None else img), self.labels[index]

    def image(self, index: int) -> Image.Image:
        """Image `index` as loaded, without the transform (figures)."""
        return self._load(index)

    def _load(self, index: int) -> Image.Image:
        try:
            return load_image(self.paths[index], self.max_pixels)
        except DataError as err:
            raise DataError(f"{err} (listed in {self._origin(index)})") from err

    def _origin(self, index: int) -> str:
        """Where sample `index` was listed, for error messages."""
        raise NotImplementedError

    def _problem(self, index: int) -> str | None:
        """Why image `index` cannot be loaded (the DataError message), or None if it loads."""
        try:
            self._load(index)
        except DataError as err:
            return str(err)
        return None

    def _apply_policy(self, on_bad_image: OnBadImage) -> None:
        """With "skip", decode every image once and drop those that fail (see the module docstring)."""
        if on_bad_image == "error":
            return
        with ThreadPoolExecutor(min(_SCAN_THREADS, os.cpu_count() or 1)) as pool:
            problems = list(pool.map(self._problem, range(len(self.paths))))
        bad = {i: reason for i, reason in enumerate(problems) if reason is not None}
        if not bad:
            return
        for i, reason in bad.items():
            log.warning("data.on_bad_image=skip: skipping %s: %s", self.paths[i], reason)
            self.skipped.append((self.paths[i], reason))
        if len(bad) == len(self.paths):
            raise DataError(f"every one of the {len(bad)} images of this split is unreadable (data.on_bad_image=skip "
                            f"leaves none): {_summarise([reason for _, reason in self.skipped])}")
        keep = np.array([i not in bad for i in range(len(problems))])
        for name in self._per_sample:
            values = getattr(self, name)
            if values is not None:  # the shards layout keeps numpy arrays: filtered as arrays
                setattr(self, name, values[keep] if isinstance(values, np.ndarray) else
                        [v for v, kept in zip(values, keep, strict=True) if kept])
        log.warning("data.on_bad_image=skip: skipped %d of %d images; %d remain", len(bad), len(problems), len(self))


class CsvSplitDataset(_ImageListDataset):
    """The csv-split layout used by GLSim and ILA.

    Files: `root/<split>.csv`, UTF-8, with a header holding at least the columns `class_id` (0-based)
    and `dir` (image path relative to `root/<images_dir>`), in any order; optional
    `root/classid_classname.csv` (`class_id,class_name`) gives `classes`, else names are str(id).

    The class count is `num_classes` if > 0, else the count of classid_classname.csv if it exists,
    else `train.num_classes` (the training split's listing), else this split's largest id + 1; in
    the last case the ids must be exactly 0..C-1, so 1-based or gapped ids are an error instead of
    empty classes. An image listed twice is an error. Error messages give both the 1-based data row
    and the file line (which counts the header as line 1). `check_images=False` only lists the split
    (no file is checked or decoded), for cross-split checks. `boxes=True` reads the columns
    x0,y0,x1,y1 into `boxes` (see the module docstring). `labelled=False` reads only `dir` (and the
    boxes): every label is -1, there are no classes (data.labels=false).
    """

    _per_sample = ("paths", "labels", "boxes", "lines", "rows")

    def __init__(
        self,
        root: str,
        split: str,
        images_dir: str = "images",
        num_classes: int = 0,
        transform: Transform | None = None,
        on_bad_image: OnBadImage = "error",
        train: _ImageListDataset | None = None,
        check_images: bool = True,
        boxes: bool = False,
        labelled: bool = True,
        max_pixels: int = MAX_PIXELS,
    ) -> None:
        super().__init__(transform, on_bad_image, max_pixels)
        self.root = _existing_dir(root)
        self.split = split
        self.csv_path = self.source = os.path.join(self.root, f"{split}.csv")
        self.images_root = os.path.join(self.root, images_dir)
        if not os.path.isfile(self.csv_path):
            raise DataError(split_not_found("csv", self.root, split))

        names_path = os.path.join(self.root, CLASS_NAMES_FILE)
        names = _read_class_names(names_path) if labelled and os.path.isfile(names_path) else None
        if names is not None and num_classes > 0 and len(names) != num_classes:
            raise DataError(
                f"{names_path} lists {len(names)} classes but num_classes is {num_classes}; "
                "make them agree (set data.num_classes, or 0 to use the file's count)."
            )
        if num_classes > 0:
            bound, rule = num_classes, f" below num_classes = {num_classes}; fix the csv (or data.num_classes)"
        elif names is not None:
            bound, rule = len(names), f" below the {len(names)} classes of {names_path}; fix the csv or that file"
        elif train is not None:
            bound, rule = train.num_classes, (
                f" of the training split {train.source} (0..{train.num_classes - 1}): a class it lacks cannot be "
                "learned. Remove those rows, or declare every class with data.num_classes or "
                f"{CLASS_NAMES_FILE} to keep them as classes without training images"
            )
        else:
            bound, rule = 0, "; fix the csv"

        box_hint = " (data.boxes is true: add the box columns, or set data.boxes=false)" if boxes else ""
        label_hint = LABELS_HINT if labelled else ""
        label_column = ("class_id",) if labelled else ()
        rows = _read_table(self.csv_path, label_column + ("dir",) + (BOX_COLUMNS if boxes else ()),
                           box_hint + label_hint)
        if not rows:
            raise DataError(f"{self.csv_path} has a header but no data rows; the split is empty.")
        if not labelled:  # a class id of -1 (no class) in front: the columns keep their places below
            rows = [(line, ["-1", *values]) for line, values in rows]
        self.lines = [line for line, _ in rows]  # file line of each sample, for error messages
        self.rows = list(range(1, len(rows) + 1))  # 1-based data row of each sample
        self.labels = self._parse_labels(rows, bound, rule) if labelled else [-1] * len(rows)
        if boxes:
            self.boxes = self._parse_boxes(rows)
        dirs = [values[1] for _, values in rows]
        self._check_duplicates(dirs)
        if labelled and not bound:
            self._check_ids_are_contiguous()
        self.paths = [os.path.join(self.images_root, d) for d in dirs]
        if check_images and on_bad_image != "skip":  # skip: the scan drops missing files with the unreadable ones
            self._check_files_exist()

        self.num_classes = (bound or max(self.labels) + 1) if labelled else 0  # from every listed row, skipped or not
        self.classes = names if names is not None else [str(i) for i in range(self.num_classes)]
        if check_images:
            self._apply_policy(on_bad_image)
            if boxes:
                self._check_boxes_fit()

    def _parse_labels(self, rows: list[tuple[int, list[str]]], bound: int, rule: str) -> list[int]:
        """class_id column -> ints; every bad value is an error (the first few are listed); `rule` says
        where `bound` comes from and what to do."""
        labels, bad = [], []
        for row, (line, (value, *_)) in enumerate(rows, start=1):
            label = _class_id(value)
            if label is None:
                bad.append(f"data row {row} (line {line}): {value!r} is not a class id")
                continue
            if label < 0:
                bad.append(f"data row {row} (line {line}): class_id {label} is negative")
            elif bound and label >= bound:
                bad.append(f"data row {row} (line {line}): class_id {label} is outside [0, {bound})")
            labels.append(label)
        if bad:
            raise DataError(f"{self.csv_path}: bad class_id values: {_summarise(bad)}. Class ids are 0-based integers"
                            f" written as plain digits 0-9 ({CLASS_ID_RULE}){rule}.")
        return labels

    def _parse_boxes(self, rows: list[tuple[int, list[str]]]) -> list[Box]:
        """x0,y0,x1,y1 columns -> boxes; every malformed box is an error (the first few are listed)."""
        boxes, bad = [], []
        for row, (line, values) in enumerate(rows, start=1):
            where = f"data row {row} (line {line})"
            if not all(_NUMBER.fullmatch(v) for v in values[2:]):
                bad.append(f"{where}: {','.join(values[2:])!r} are not four numbers")
                continue
            box = tuple(float(v) for v in values[2:])
            x0, y0, x1, y1 = box
            text = f"{where}: ({x0:g}, {y0:g}, {x1:g}, {y1:g})"
            if not all(math.isfinite(v) for v in box):
                bad.append(f"{text} is not finite")
            elif x0 < 0 or y0 < 0:
                bad.append(f"{text} starts outside the image (negative x0 or y0)")
            elif x1 <= x0 or y1 <= y0:
                bad.append(f"{text} is empty (needs x0 < x1 and y0 < y1)")
            boxes.append((x0, y0, x1, y1))
        if bad:
            raise DataError(f"{self.csv_path}: bad object boxes: {_summarise(bad)}. Boxes are x0,y0,x1,y1 in pixels of "
                            "the image (x1, y1 exclusive, 0 <= x0 < x1 <= width, 0 <= y0 < y1 <= height); fix the "
                            "rows, or set data.boxes=false to ignore the columns.")
        return boxes

    def _check_boxes_fit(self) -> None:
        """Reads every image's size (header only, `sizes`); DataError naming the rows whose box reaches past the
        right or bottom edge of its image."""
        with ThreadPoolExecutor(min(_SCAN_THREADS, os.cpu_count() or 1)) as pool:
            self.sizes = list(pool.map(self._loaded_size, range(len(self.paths))))
        assert self.boxes is not None
        pairs = enumerate(zip(self.boxes, self.sizes, strict=True))
        bad = [f"{self._origin(i)}: object box ({x0:g}, {y0:g}, {x1:g}, {y1:g}) lies outside its {w}x{h} image "
               f"{self.paths[i]}" for i, ((x0, y0, x1, y1), (w, h)) in pairs if x1 > w or y1 > h]
        if bad:
            raise DataError(f"{_summarise(bad)} (x1 <= width and y1 <= height, pixels of the image as loaded); fix the "
                            "rows, or set data.boxes=false.")

    def _loaded_size(self, index: int) -> tuple[int, int]:
        try:
            return loaded_size(self.paths[index])
        except DataError as err:
            raise DataError(f"{err} (listed in {self._origin(index)})") from err

    def _check_duplicates(self, dirs: list[str]) -> None:
        """An image listed twice in one split would count twice in training and in every metric: twice by the
        same path, or by two paths to one file (a link; as the train/test overlap check compares them)."""
        first: dict[str, int] = {}
        twice = []
        for i, d in enumerate(dirs):
            j = first.setdefault(os.path.realpath(os.path.join(self.images_root, d)), i)
            if j != i:
                a, b = self.labels[j], self.labels[i]
                ids = f" with class ids {a} and {b}" if a != b else ""
                what = f"both list {d}" if os.path.normpath(dirs[j]) == os.path.normpath(d) else \
                    f"list {dirs[j]} and {d}, one file (through a link)"
                twice.append(f"data rows {j + 1} (line {self.lines[j]}) and {i + 1} (line {self.lines[i]}) {what}{ids}")
        if twice:
            raise DataError(f"{self.csv_path}: {len(twice)} images are listed more than once: {_summarise(twice)}. "
                            "A duplicate counts twice in training and evaluation; list each image once per split.")

    def _check_ids_are_contiguous(self) -> None:
        """Without a declared class count the ids must be 0..C-1: a gap would be a class without images."""
        top = max(self.labels)
        absent = sorted(set(range(top + 1)) - set(self.labels))
        if absent:
            raise DataError(
                f"{self.csv_path}: class ids run from {min(self.labels)} to {top} but no row has class "
                f"{_summarise([str(c) for c in absent])}, which would be a class without images "
                f"(1-based ids such as CUB's 1..200 leave class 0 empty). Renumber the ids to 0..C-1 (for 1-based "
                f"ids subtract 1), or keep them and declare the classes: data.num_classes={top + 1} or "
                f"{os.path.join(self.root, CLASS_NAMES_FILE)}."
            )

    def _check_files_exist(self) -> None:
        missing = _missing_files(self.paths)
        if not missing:
            return
        folders = {i for i in missing if os.path.isdir(self.paths[i])}
        listed = [f"data row {i + 1} (line {self.lines[i]}): {self.paths[i]}"
                  + (" is a folder, not an image file" if i in folders else "") for i in missing]
        what = [f"{len(missing) - len(folders)} do not exist"] if len(missing) > len(folders) else []
        what += [f"{len(folders)} are folders"] if folders else []
        raise DataError(
            f"{self.csv_path}: of {len(self.paths)} listed images, {' and '.join(what)} under {self.images_root}: "
            f"{_summarise(listed)}. Check data.root and data.images_dir"
            + ("; the dir column names one image file per row, so list a folder's images one by one." if folders
               else ".")
        )

    def _origin(self, index: int) -> str:
        return f"{self.csv_path}, data row {self.rows[index]} (line {self.lines[index]})"


class ImageFolderDataset(_ImageListDataset):
    """The ImageFolder layout used by LoDisc: `root/<split>/<class>/<image>`.

    Classes are the sorted names of the subfolders of `root/<split>` (label = position), or those of
    `train` (the training split's listing) when given: labels then follow the training split by
    folder name, and a class folder it lacks is an error. Images are found recursively under each
    class folder by extension (IMAGE_EXTENSIONS) and sorted, following linked folders once (`_find_images`).
    Hidden files and folders are skipped; images directly in `root/<split>` have no class and are skipped
    with a warning.
    `check_images=False` only lists the split (no image is decoded), for cross-split checks.
    """

    def __init__(self, root: str, split: str, transform: Transform | None = None,
                 on_bad_image: OnBadImage = "error", train: _ImageListDataset | None = None,
                 check_images: bool = True, max_pixels: int = MAX_PIXELS) -> None:
        super().__init__(transform, on_bad_image, max_pixels)
        self.root = _existing_dir(root)
        self.split_dir = self.source = os.path.join(self.root, split)
        if not os.path.isdir(self.split_dir):
            raise DataError(split_not_found("imagefolder", self.root, split))
        folders = _subdirs(self.split_dir)
        if not folders:
            raise DataError(
                f"{self.split_dir} has no class subfolders (the imagefolder layout is "
                "root/<split>/<class>/<image>); for images without labels use data.format=folder."
            )
        self.classes = train.classes if train is not None else folders
        self.classes_dir = train.source if train is not None else self.split_dir  # where the class list comes from
        ids = {name: label for label, name in enumerate(self.classes)}
        extra = [name for name in folders if name not in ids]
        if extra:
            raise DataError(
                f"{self.split_dir} has class folders that the training split {self.classes_dir} lacks: "
                f"{_summarise([repr(name) for name in extra])}. Class ids come from the training split's folders, by "
                "name, so a model trained on it has no class for these images. Add the class to the training split, "
                "or remove or rename the folders (data.train_split names the training split)."
            )
        self.num_classes = len(self.classes)
        loose = sorted(e.path for e in os.scandir(self.split_dir) if e.is_file() and has_image_extension(e.name))
        if loose:
            log.warning("%s: skipped %d images beside the class folders (%s): an image outside a class folder has no "
                        "class. Move them into their class folder.", self.split_dir, len(loose), _summarise(loose))
        self.paths, self.labels, empty = [], [], []
        for name in folders:
            files = _find_images(os.path.join(self.split_dir, name))
            if not files:
                empty.append(name)
            self.paths += files
            self.labels += [ids[name]] * len(files)
        if empty:
            raise DataError(
                f"{self.split_dir}: {len(empty)} class folders contain no images ({_summarise(empty)}); "
                f"image extensions are {', '.join(IMAGE_EXTENSIONS)}. Add images or remove the folders."
            )
        if check_images:
            self._apply_policy(on_bad_image)

    def _origin(self, index: int) -> str:
        return f"image folder {self.split_dir}, class {self.classes[self.labels[index]]!r}"


class UnlabelledFolderDataset(_ImageListDataset):
    """Any tree of images under `root` (recursive, sorted), each with label -1."""

    def __init__(self, root: str, transform: Transform | None = None, on_bad_image: OnBadImage = "error",
                 max_pixels: int = MAX_PIXELS) -> None:
        super().__init__(transform, on_bad_image, max_pixels)
        self.root = _existing_dir(root)
        self.paths = _find_images(self.root)
        if not self.paths:
            raise DataError(
                f"no images found under {self.root} (searched recursively for "
                f"{', '.join(IMAGE_EXTENSIONS)})."
            )
        self.labels = [-1] * len(self.paths)
        self.source = self.root
        self.classes = []
        self.num_classes = 0
        self._apply_policy(on_bad_image)

    def _origin(self, index: int) -> str:
        return f"image folder {self.root}"


HELD_OUT_SPLITS = ("test.csv", "val.csv", "test", "val")  # what marks a labelled dataset's root (csv, imagefolder)


def check_training_folder(cfg: DataConfig) -> None:
    """DataError when data.format=folder would train on a labelled dataset's held-out split: its root holds one
    (every image under the root is read). Embedding such a root is fine; training on it leaks the test images."""
    splits = [n for n in HELD_OUT_SPLITS if os.path.exists(os.path.join(cfg.root, n))] if cfg.format == "folder" else []
    if splits:
        raise DataError(f"{cfg.root} holds {', '.join(splits)}: held-out splits of a csv or imagefolder dataset, "
                        "and data.format=folder reads every image under it for training, theirs too; set data.format "
                        "to csv or imagefolder (with data.train_split), or data.root to a folder of training images "
                        "only")


def build_dataset(
    cfg: DataConfig, split: str, transform: Transform | None = None, split_key: str = ""
) -> CsvSplitDataset | ImageFolderDataset | UnlabelledFolderDataset:
    """The dataset `cfg` describes, for `split` (a csv name or a folder; ignored by format "folder"), with
    `cfg.on_bad_image` applied. A split other than `cfg.train_split` takes its classes from the training
    split and is checked against it (`check_classes`; `check_leakage` for `cfg.test_split`). With `cfg.labels`
    false a csv split is read without class ids and an imagefolder split as plain images under root/<split>.
    A split that is not there is an error naming `split_key`, the key or option that chose it (default: the
    data.*_split keys that hold it, `split_keys`), and the splits there are."""
    if not cfg.root:
        raise DataError(
            "data.root must be set to the dataset folder, e.g. data.root=data/sample, or include a "
            "configs/datasets/<name>.yaml."
        )
    if not os.path.isdir(cfg.root):
        raise DataError(
            f"data.root does not exist or is not a folder: {cfg.root} (resolved to "
            f"{os.path.abspath(cfg.root)}). Set data.root to your dataset's folder; `make data` builds the bundled "
            "data/sample and data/cluttered."
        )
    if cfg.boxes and cfg.format not in ("csv", "shards"):
        raise DataError(f"data.boxes is true but data.format is {cfg.format!r}: object boxes are read from the box "
                        "columns of the csv layout (or shards written from it); use data.format=csv or set "
                        "data.boxes=false.")
    if cfg.format not in ("csv", "imagefolder", "folder", "shards"):
        raise DataError(f"unknown data.format {cfg.format!r}; expected one of csv, imagefolder, folder, shards.")
    if cfg.format != "folder" and not split_exists(cfg, split):
        raise DataError(split_not_found(cfg.format, cfg.root, split, split_key or split_keys(cfg, split)))
    if cfg.format == "folder":
        return UnlabelledFolderDataset(cfg.root, transform, cfg.on_bad_image, cfg.max_image_pixels)
    if cfg.format == "shards":  # imported here: the shard reader builds on this module
        from sslfg.data.shard_reader import ShardDataset

        return ShardDataset(cfg.root, split, transform, cfg.on_bad_image, cfg.labels, cfg.boxes, cfg.max_image_pixels,
                            cfg.num_classes)
    if not cfg.labels:  # the split's images only: no classes to share or check between splits
        if cfg.format == "csv":
            return CsvSplitDataset(cfg.root, split, cfg.images_dir, transform=transform, on_bad_image=cfg.on_bad_image,
                                   boxes=cfg.boxes, labelled=False, max_pixels=cfg.max_image_pixels)
        return UnlabelledFolderDataset(os.path.join(cfg.root, split), transform, cfg.on_bad_image,
                                       cfg.max_image_pixels)
    train = _training_listing(cfg, split)
    dataset: CsvSplitDataset | ImageFolderDataset
    if cfg.format == "csv":
        dataset = CsvSplitDataset(cfg.root, split, cfg.images_dir, cfg.num_classes, transform, cfg.on_bad_image, train,
                                  boxes=cfg.boxes, max_pixels=cfg.max_image_pixels)
    else:
        dataset = ImageFolderDataset(cfg.root, split, transform, cfg.on_bad_image, train,
                                     max_pixels=cfg.max_image_pixels)
        if cfg.num_classes > 0 and dataset.num_classes != cfg.num_classes:
            raise DataError(
                f"{dataset.classes_dir} has {dataset.num_classes} class folders but data.num_classes is "
                f"{cfg.num_classes}; make them agree (0 infers it from the folders)."
            )
    if train is not None:
        check_classes(dataset, train)
    if split == cfg.test_split and (train is not None or split == cfg.train_split):
        dataset.overlaps_train = check_leakage(dataset, train or dataset)
    return dataset


SPLIT_FILES = {"csv": ".csv", "shards": ".json"}  # a split of these layouts is root/<split><suffix>; else a folder


def split_exists(cfg: DataConfig, split: str) -> bool:
    """Whether `split` of the dataset `cfg` describes is there: its csv file, folder or shard index (a folder named
    like the file, or a dangling link, is not: `split_not_found` says which)."""
    suffix = SPLIT_FILES.get(cfg.format, "")
    path = os.path.join(cfg.root, split + suffix)
    return os.path.isfile(path) if suffix else os.path.isdir(path)


def split_keys(cfg: DataConfig, split: str) -> str:
    """The keys of `cfg` that name `split`, as a message names them: "data.test_split" or
    "data.train_split and data.val_split"; "" when none does."""
    return " and ".join(f"data.{key}" for key in ("train_split", "val_split", "test_split")
                        if getattr(cfg, key) == split)


def in_section(message: str, section: str, keys: Iterable[str]) -> str:
    """`message`, a data error about a DataConfig built from another config section (`eval_data`), with the
    data.* keys that section sets (`keys`) named as that section's, so the error names the key to change."""
    names = "|".join(keys)
    return re.sub(rf"\bdata\.({names})\b", rf"{section}.\1", message) if names else message


def split_not_found(data_format: str, root: str, split: str, key: str = "") -> str:
    """What to say when `split` is not a split of the `data_format` dataset in `root`: the key (or option) that
    chose it, what was looked for, the splits there are (a csv folder holding shards of it: data.format=shards)."""
    suffix = SPLIT_FILES.get(data_format, "")
    expected, what = os.path.join(root, f"{split}{suffix}"), "file" if suffix else "folder"
    if os.path.islink(expected) and not os.path.exists(expected):
        return (f"{key or 'split'}: {expected} is a link to {os.readlink(expected)}, which does not exist; point it "
                f"at the split's {what} or remove it")
    if suffix and os.path.isdir(expected):
        return f"{key or 'split'}: {expected} is a folder, not the split's {suffix} file; move it away or rename it"
    names = sorted(e.name.removesuffix(suffix) for e in os.scandir(root) if not e.name.startswith(".") and
                   e.name != CLASS_NAMES_FILE and (e.name.endswith(suffix) and e.is_file() if suffix else e.is_dir()))
    fix = f"set {key or 'the split'} to one of them"
    if data_format == "csv" and os.path.exists(os.path.join(root, f"{split}.json")):
        fix = "the folder holds tar shards of this split (python -m sslfg.data.shards): set data.format=shards"
    return (f"{key or 'split'}: {split!r} is not a split of {root} (no {split}{suffix or '/'} there; its "
            f"{data_format} splits: {', '.join(names) or 'none'}); {fix}")


def _training_listing(cfg: DataConfig, split: str) -> CsvSplitDataset | ImageFolderDataset | None:
    """The listing of `cfg.train_split` (no image checked) that `split` is defined against; None for the
    training split itself, or when it does not exist (every command builds it too, and says so)."""
    if split == cfg.train_split:
        return None
    if cfg.format == "csv":
        if not os.path.isfile(os.path.join(cfg.root, f"{cfg.train_split}.csv")):
            return None
        return CsvSplitDataset(cfg.root, cfg.train_split, cfg.images_dir, cfg.num_classes, check_images=False)
    if not os.path.isdir(os.path.join(cfg.root, cfg.train_split)):
        return None
    return ImageFolderDataset(cfg.root, cfg.train_split, check_images=False)


def check_classes(dataset: _ImageListDataset, train: _ImageListDataset) -> None:
    """Warns about classes of `dataset` without training images (its images of them can never be
    classified correctly) and logs the training classes `dataset` lacks (they are not evaluated)."""
    counts = Counter(dataset.labels)
    trained = set(train.labels)
    unseen = sorted(c for c in counts if c not in trained)
    if unseen:
        log.warning("%s: %d images of %d classes that the training split %s has no images of (%s); no model trained "
                    "on it can classify them correctly, so they count as errors in every metric. Add training "
                    "images of these classes, or remove them from this split.", dataset.source,
                    sum(counts[c] for c in unseen), len(unseen), train.source, _class_names(dataset, unseen))
    absent = sorted(trained - set(counts))
    if absent:
        log.warning("%s has no images of %d of the %d training classes (%s); class ids still follow the training "
                    "split %s, and these classes are simply not evaluated.", dataset.source, len(absent),
                    len(trained), _class_names(dataset, absent), train.source)


def check_leakage(test: _ImageListDataset, train: _ImageListDataset) -> int:
    """Warns about images that the test split and the training split both list, compared by real path (any
    spelling, link or the same split under two names); returns how many (`overlaps_train`)."""
    trained = {os.path.realpath(p) for p in train.paths}
    shared = [p for p in test.paths if os.path.realpath(p) in trained]
    if shared:
        same = " (data.test_split is the training split: set it to a held-out split)" if test is train else ""
        log.warning("%s lists %d images that the training split %s also lists (%s): test metrics on them measure "
                    "memory, not generalisation. Remove them from one of the two splits%s.", test.source, len(shared),
                    train.source, _summarise(shared), same)
    return len(shared)


def _class_names(dataset: _ImageListDataset, ids: list[int]) -> str:
    return _summarise([f"{c} {dataset.classes[c]!r}" if dataset.classes[c] != str(c) else str(c) for c in ids])


OTHER_DELIMITERS = ((";", "semicolon"), ("\t", "tab"), ("|", "pipe"))  # spreadsheet exports' other separators


def _read_table(path: str, columns: tuple[str, ...], hint: str = "") -> list[tuple[int, list[str]]]:
    """Read a UTF-8 csv file with a header; returns (file line, values of `columns`) for each data row.
    `hint` ends the missing-column error.

    Header names and values are stripped of surrounding whitespace, except class ids (`_class_id`); blank
    lines are skipped; a UTF-8 byte-order mark (spreadsheet exports) is ignored. A header naming a column
    twice is an error: which of the two holds the data would be a guess.
    """
    reader = csv.reader(io.StringIO(_read_utf8(path), newline=""))
    header = [name.strip() for name in next(reader, [])]
    if not header:
        raise DataError(f"{path} is empty; expected a header line such as {','.join(columns)}.")
    twice = sorted({name for name in header if name and header.count(name) > 1})
    if twice:
        raise DataError(f"{path}: the header names {', '.join(map(repr, twice))} more than once ({header}); "
                        "rename or remove the extra column so each name appears once.")
    absent = [c for c in columns if c not in header]
    if absent:
        other = next((name for d, name in OTHER_DELIMITERS if len(header) == 1 and d in header[0]), "")
        raise DataError(
            f"{path} has no column {', '.join(map(repr, absent))}; its header is {header}. "
            + (f"It is one field holding {other}s: the file seems {other}-separated, and csv files are read "
               "comma-separated; save it with commas. " if other else "")
            + f"The header must contain {', '.join(columns)} (extra columns and any order are fine){hint}."
        )
    index = [header.index(c) for c in columns]
    rows = []
    for values in reader:
        if not any(v.strip() for v in values):
            continue
        if len(values) <= max(index):
            raise DataError(
                f"{path}, line {reader.line_num}: {len(values)} fields, too few for the header {header}."
            )
        rows.append((reader.line_num, [values[i] if c == "class_id" else values[i].strip()
                                       for c, i in zip(columns, index, strict=True)]))
    return rows


def _read_utf8(path: str) -> str:
    """The text of a csv file; DataError naming the line and byte if it is not UTF-8 (a BOM is dropped)."""
    return read_utf8(path, DataError, "Csv files are read as UTF-8; save it as UTF-8, e.g. from Latin-1: iconv -f "
                     "latin1 -t utf-8 {path} > utf8.csv, then replace the file with utf8.csv.")


def _read_class_names(path: str) -> list[str]:
    """classid_classname.csv -> names indexed by class id; ids must be exactly 0..n-1."""
    names: dict[int, str] = {}
    for line, (value, name) in _read_table(path, ("class_id", "class_name")):
        class_id = _class_id(value)
        if class_id is None:
            raise DataError(f"{path}, line {line}: class_id {value!r} is not a class id: plain digits 0-9 "
                            f"({CLASS_ID_RULE}).")
        if class_id in names:
            raise DataError(f"{path}, line {line}: class_id {class_id} appears twice.")
        names[class_id] = name
    if sorted(names) != list(range(len(names))):
        missing = sorted(set(range(len(names))) - set(names))
        extra = sorted(set(names) - set(range(len(names))))
        raise DataError(f"{path}: class ids must be exactly 0..{len(names) - 1}, each once; missing "
                        f"{', '.join(map(str, missing))}, beyond {len(names) - 1}: {', '.join(map(str, extra))} (ids "
                        "start at 0 with no gaps: renumber them, in the image csv files too).")
    return [names[i] for i in range(len(names))]


def _class_id(value: str) -> int | None:
    """`value` as a class id, or None unless it is plain ASCII digits: int() would also read "0_2", "٢",
    "+2" and " 2" as a number, so a typo or a stray character would silently become another class."""
    return int(value) if _CLASS_ID.fullmatch(value) else None


def _missing_files(paths: list[str]) -> list[int]:
    """Indices of `paths` that are not existing files.

    Lists each parent folder once instead of stat-ing every file: for 10^5 images in 10^3
    folders on a network file system this is seconds instead of minutes.
    """
    listings: dict[str, set[str]] = {}
    missing = []
    for i, path in enumerate(paths):
        folder, name = os.path.split(path)
        if folder not in listings:
            try:
                with os.scandir(folder) as entries:
                    listings[folder] = {e.name for e in entries if e.is_file()}
            except OSError:  # a missing folder: everything in it is missing
                listings[folder] = set()
        if name not in listings[folder]:
            missing.append(i)
    return missing


def _find_images(top: str) -> list[str]:
    """Image files under `top`, recursively, sorted; hidden entries skipped. Linked folders are followed once:
    a folder already walked (by its real path) or one above `top` is skipped, so a link loop cannot list an
    image twice. Files without an image extension and skipped links are logged with the reason."""
    found, others, links = [], [], []
    walked = {os.path.realpath(top)}
    for folder, dirs, files in os.walk(top, followlinks=True):
        kept = []
        for d in (d for d in dirs if not d.startswith(".")):
            real = os.path.realpath(os.path.join(folder, d))
            if real in walked or os.path.realpath(top).startswith(real + os.sep):
                links.append(os.path.join(folder, d))
            else:
                walked.add(real)
                kept.append(d)
        dirs[:] = kept
        for f in (f for f in files if not f.startswith(".")):
            (found if has_image_extension(f) else others).append(os.path.join(folder, f))
    broken = [found[i] for i in _missing_files(found)]  # a link to nothing: it would fail mid-epoch
    if broken:
        raise DataError(f"{top}: {len(broken)} image name(s) are links to files that do not exist: "
                        f"{_summarise([f'{b} -> {os.readlink(b)}' for b in broken])}; fix or remove the links.")
    if links:
        log.warning("%s: skipped %d linked folders already walked or above it (a link loop, or a second link to one "
                    "folder, would list its images again): %s", top, len(links), _summarise(links))
    if others:
        log.info("%s: skipped %d files without an image extension (%s): %s", top, len(others),
                 " ".join(IMAGE_EXTENSIONS), _summarise(others))
    return sorted(found)


def _existing_dir(root: str) -> str:
    """`root` as an absolute path; DataError if it is not a folder."""
    path = os.path.abspath(root)
    if not os.path.isdir(path):
        raise DataError(f"dataset folder not found: {root} (resolved to {path}).")
    return path


def _subdirs(folder: str) -> list[str]:
    """Sorted names of the non-hidden subfolders of `folder`."""
    with os.scandir(folder) as entries:
        return sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))


def _summarise(items: list[str]) -> str:
    """The first few items joined, plus a count of the rest."""
    text = "; ".join(items[:_MAX_LISTED])
    return text + (f"; ... and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else "")
