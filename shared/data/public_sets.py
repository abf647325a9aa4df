"""Loaders of the public research data sets the harness evaluates on (read from ../shared/data,
never copied into the repository).

- MovieLens-100K: `u.data` (user, item, rating, timestamp; tab separated) with `u.item` as the
  catalog (title; first genre as category; all genres, and the release's year and decade, as tags).
- Amazon sequence format (S3Rec): `user item item ...` per line in time order, with an item ->
  attribute-ids JSON as the catalog.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from shared.data.fields import LogBuilder, first_undecodable_line, parse_timestamp, require_text, utf8_lines
from shared.data.schema import AdCatalog, Dataset, DataValidationError, Event

MOVIELENS_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
    "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi",
    "Thriller", "War", "Western",
)

MONTHS = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")


# ------------------------------------------------------------------ MovieLens-100K
def _release_tags(path: str, line: int, text: str) -> tuple[str, ...]:
    """("year-1995", "decade-1990s") from u.item's release date; () where it gives none."""
    if not text.strip():
        return ()
    parts = text.strip().split("-")
    # the English month names u.item uses, whatever the machine's locale (strptime's %b follows it)
    if len(parts) != 3 or not parts[0].isdigit() or parts[1].lower() not in MONTHS or not (parts[2].isdigit() and len(parts[2]) == 4):
        raise DataValidationError(path, line, "release_date", f"{text.strip()!r} is not a date like 01-Jan-1995")
    year = int(parts[2])
    return f"year-{year}", f"decade-{year // 10 * 10}s"


def load_movielens_catalog(folder: str | Path) -> AdCatalog:
    """`u.item`: movie id, title, the first of its genres as the category, and as tags its genres
    and, where `u.item` gives a release date (dd-Mon-yyyy), its year and decade (public, as a
    product's launch date is: what was new when a user chose is part of their taste)."""
    item_path = Path(folder) / "u.item"
    if not item_path.is_file():
        raise DataValidationError(str(item_path), None, None, "MovieLens-100K file does not exist")
    ids, categories, titles, tags = [], [], [], []
    with item_path.open(encoding="latin-1") as handle:
        for line, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            fields = raw.rstrip("\n").split("|")
            if len(fields) != 5 + len(MOVIELENS_GENRES):
                raise DataValidationError(str(item_path), line, None, f"has {len(fields)} fields, expected {5 + len(MOVIELENS_GENRES)}")
            ids.append(require_text(str(item_path), line, "movie_id", fields[0]))
            titles.append(fields[1].strip() or None)
            flags = fields[5:]
            if any(f not in ("0", "1") for f in flags):
                raise DataValidationError(str(item_path), line, "genre", "genre flags must be 0 or 1")
            genres = [g for g, f in zip(MOVIELENS_GENRES, flags) if f == "1"]
            categories.append(genres[0] if genres else "unknown")
            tags.append((*(genres or ["unknown"]), *_release_tags(str(item_path), line, fields[2])))
    return AdCatalog(tuple(ids), tuple(categories), (None,) * len(ids), tuple(titles), source=str(item_path), tags=tuple(tags))


def load_movielens_100k(folder: str | Path, strict: bool = True) -> Dataset:
    """`u.data` as the log (every rating is a positive interaction), `u.item` as the catalog."""
    catalog = load_movielens_catalog(folder)
    data_path = Path(folder) / "u.data"
    if not data_path.is_file():
        raise DataValidationError(str(data_path), None, None, "MovieLens-100K file does not exist")
    builder = LogBuilder(str(data_path), catalog, strict)
    for line, raw in utf8_lines(data_path):
        if not raw.strip():
            continue
        fields = raw.rstrip("\n").split("\t")
        if len(fields) != 4:
            raise DataValidationError(str(data_path), line, None, f"has {len(fields)} fields, expected 4 (user, item, rating, timestamp)")
        rating = require_text(str(data_path), line, "rating", fields[2])
        if rating not in ("1", "2", "3", "4", "5"):
            raise DataValidationError(str(data_path), line, "rating", f"{rating!r} is not 1-5")
        builder.add(
            line,
            user=require_text(str(data_path), line, "user_id", fields[0]),
            ad_id=require_text(str(data_path), line, "item_id", fields[1]),
            timestamp=parse_timestamp(str(data_path), line, fields[3]),
            event=Event.CLICK,
        )
    return Dataset("movielens-100k", catalog, builder.build())


# ------------------------------------------------------------------ Amazon sequences
def load_amazon_catalog(attributes_path: str | Path) -> AdCatalog:
    """Item id -> attribute ids (category and brand, unnamed). An item's category is its most
    common attribute across the catalog (the coarsest grouping); all its attributes are its tags."""
    attributes_path = Path(attributes_path)
    if not attributes_path.is_file():
        raise DataValidationError(str(attributes_path), None, None, "attribute file does not exist")
    try:
        attributes = json.loads(attributes_path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise DataValidationError(str(attributes_path), first_undecodable_line(attributes_path), None, "is not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise DataValidationError(str(attributes_path), exc.lineno, None, f"is not valid JSON: {exc.msg}") from exc
    if not isinstance(attributes, dict) or not attributes:
        raise DataValidationError(str(attributes_path), 1, None, "must be a non-empty object item id -> [attribute ids]")
    for item, attrs in attributes.items():
        if not isinstance(attrs, list) or not all(isinstance(a, int) for a in attrs):
            raise DataValidationError(str(attributes_path), None, f"{item}", "attributes must be a list of integers")
    frequency = Counter(a for attrs in attributes.values() for a in attrs)
    ids = tuple(sorted(attributes, key=lambda s: (len(s), s)))
    categories = tuple(
        f"attr-{max(attributes[i], key=lambda a: (frequency[a], -a))}" if attributes[i] else "unknown" for i in ids
    )
    tags = tuple(tuple(f"attr-{a}" for a in attributes[i]) or ("unknown",) for i in ids)
    return AdCatalog(ids, categories, (None,) * len(ids), (None,) * len(ids), source=str(attributes_path), tags=tags)


def load_amazon_sequences(sequence_path: str | Path, attributes_path: str | Path, strict: bool = True) -> Dataset:
    """S3Rec's format: one line per user, `user item item ...` in time order; the position in
    the sequence serves as the timestamp."""
    catalog = load_amazon_catalog(attributes_path)
    sequence_path = Path(sequence_path)
    if not sequence_path.is_file():
        raise DataValidationError(str(sequence_path), None, None, "sequence file does not exist")
    builder = LogBuilder(str(sequence_path), catalog, strict)
    for line, raw in utf8_lines(sequence_path):
        fields = raw.split()
        if not fields:
            continue
        if len(fields) < 2:
            raise DataValidationError(str(sequence_path), line, "items", "a user line needs at least one item")
        for position, item in enumerate(fields[1:]):
            builder.add(line, user=fields[0], ad_id=item, timestamp=position, event=Event.CLICK)
    return Dataset("amazon-seq", catalog, builder.build())
