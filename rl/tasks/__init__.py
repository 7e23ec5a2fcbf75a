"""The embedded default: a synthetic verifiable task and a tiny model built and cached locally."""

from rl.tasks.arithmetic import make_problems
from rl.tasks.cache import default_cache_dir
from rl.tasks.tiny_model import TinyModelSpec, build_tiny_model

__all__ = ["TinyModelSpec", "build_tiny_model", "default_cache_dir", "make_problems"]
