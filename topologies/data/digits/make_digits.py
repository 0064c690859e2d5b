"""Write the handwritten-digits CSV shards in this folder from scikit-learn's bundled copy.

Splits the 1797 images of `sklearn.datasets.load_digits` (the test set of the UCI
"Optical Recognition of Handwritten Digits" data) with a fixed seed, stratified by
label, into 60% train, 20% validation and 20% test. The train part is cut into four
shards that are themselves stratified. Every file has the header
``pixel0,...,pixel63,label`` and integer values: pixels 0-16, labels 0-9.

scikit-learn is needed only to run this script, not to read the CSVs. Run::

    python topologies/data/digits/make_digits.py [--out DIR]

The output is deterministic for a given scikit-learn version.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import StratifiedKFold, train_test_split

SEED = 20240601
TRAIN_SHARDS = 4
HEADER = [f"pixel{i}" for i in range(64)] + ["label"]


def split(features: np.ndarray, labels: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Return {file stem: (features, labels)} for the train shards, validation and test."""
    rest_x, test_x, rest_y, test_y = train_test_split(
        features, labels, test_size=0.2, stratify=labels, random_state=SEED
    )
    # 25% of the remaining 80% is 20% of the whole.
    train_x, val_x, train_y, val_y = train_test_split(
        rest_x, rest_y, test_size=0.25, stratify=rest_y, random_state=SEED
    )
    parts = {}
    folds = StratifiedKFold(n_splits=TRAIN_SHARDS, shuffle=True, random_state=SEED)
    for shard, (_, index) in enumerate(folds.split(train_x, train_y)):
        parts[f"train-{shard}"] = (train_x[index], train_y[index])
    parts["validation"] = (val_x, val_y)
    parts["test"] = (test_x, test_y)
    return parts


def write_csv(path: Path, features: np.ndarray, labels: np.ndarray) -> None:
    with open(path, "w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file, lineterminator="\n")
        writer.writerow(HEADER)
        for row, label in zip(features.tolist(), labels.tolist(), strict=True):
            writer.writerow([*row, label])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent, help="output folder")
    args = parser.parse_args(argv)

    digits = load_digits()
    features = digits.data.astype(np.int64)
    if not np.array_equal(features, digits.data):
        raise SystemExit("load_digits returned non-integer pixels; this script expects integers 0-16")
    labels = digits.target.astype(np.int64)

    args.out.mkdir(parents=True, exist_ok=True)
    for stem, (x, y) in split(features, labels).items():
        write_csv(args.out / f"{stem}.csv", x, y)
        counts = np.bincount(y, minlength=10)
        print(f"{stem}.csv: {len(y)} rows, per label {counts.tolist()}")


if __name__ == "__main__":
    main()
