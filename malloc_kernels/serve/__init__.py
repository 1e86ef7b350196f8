"""Online serving over a store: ``malloc-serve replay`` replays a dataset's interactions in time order through
``malloc_kernels.store`` (get -> serve over the cache -> rank -> append -> put) with N workers."""
from .replay import ReplayConfig, Replayer, replay_events  # noqa: F401
