"""The augmentation manifest: which source subject each volume file comes from, and how it was made.

``manifest.csv`` (written by :func:`mr2ct.data.augment.augment_folder`) lists per file its subject, its
source, the augmentation and its parameters and a sha256; splits read it to keep every copy of a
subject on one side. Files it does not list get their subject from their stem (:data:`SUBJECT_PATTERN`).
"""

from __future__ import annotations

import csv
import hashlib
import re
from collections.abc import Sequence
from pathlib import Path

MANIFEST = "manifest.csv"
MANIFEST_FIELDS = ("file", "subject", "source", "augmentation", "params", "sha256")


#: a stem's subject id: the stem without the suffixes augment_folder appends (_rot03, _noise07)
SUBJECT_PATTERN = r"^(.+?)(?:_(?:rot|noise|aug)\d+)?$"


def subject_id(stem: str, pattern: str = SUBJECT_PATTERN) -> str:
    """Source-subject id of a file stem: the first group of ``pattern`` (the stem itself when it does not match)."""
    m = re.match(pattern, stem)
    return m.group(1) if m and m.groups() else stem


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(rows: Sequence[dict[str, str]], path: str | Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=MANIFEST_FIELDS)
        writer.writeheader()
        writer.writerows(rows)


def read_manifest(path: str | Path) -> list[dict[str, str]]:
    """Rows of a ``manifest.csv`` (needs at least the columns ``file`` and ``subject``)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if rows and not {"file", "subject"} <= set(rows[0]):
        raise ValueError(f"{path}: a manifest needs the columns 'file' and 'subject', got {list(rows[0])}")
    return rows
