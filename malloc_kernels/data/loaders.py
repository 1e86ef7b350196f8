"""Dataset loaders: MovieLens ``ratings.dat`` / ``ratings.csv``, one-user-per-line sequences, aligned item/time files.

Formats (shared/data/README.md):

* ``ratings.dat`` (MovieLens 1M/10M): ``UserID::MovieID::Rating::Timestamp`` per line.
* ``ratings.csv`` (MovieLens latest): header ``userId,movieId,rating,timestamp`` then one rating per line.
* sequence file (``sequences.txt``, ``*_item_*.txt``): ``user item item ...`` per line, items in time order, no
  timestamps. A line holding only the user id is an empty user.
* aligned item/time files (Yelp): ``X_item_Y.txt`` = ``user item ...`` and ``X_time_Y.txt`` = ``user t ...``, the same
  users in the same order with one (integer, seconds) timestamp per item.

Every interaction counts as implicit feedback (ratings are ignored). Malformed input raises ``ValueError`` whose
message starts with ``"<file>:<line>: "``. See ``dataset.py`` for id remapping, ordering and split conventions.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, List, Optional, Union

import numpy as np

from .dataset import SequenceDataset

EMBEDDED_DIR = Path(__file__).resolve().parent / "embedded"
EMBEDDED = {"ml-latest-small": EMBEDDED_DIR / "ml-latest-small" / "ratings.csv"}
DEFAULT_DATASET = "ml-latest-small"

PathLike = Union[str, os.PathLike]


def _err(path, lineno, msg) -> ValueError:
    return ValueError(f"{path}:{lineno}: {msg}")


def _utf8_lines(path: Path):
    """(lineno, text) of a UTF-8 file (a leading byte-order mark is dropped); bytes that are not UTF-8 raise the
    loaders' ``file:line`` ValueError instead of a UnicodeDecodeError with no line."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            try:
                yield lineno, raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise _err(path, lineno, f"not UTF-8 text (byte {raw[e.start]:#04x} at column {e.start + 1})") \
                    from None


def _int(tok: str, path, lineno, what: str) -> int:
    try:
        return int(tok)
    except ValueError:
        raise _err(path, lineno, f"{what} must be an integer, got {tok!r}") from None


def _build(name: str, source, per_user: Dict[object, list], with_time: bool, num_empty: int) -> SequenceDataset:
    """per_user: user -> list of (timestamp, item) in file order. Stable time sort, compact item ids."""
    users = sorted(per_user, key=lambda u: (0, u) if isinstance(u, int) else (1, str(u)))
    all_items = sorted({it for u in users for _, it in per_user[u]})
    remap = {it: i + 1 for i, it in enumerate(all_items)}
    seqs, tss, kept_users = [], [] if with_time else None, []
    for u in users:
        events = per_user[u]
        if not events:
            num_empty += 1
            continue
        if with_time:
            # Python's sort is stable: equal timestamps keep their order in the file.
            events = sorted(events, key=lambda e: e[0])
            tss.append(np.fromiter((t for t, _ in events), dtype=np.int64, count=len(events)))
        seqs.append(np.fromiter((remap[it] for _, it in events), dtype=np.int64, count=len(events)))
        kept_users.append(u)
    item_ids = np.asarray([-1] + list(all_items), dtype=np.int64)
    return SequenceDataset(name=name, sequences=seqs, timestamps=tss, n_items=len(all_items), user_ids=kept_users,
                           item_ids=item_ids, num_empty_users=num_empty, source=str(source))


def load_ratings_dat(path: PathLike, name: Optional[str] = None) -> SequenceDataset:
    """MovieLens ``UserID::MovieID::Rating::Timestamp`` file -> time-ordered sequences (with timestamps)."""
    path = Path(path)
    per_user: Dict[int, list] = {}
    with open(path, "r", encoding="latin-1") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            parts = line.split("::")
            if len(parts) != 4:
                raise _err(path, lineno, f"expected 'UserID::MovieID::Rating::Timestamp' (4 fields), got {line!r}")
            u = _int(parts[0], path, lineno, "UserID")
            it = _int(parts[1], path, lineno, "MovieID")
            try:
                float(parts[2])
            except ValueError:
                raise _err(path, lineno, f"Rating must be a number, got {parts[2]!r}") from None
            t = _int(parts[3], path, lineno, "Timestamp")
            per_user.setdefault(u, []).append((t, it))
    if not per_user:
        raise _err(path, 1, "no ratings found")
    return _build(name or path.parent.name, path, per_user, True, 0)


_CSV_COLUMNS = ("userId", "movieId", "rating", "timestamp")


def load_ratings_csv(path: PathLike, name: Optional[str] = None) -> SequenceDataset:
    """MovieLens ``userId,movieId,rating,timestamp`` CSV (header required, any column order, extra columns ok)."""
    path = Path(path)
    per_user: Dict[int, list] = {}
    lines = _utf8_lines(path)
    header = next(lines, (1, ""))[1].strip().split(",")
    missing = [c for c in _CSV_COLUMNS if c not in header]
    if missing:
        raise _err(path, 1, f"header must contain {','.join(_CSV_COLUMNS)}; missing {missing}, got {header}")
    iu, ii, ir, it_ = (header.index(c) for c in _CSV_COLUMNS)
    ncol = len(header)
    for lineno, line in lines:
        line = line.strip()
        if not line:
            continue
        parts = line.split(",")
        if len(parts) != ncol:
            raise _err(path, lineno, f"expected {ncol} comma-separated fields, got {len(parts)}: {line!r}")
        u = _int(parts[iu], path, lineno, "userId")
        it = _int(parts[ii], path, lineno, "movieId")
        try:
            float(parts[ir])
        except ValueError:
            raise _err(path, lineno, f"rating must be a number, got {parts[ir]!r}") from None
        t = _int(parts[it_], path, lineno, "timestamp")
        per_user.setdefault(u, []).append((t, it))
    if not per_user:
        raise _err(path, 2, "no ratings found")
    return _build(name or path.parent.name, path, per_user, True, 0)


def _read_lines(path: Path, what: str) -> List[tuple]:
    """[(lineno, user_token, [int tokens])] of a ``user tok tok ...`` file; blank lines are skipped."""
    rows, seen = [], {}
    for lineno, line in _utf8_lines(path):
        toks = line.split()
        if not toks:
            continue
        user = toks[0]
        if user in seen:
            raise _err(path, lineno, f"user {user!r} appears again (first on line {seen[user]}); "
                                     f"one line per user is required")
        seen[user] = lineno
        vals = [_int(t, path, lineno, what) for t in toks[1:]]
        rows.append((lineno, user, vals))
    if not rows:
        raise _err(path, 1, "no users found")
    return rows


def _user_key(tok: str):
    try:
        return int(tok)
    except ValueError:
        return tok


def load_sequences(path: PathLike, name: Optional[str] = None) -> SequenceDataset:
    """One-user-per-line ``user item item ...`` file (items already in time order; no timestamps)."""
    path = Path(path)
    per_user = {}
    for _, user, items in _read_lines(path, "item id"):
        per_user[_user_key(user)] = [(0, it) for it in items]
    return _build(name or path.parent.name, path, per_user, False, 0)


def load_aligned(item_path: PathLike, time_path: PathLike, name: Optional[str] = None) -> SequenceDataset:
    """Aligned ``user item ...`` / ``user t ...`` files (Yelp): same users, same order, one timestamp per item."""
    item_path, time_path = Path(item_path), Path(time_path)
    items = _read_lines(item_path, "item id")
    times = _read_lines(time_path, "timestamp")
    if len(items) != len(times):
        bad = min(len(items), len(times))
        longer = (item_path, items) if len(items) > len(times) else (time_path, times)
        raise _err(longer[0], longer[1][bad][0], f"{item_path.name} has {len(items)} users but {time_path.name} "
                                                 f"has {len(times)}")
    per_user = {}
    for (li, ui, its), (lt, ut, ts) in zip(items, times):
        if ui != ut:
            raise _err(time_path, lt, f"user {ut!r} does not match user {ui!r} on {item_path}:{li}")
        if len(its) != len(ts):
            raise _err(time_path, lt, f"user {ut!r} has {len(ts)} timestamps but {len(its)} items on "
                                      f"{item_path}:{li}")
        per_user[_user_key(ui)] = list(zip(ts, its))
    return _build(name or item_path.parent.name, item_path, per_user, True, 0)


def _aligned_partner(path: Path) -> Optional[Path]:
    if "_item" in path.name:
        cand = path.with_name(path.name.replace("_item", "_time", 1))
        if cand.is_file():
            return cand
    return None


def load_dataset(path_or_name: PathLike = DEFAULT_DATASET, *, time_path: Optional[PathLike] = None,
                 name: Optional[str] = None) -> SequenceDataset:
    """Load a dataset, detecting its format (see ``_load_dataset``); a file that is not text (e.g. binary) raises
    ``ValueError`` naming it."""
    try:
        return _load_dataset(path_or_name, time_path=time_path, name=name)
    except UnicodeDecodeError as e:
        where = path_or_name if time_path is None else f"{path_or_name} / {time_path}"
        raise ValueError(f"{where}: not a text dataset file ({e.encoding} decoding failed at byte {e.start}: "
                         f"{e.reason})") from None
    except IsADirectoryError as e:
        raise ValueError(f"{e.filename}: is a directory, expected a dataset file") from None


def _load_dataset(path_or_name: PathLike = DEFAULT_DATASET, *, time_path: Optional[PathLike] = None,
                  name: Optional[str] = None) -> SequenceDataset:
    """Load a dataset, detecting its format.

    ``path_or_name``: ``"ml-latest-small"`` (the embedded default), a file (``*.dat`` with ``::`` -> ratings.dat,
    ``*.csv`` -> ratings CSV, ``*_item*.txt`` with a sibling ``*_time*.txt`` -> aligned files, other text ->
    sequences) or a folder containing ``ratings.dat``, ``ratings.csv``, an ``*_item*.txt``/``*_time*.txt`` pair or a
    single sequence ``*.txt`` (``sequences.txt`` preferred). ``time_path`` forces the aligned format.
    """
    if isinstance(path_or_name, str) and path_or_name in EMBEDDED:
        return load_ratings_csv(EMBEDDED[path_or_name], name=name or path_or_name)
    path = Path(path_or_name).expanduser()
    if time_path is not None:
        return load_aligned(path, time_path, name=name)
    if path.is_dir():
        for fname, loader in (("ratings.dat", load_ratings_dat), ("ratings.csv", load_ratings_csv)):
            if (path / fname).is_file():
                return loader(path / fname, name=name or path.name)
        pairs = [(p, _aligned_partner(p)) for p in sorted(path.glob("*_item*.txt"))]
        pairs = [(p, q) for p, q in pairs if q is not None]
        if pairs:
            return load_aligned(pairs[0][0], pairs[0][1], name=name or path.name)
        if (path / "sequences.txt").is_file():
            return load_sequences(path / "sequences.txt", name=name or path.name)
        txts = sorted(path.glob("*.txt"))
        if len(txts) == 1:
            return load_sequences(txts[0], name=name or path.name)
        raise ValueError(f"data folder {path}: found no ratings.dat, ratings.csv, *_item*.txt/*_time*.txt pair or "
                         f"single sequence .txt file (found {[p.name for p in txts]})")
    if path.is_file():
        if path.suffix == ".csv":
            return load_ratings_csv(path, name=name)
        with open(path, "r", encoding="latin-1") as f:
            first = f.readline()
        if "::" in first:
            return load_ratings_dat(path, name=name)
        partner = _aligned_partner(path)
        if partner is not None:
            return load_aligned(path, partner, name=name)
        return load_sequences(path, name=name)
    raise ValueError(f"dataset {str(path_or_name)!r} is neither an embedded dataset ({sorted(EMBEDDED)}) nor an "
                     f"existing file or folder")
