#!/usr/bin/env python3
"""Convert the 8x8 handwritten digits shipped inside scikit-learn into data/digits/digits.txt.

Run ONCE (the output is committed; the library and the examples never need Python):

    benchmarks/compare/.venv/bin/python benchmarks/compare/export_digits.py

Format (read by examples/common/digits.hpp):

    # comment lines
    diffgrad-digits 1 <count> <rows> <cols>
    <label> <rows*cols pixel characters>        one image per line, row-major

Each pixel is an integer 0..16 written as ONE character of "0123456789abcdefg" (base 17), so an
image is a 64-character word. The order is scikit-learn's (load_digits), unchanged.
"""
import argparse
import pathlib

import sklearn
from sklearn.datasets import load_digits

ALPHABET = "0123456789abcdefg"


def main():
    root = pathlib.Path(__file__).resolve().parents[2]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(root / "data" / "digits" / "digits.txt"))
    args = parser.parse_args()

    digits = load_digits()
    images, labels = digits.images.astype(int), digits.target.astype(int)
    count, rows, cols = images.shape
    assert images.min() >= 0 and images.max() <= 16
    lines = [
        "# The 8x8 handwritten digits of scikit-learn (sklearn.datasets.load_digits, scikit-learn "
        f"{sklearn.__version__}),",
        "# a copy of the test set of the UCI 'Optical Recognition of Handwritten Digits' data set "
        "(E. Alpaydin, C. Kaynak, 1998).",
        "# License and provenance: data/digits/README.md. Written by benchmarks/compare/export_digits.py.",
        "# Per line: the label, then the 64 pixels (0..16, one base-17 character each, row-major).",
        f"diffgrad-digits 1 {count} {rows} {cols}",
    ]
    for image, label in zip(images, labels):
        lines.append(f"{label} " + "".join(ALPHABET[v] for v in image.reshape(-1)))
    pathlib.Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {count} images of {rows}x{cols} to {args.out}")


if __name__ == "__main__":
    main()
