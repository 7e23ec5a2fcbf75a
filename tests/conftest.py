"""Shared fixtures. Expensive things (the tiny model, Ray, engines) are built once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model_root() -> Path:
    """A tiny model + task built with the real builder, small enough to SFT in seconds.

    Cached under .cache/test-models (gitignored), so local re-runs skip the build.
    """
    from rl.tasks.tiny_model import TinyModelSpec, build_tiny_model

    spec = TinyModelSpec(
        hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128,  # head_dim 32: vLLM CPU's smallest
        sft_steps=150, n_train_rows=1024, n_test_rows=64,
    )
    return Path(build_tiny_model(spec, cache_dir=ROOT / ".cache" / "test-models", log=lambda s: None))


@pytest.fixture(scope="session")
def ray_session():
    import ray

    if not ray.is_initialized():
        # A private local cluster: never attach to another process's Ray.
        ray.init(address="local", num_cpus=4, include_dashboard=False, configure_logging=False, log_to_driver=False)
    yield
    ray.shutdown()
