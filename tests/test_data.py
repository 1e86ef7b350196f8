"""Dataset loaders, malformed-file errors, leave-one-out split, jagged batches, synthetic generator."""
from pathlib import Path

import numpy as np
import pytest

from malloc_kernels.data import (eval_batches, leave_one_out, load_aligned, load_dataset, load_ratings_csv,
                                 load_ratings_dat, load_sequences, make_jagged, synthetic_dataset,
                                 training_batches, training_windows)
from malloc_kernels.data.loaders import EMBEDDED_DIR


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# ---- formats ---------------------------------------------------------------------------------------------------
def test_ratings_dat_time_order_stable_ties_and_remap(tmp_path):
    p = _write(tmp_path / "ratings.dat",
               "7::200::5::30\n7::10::3::10\n7::5::4::30\n3::10::1::5\n3::200::2::5\n")
    ds = load_ratings_dat(p)
    # original ids 5, 10, 200 -> 1, 2, 3 (monotone); users sorted by id
    assert ds.n_items == 3 and ds.item_ids.tolist() == [-1, 5, 10, 200]
    assert ds.user_ids == [3, 7]
    assert ds.sequences[0].tolist() == [2, 3]            # equal timestamps keep file order
    assert ds.sequences[1].tolist() == [2, 3, 1]         # t=10 first, then the t=30 tie in file order (200, 5)
    assert ds.timestamps[1].tolist() == [10, 30, 30]
    assert ds.n_interactions == 5


def test_ratings_csv_any_column_order(tmp_path):
    p = _write(tmp_path / "r.csv", "timestamp,rating,movieId,userId\n20,4.5,9,1\n10,3.0,4,1\n15,1,9,2\n")
    ds = load_ratings_csv(p)
    assert ds.sequences[0].tolist() == [1, 2] and ds.timestamps[0].tolist() == [10, 20]
    assert ds.sequences[1].tolist() == [2]


def test_sequence_file_empty_and_single_item_users(tmp_path):
    p = _write(tmp_path / "seq.txt", "1 5 6 7 8\n2\n3 9\n\n4 5 9 6\n")
    ds = load_sequences(p)
    assert ds.num_empty_users == 1 and ds.n_users == 3 and ds.user_ids == [1, 3, 4]
    assert ds.timestamps is None
    assert [s.tolist() for s in ds.sequences] == [[1, 2, 3, 4], [5], [1, 5, 2]]
    split = leave_one_out(ds)
    # the single-item user has no eval example but stays in training; the others give one each
    assert split.test.users.tolist() == [0, 2] and split.valid.users.tolist() == [0, 2]
    assert [s.tolist() for s in split.train_sequences] == [[1, 2], [5], [1]]


def test_aligned_files(tmp_path):
    it = _write(tmp_path / "X_item_org.txt", "1 4 3 4\n2 7\n")
    tm = _write(tmp_path / "X_time_org.txt", "1 100 50 100\n2 9\n")
    ds = load_aligned(it, tm)
    assert ds.sequences[0].tolist() == [1, 2, 2]          # item 3 (t=50) first; ids 3,4,7 -> 1,2,3
    assert ds.timestamps[0].tolist() == [50, 100, 100]
    assert load_dataset(tmp_path).sequences[0].tolist() == [1, 2, 2]   # folder detection
    assert load_dataset(it).n_users == 2                                # file detection finds the partner


@pytest.mark.parametrize("name,text,line,needle", [
    ("ratings.dat", "1::2::3::4\n1::2::3\n", 2, "4 fields"),
    ("ratings.dat", "1::2::3::4\n\n1::x::3::4\n", 3, "MovieID"),
    ("ratings.dat", "1::2::abc::4\n", 1, "Rating"),
    ("ratings.csv", "userId,movieId,stars,timestamp\n1,2,3,4\n", 1, "header"),
    ("ratings.csv", "userId,movieId,rating,timestamp\n1,2,3,4\n1,2,3\n", 3, "fields"),
    ("ratings.csv", "userId,movieId,rating,timestamp\n1,2,3,4\n1,2,3,4.5\n", 3, "timestamp"),
    ("seq.txt", "1 2 3\n2 4 five\n", 2, "item id"),
    ("seq.txt", "1 2 3\n2 4\n1 5\n", 3, "appears again"),
    ("ratings.csv", "userId,movieId,rating,timestamp\n1,2,3,4\n1,2,good,4\n", 3, "rating must be a number"),
    ("ratings.csv", "userId,movieId,rating,timestamp\n", 2, "no ratings found"),            # header only
    ("ratings.csv", "", 1, "header must contain"),                                          # empty csv
    ("ratings.dat", "", 1, "no users found"),       # no '::' to detect: read as (empty) sequences
    ("seq.txt", "", 1, "no users found"),
])
def test_malformed_files_name_file_and_line(tmp_path, name, text, line, needle):
    p = _write(tmp_path / name, text)
    with pytest.raises(ValueError) as e:
        load_dataset(p)
    msg = str(e.value)
    assert msg.startswith(f"{p}:{line}: ") and needle in msg


@pytest.mark.parametrize("name,head", [("ratings.csv", b"userId,movieId,rating,timestamp\n1,2,3,4\n"),
                                       ("seq.txt", b"1 2 3\n")])
def test_non_utf8_bytes_raise_file_line_value_error(tmp_path, name, head):
    p = tmp_path / name
    p.write_bytes(head + b"2,\xff\xfe,3,4\n" if name.endswith(".csv") else head + b"2 4 \xe9\n")
    line = head.count(b"\n") + 1
    with pytest.raises(ValueError) as e:
        load_dataset(p)
    assert str(e.value).startswith(f"{p}:{line}: not UTF-8 text")


def test_csv_with_a_byte_order_mark_reads_its_header(tmp_path):
    p = tmp_path / "ratings.csv"
    p.write_bytes(b"\xef\xbb\xbfuserId,movieId,rating,timestamp\n7,5,4.0,20\n7,3,4.0,10\n")
    ds = load_ratings_csv(p)
    assert ds.user_ids == [7] and ds.sequences[0].tolist() == [1, 2] and ds.timestamps[0].tolist() == [10, 20]


def test_empty_ratings_files_name_file_and_line(tmp_path):
    p = _write(tmp_path / "ratings.dat", "\n\n")
    with pytest.raises(ValueError, match=rf"{p}:1: no ratings found"):
        load_ratings_dat(p)
    p = _write(tmp_path / "ratings.csv", "\ufeffuserId,movieId,rating,timestamp\n\n")   # BOM, header only
    with pytest.raises(ValueError, match=rf"{p}:2: no ratings found"):
        load_ratings_csv(p)


def test_ratings_dat_reads_latin1_bytes(tmp_path):
    # ratings.dat is latin-1 (MovieLens 1M): any byte decodes, and a number field with one is a file:line error
    p = tmp_path / "ratings.dat"
    p.write_bytes(b"1::2::3::4\n1::\xe92::3::4\n")
    with pytest.raises(ValueError, match=rf"{p}:2: MovieID"):
        load_dataset(p)


def test_aligned_mismatch_errors(tmp_path):
    it = _write(tmp_path / "a_item.txt", "1 4 3\n2 7\n")
    tm = _write(tmp_path / "a_time.txt", "1 100 50\n2 9 10\n")
    with pytest.raises(ValueError, match=rf"{tm}:2: .*2 timestamps but 1 items"):
        load_aligned(it, tm)
    _write(tm, "1 100 50\n3 9\n")
    with pytest.raises(ValueError, match=rf"{tm}:2: user '3' does not match"):
        load_aligned(it, tm)
    _write(tm, "1 100 50\n")
    with pytest.raises(ValueError, match=rf"{it}:2: "):
        load_aligned(it, tm)


def test_load_dataset_errors(tmp_path):
    with pytest.raises(ValueError, match="neither an embedded dataset"):
        load_dataset(tmp_path / "missing")
    _write(tmp_path / "a.txt", "1 2\n")
    _write(tmp_path / "b.txt", "1 2\n")
    with pytest.raises(ValueError, match="found no ratings.dat"):
        load_dataset(tmp_path)
    empty = _write(tmp_path / "e.dat", "\n")
    with pytest.raises(ValueError, match=rf"{empty}:1: no users found"):
        load_dataset(empty)


def test_embedded_default_dataset():
    ds = load_dataset()
    assert ds.name == "ml-latest-small"
    assert (ds.n_users, ds.n_items, ds.n_interactions) == (610, 9724, 100836)
    assert all(bool((np.diff(t) >= 0).all()) for t in ds.timestamps)
    readme = (EMBEDDED_DIR / "README.md").read_text()
    assert "GroupLens" in readme and "Harper" in readme
    assert (EMBEDDED_DIR / "ml-latest-small" / "README.txt").is_file()
    assert not (EMBEDDED_DIR / "ml-1m").exists()


# ---- split and batches ----------------------------------------------------------------------------------------
def _toy():
    seqs = [np.array([1, 2, 3, 4, 5]), np.array([6, 7]), np.array([8]), np.array([9, 10, 11])]
    ts = [np.arange(len(s)) * 10 for s in seqs]
    from malloc_kernels.data import SequenceDataset
    return SequenceDataset("toy", seqs, ts, 11, [1, 2, 3, 4], np.arange(-1, 11))


def test_leave_one_out():
    sp = _toy().split()
    assert sp.test.users.tolist() == [0, 3]
    assert sp.test.targets.tolist() == [5, 11] and sp.valid.targets.tolist() == [4, 10]
    assert [h.tolist() for h in sp.test.histories] == [[1, 2, 3, 4], [9, 10]]
    assert [h.tolist() for h in sp.valid.histories] == [[1, 2, 3], [9]]
    assert sp.test.target_timestamps.tolist() == [40, 20]
    assert [s.tolist() for s in sp.train_sequences] == [[1, 2, 3], [6, 7], [8], [9]]


@pytest.mark.parametrize("bucket", [0, 2])
def test_training_batches_are_jagged_and_complete(bucket):
    rng = np.random.default_rng(0)
    seqs = [rng.integers(1, 50, size=n) for n in [1, 2, 5, 9, 30, 3, 17, 4]]
    ts = [np.arange(len(s)) for s in seqs]
    seen = []
    for b in training_batches(seqs, ts, 3, 6, seed=1, bucket=bucket):
        assert b.items.shape == b.targets.shape == b.timestamps.shape
        for i, u in enumerate(b.users.tolist()):
            lo, hi = int(b.offsets[i]), int(b.offsets[i + 1])
            s = seqs[u][-7:]
            assert b.items[lo:hi].tolist() == s[:-1].tolist() and b.targets[lo:hi].tolist() == s[1:].tolist()
            seen.append(u)
    assert sorted(seen) == [1, 2, 3, 4, 5, 6, 7]     # user 0 (one item) has no training pair
    again = [b.users.tolist() for b in training_batches(seqs, ts, 3, 6, seed=1, bucket=bucket)]
    assert again == [b.users.tolist() for b in training_batches(seqs, ts, 3, 6, seed=1, bucket=bucket)]


@pytest.mark.parametrize("bucket", [0, 2])
def test_training_windows_all_cover_every_target_once(bucket):
    rng = np.random.default_rng(3)
    seqs = [rng.integers(1, 50, size=n) for n in [1, 2, 6, 7, 8, 13, 30, 0]]
    ts = [np.arange(len(s)) * 10 for s in seqs]
    w = training_windows(seqs, 6, "all")
    # user 4 (8 items): windows end at 8 and 2; user 3 (7 items) ends at 7 only (a 1-item rest has no pair)
    assert [tuple(r) for r in w if r[0] in (3, 4)] == [(3, 7), (4, 8), (4, 2)]
    targets = {u: [] for u in range(len(seqs))}
    n_batches = 0
    for b in training_batches(seqs, ts, 3, 6, seed=2, bucket=bucket, windows="all"):
        n_batches += 1
        for i, u in enumerate(b.users.tolist()):
            lo, hi = int(b.offsets[i]), int(b.offsets[i + 1])
            assert 1 <= hi - lo <= 6
            items, tg, t = b.items[lo:hi].numpy(), b.targets[lo:hi].numpy(), b.timestamps[lo:hi].numpy()
            start = int(t[0]) // 10  # the window's first item (timestamps = 10 * index)
            assert items.tolist() == seqs[u][start:start + hi - lo].tolist()
            assert tg.tolist() == seqs[u][start + 1:start + 1 + hi - lo].tolist()
            targets[u] += list(range(start + 1, start + 1 + hi - lo))
    for u, s in enumerate(seqs):  # every item but the first is a target exactly once
        assert sorted(targets[u]) == list(range(1, len(s))), u
    assert n_batches == -(-len(w) // 3)
    # "last" is the original one-window-per-user recipe
    last = training_windows(seqs, 6, "last")
    assert last.tolist() == [[u, len(s)] for u, s in enumerate(seqs) if len(s) >= 2]
    with pytest.raises(ValueError, match="windows"):
        training_windows(seqs, 6, "every")
    with pytest.raises(ValueError, match="max_len"):
        training_windows(seqs, 0)


def test_eval_batches_and_padding():
    sp = _toy().split()
    (b,) = list(eval_batches(sp.test, 8, 3))
    assert b.offsets.tolist() == [0, 3, 5] and b.items.tolist() == [2, 3, 4, 9, 10]
    assert b.targets.tolist() == [5, 11]
    items, ts, lengths = b.to_padded()
    assert items.tolist() == [[2, 3, 4], [9, 10, 0]] and lengths.tolist() == [3, 2]
    assert ts.tolist() == [[10, 20, 30], [0, 10, 0]]
    e = make_jagged([np.array([], dtype=np.int64), np.array([3])])
    assert e.offsets.tolist() == [0, 0, 1] and e.lengths.tolist() == [0, 1]
    with pytest.raises(ValueError, match="batch_size"):
        next(eval_batches(sp.test, 0, 3))


def test_synthetic_generator():
    a = synthetic_dataset(6, 300, min_len=8, max_len=16384, n_topics=8, seed=3)
    b = synthetic_dataset(6, 300, min_len=8, max_len=16384, n_topics=8, seed=3)
    assert all((x == y).all() for x, y in zip(a.sequences, b.sequences))
    assert all((x == y).all() for x, y in zip(a.timestamps, b.timestamps))
    lens = [len(s) for s in a.sequences]
    assert min(lens) >= 8 and max(lens) <= 16384
    assert all(bool((np.diff(t) >= 0).all()) for t in a.timestamps)
    assert all(int(s.min()) >= 1 and int(s.max()) <= 300 for s in a.sequences)
    long = synthetic_dataset(1, 500, min_len=16384, max_len=16384, seed=0)
    s = long.sequences[0]
    assert len(s) == 16384
    # drifting interests: the item mix of the first and last thousand interactions differs
    first, last = set(s[:1000].tolist()), set(s[-1000:].tolist())
    assert len(first & last) < 0.8 * min(len(first), len(last))
    c = synthetic_dataset(6, 300, min_len=8, max_len=64, n_topics=8, seed=4)
    assert any((x.shape != y.shape) or (x != y).any() for x, y in zip(a.sequences, c.sequences))
    with pytest.raises(ValueError, match="max_len"):
        synthetic_dataset(2, 10, min_len=5, max_len=4)
    with pytest.raises(ValueError, match="n_topics"):
        synthetic_dataset(2, 10, n_topics=20)
    # fewer topics than the 2-4 interests a user draws (used to fail sampling interests without replacement)
    for topics in (1, 2, 3):
        few = synthetic_dataset(30, 40, min_len=5, max_len=20, n_topics=topics, seed=topics)
        assert len(few.sequences) == 30 and all(int(s.max()) <= 40 for s in few.sequences)


# ---- real data (../shared/data) -------------------------------------------------------------------------------
@pytest.mark.parametrize("folder,users,items,inter,has_time", [
    ("ml-1m", 6040, 3706, 1000209, False),
    ("yelp", 30431, 20033, 316354, True),
    ("lastfm", 1090, 3646, 52551, False),
    ("ml-latest-small", 610, 9724, 100836, True),
])
def test_shared_datasets(data_dir, folder, users, items, inter, has_time):
    path = data_dir / folder
    if not path.is_dir():
        pytest.skip(f"{path} is absent")
    ds = load_dataset(path)
    assert (ds.n_users, ds.n_items, ds.n_interactions, ds.has_timestamps) == (users, items, inter, has_time)
    sp = ds.split()
    assert len(sp.test) == sum(len(s) >= 3 for s in ds.sequences)
    if folder == "ml-1m":
        # compact ids are kept as they are (remapping is monotone)
        assert ds.item_ids[1:].tolist() == list(range(1, 3707))
    if folder == "ml-latest-small":
        emb = load_dataset("ml-latest-small")
        assert ds.fingerprint() == emb.fingerprint()
