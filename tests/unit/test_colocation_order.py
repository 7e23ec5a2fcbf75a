"""Colocated engines and trainer ranks share GPUs: around a train step the engines sleep, then wake in two parts
(the weights, the policy push, then the KV cache), so the push never meets a full KV cache. Checked on the step's
own sequence (``rl.online.train_then_sync``) with a recording stand-in for the rollout group: no Ray, no engine."""

from __future__ import annotations

import pytest

from rl.metrics import PhaseTimer
from rl.online import train_then_sync


class RecordingRollout:
    """Records each ``call_all`` (the rollout group's broadcast to every engine) in a log it shares with the step."""

    def __init__(self, log: list):
        self.log = log

    def call_all(self, method: str, *args):
        self.log.append((method, *args))


def _step(colocated: bool, stats: dict) -> tuple[list, dict, PhaseTimer]:
    log: list = []
    timer = PhaseTimer()

    def train() -> dict:
        log.append(("train",))
        return stats

    returned = train_then_sync(RecordingRollout(log), colocated, timer, train=train,
                               publish=lambda s: log.append(("publish", s)))
    return log, returned, timer


def test_colocated_engines_sleep_through_training_and_wake_weights_then_publish_then_kv_cache():
    stats = {"updates_applied": 1}
    log, returned, timer = _step(colocated=True, stats=stats)
    assert log == [("sleep",), ("train",), ("wake_up", ["weights"]), ("publish", stats), ("wake_up", None)]
    assert returned is stats and set(timer.metrics()) == {"time_train", "time_weight_sync"}


def test_engines_on_their_own_gpus_are_never_put_to_sleep():
    stats = {"updates_applied": 1}
    log, returned, _ = _step(colocated=False, stats=stats)
    assert log == [("train",), ("publish", stats)] and returned is stats


@pytest.mark.parametrize("updates_applied, routes_per_batch, pushed", [(1, False, True), (0, False, False), (1, True, False)])
def test_the_step_pushes_the_policy_only_after_an_applied_update_unless_each_batch_pushes_its_own(
        updates_applied, routes_per_batch, pushed):
    """What ``publish`` is in a run: no update applied (a skipped step) leaves the engines' weights as they are; a policy
    routed per batch (Arrow) is pushed before each batch is sampled instead."""
    from types import SimpleNamespace

    from rl.online import OnlineRun

    pushes: list = []
    run = SimpleNamespace(policy=SimpleNamespace(routes_per_batch=routes_per_batch), _publish=lambda: pushes.append(1))
    OnlineRun._publish_update(run, {"updates_applied": updates_applied})
    assert pushes == ([1] if pushed else [])
