"""Datasets: loaders (MovieLens ratings.dat/ratings.csv, sequence files, aligned item/time files), leave-one-out
splits, padding-free jagged batches, the embedded MovieLens latest-small default and a synthetic long-sequence
generator. Conventions are documented in ``dataset.py`` and ``loaders.py``."""
from .dataset import (EvalExamples, JaggedBatch, LeaveOneOutSplit, SequenceDataset, eval_batches,  # noqa: F401
                      leave_one_out, make_jagged, training_batches, training_windows)
from .loaders import (DEFAULT_DATASET, load_aligned, load_dataset, load_ratings_csv, load_ratings_dat,  # noqa: F401
                      load_sequences)
from .synthetic import synthetic_dataset  # noqa: F401
