"""CUB-200-2011's annotation files -> the csv layout with object boxes (README "Data layouts").

    python -m sslfg.data.build.cub --cub data/CUB_200_2011 [--out data/CUB_200_2011]

Reads, from the CUB_200_2011 folder, `images.txt` (id path), `image_class_labels.txt` (id class,
1-based), `train_test_split.txt` (id is_training), `bounding_boxes.txt` (id x y width height, in
pixels) and `classes.txt` (class name), and writes to `--out` (default: the same folder, whose
`images/` the `dir` column is relative to):

    train_val.csv, test.csv    class_id,dir,x0,y0,x1,y1   (class_id 0-based, box = x, y, x + width, y + height)
    classid_classname.csv      class_id,class_name

Existing files are never overwritten (GLSim's split files may live there): remove them or choose
another `--out`. Use the result with `data.boxes=true` (configs/datasets/cub.yaml plus that key).
"""

from __future__ import annotations

import csv
from pathlib import Path

from sslfg.data.datasets import BOX_COLUMNS, CLASS_NAMES_FILE
from sslfg.data.images import DataError
from sslfg.entrypoints import CommandParser

SPLITS = {"train_val": "1", "test": "0"}  # output split -> is_training value


def _table(path: Path, fields: int) -> dict[str, list[str]]:
    """A CUB annotation file: one `<image or class id> <fields values>` line each -> {id: values}."""
    if not path.is_file():
        raise DataError(f"{path} not found; --cub must be the CUB_200_2011 folder (with images.txt, "
                        "image_class_labels.txt, train_test_split.txt, bounding_boxes.txt, classes.txt).")
    table: dict[str, list[str]] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        values = line.split(maxsplit=fields)
        if len(values) != fields + 1 or values[0] in table:
            raise DataError(f"{path}, line {number}: expected '<id> ' and {fields} values, each id once; got {line!r}.")
        table[values[0]] = values[1:]
    return table


def convert_cub(cub: str | Path, out: str | Path | None = None) -> list[Path]:
    """Write the csv layout with boxes for the CUB_200_2011 folder `cub` into `out` (default `cub`); returns the
    files written."""
    cub = Path(cub)
    out = Path(out) if out is not None else cub
    images = _table(cub / "images.txt", 1)
    labels = _table(cub / "image_class_labels.txt", 1)
    is_training = _table(cub / "train_test_split.txt", 1)
    boxes = _table(cub / "bounding_boxes.txt", 4)
    classes = _table(cub / "classes.txt", 1)
    for name, table in (("image_class_labels.txt", labels), ("train_test_split.txt", is_training),
                        ("bounding_boxes.txt", boxes)):
        if table.keys() != images.keys():
            odd = sorted(table.keys() ^ images.keys(), key=lambda k: int(k) if k.isdigit() else 0)
            raise DataError(f"{cub / name} and {cub / 'images.txt'} list different image ids ({', '.join(odd[:5])}"
                            f"{' ...' if len(odd) > 5 else ''}); use the files of one CUB_200_2011 release.")
    rows: dict[str, list[list[object]]] = {split: [] for split in SPLITS}
    for image_id, (path,) in images.items():
        class_id = labels[image_id][0]
        if class_id not in classes:
            raise DataError(f"{cub / 'image_class_labels.txt'}: image {image_id} has class {class_id}, which "
                            f"{cub / 'classes.txt'} does not list.")
        try:
            x, y, w, h = (float(v) for v in boxes[image_id])
        except ValueError:
            raise DataError(f"{cub / 'bounding_boxes.txt'}: image {image_id} has box {' '.join(boxes[image_id])!r}; "
                            "expected four numbers x y width height.") from None
        split = next((s for s, flag in SPLITS.items() if flag == is_training[image_id][0]), None)
        if split is None:
            raise DataError(f"{cub / 'train_test_split.txt'}: image {image_id} has is_training "
                            f"{is_training[image_id][0]!r}; expected 1 or 0.")
        rows[split].append([int(class_id) - 1, path, f"{x:g}", f"{y:g}", f"{x + w:g}", f"{y + h:g}"])
    tables = {f"{split}.csv": (["class_id", "dir", *BOX_COLUMNS], split_rows) for split, split_rows in rows.items()}
    tables[CLASS_NAMES_FILE] = (["class_id", "class_name"],
                                [[int(c) - 1, name] for c, (name,) in sorted(classes.items(), key=lambda i: int(i[0]))])
    targets = [out / name for name in tables]
    existing = [str(p) for p in targets if p.exists()]
    if existing:
        raise DataError(f"{', '.join(existing)} already exist; remove them or choose another --out.")
    out.mkdir(parents=True, exist_ok=True)
    for target, (header, table_rows) in zip(targets, tables.values(), strict=True):
        with open(target, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(header)
            writer.writerows(table_rows)
    return targets


def main(argv: list[str] | None = None) -> None:
    """Command line: convert, print the files written."""
    parser = CommandParser(prog="python -m sslfg.data.build.cub", description=__doc__.split("\n")[0])
    parser.add_argument("--cub", required=True, help="the CUB_200_2011 folder")
    parser.add_argument("--out", default=None, help="where to write the csv files (default: --cub)")
    args = parser.parse_args(argv)
    try:
        written = convert_cub(args.cub, args.out)
    except DataError as err:
        parser.exit(1, f"error: {err}\n")
    print("\n".join(map(str, written)))


if __name__ == "__main__":
    main()
