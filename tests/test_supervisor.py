"""Supervisor window logic against a real Redis, with an injected clock (no test sleeps)."""

from __future__ import annotations

import uuid

import pytest

from services.policy_state import SupervisorKeys
from services.quality_feed import QualityRecorder
from services.settings import SupervisorSettings
from services.supervisor import ActionRejected, SupervisorCore

SETTINGS = SupervisorSettings(interval_s=5.0, failed_windows=2, cooldown_s=30.0, step_weight=0.25, max_weight=0.5,
                              step_windows=1,
                              min_agreement=0.9, max_error_rate=0.05, max_p99_latency_s=1.0, min_samples=20)


class ManualClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def keys():
    return SupervisorKeys(prefix=f"test-{uuid.uuid4().hex[:8]}:")


@pytest.fixture
def clock():
    return ManualClock()


@pytest.fixture
def core(redis, keys, clock):
    return SupervisorCore(redis, SETTINGS, keys, clock=clock)


@pytest.fixture
def recorder(redis, keys):
    return QualityRecorder(redis, keys, flush_interval_s=0.5, prediction_ttl_s=60, replica="test")


async def send_window(recorder: QualityRecorder, version: int, rows: int = 40, agreed: int | None = None,
                      expert_errors: int = 0, latency_s: float = 0.01) -> None:
    """Record `rows` single-row requests answered by the mixture and their shadow comparisons."""
    for index in range(rows):
        reason = "expert_error" if index < expert_errors else "top_p"
        recorder.record_request(f"r-{uuid.uuid4().hex}", version, [reason], [0.9], [1], latency_s)
    recorder.record_shadow(version, rows, rows if agreed is None else agreed)
    await recorder.flush()


async def test_first_window_without_traffic_is_inconclusive(core):
    result = await core.tick()

    assert result["verdict"]["result"] == "inconclusive"
    assert result["state"] == "moe"
    assert result["event"] is None


async def test_healthy_window_passes_and_keeps_moe(core, recorder):
    await send_window(recorder, version=0)

    result = await core.tick()

    assert result["verdict"]["result"] == "pass"
    assert result["state"] == "moe"
    assert result["records"] == 1


async def test_two_failed_windows_move_to_dense(core, recorder, clock):
    await send_window(recorder, version=0, agreed=20)
    first = await core.tick()
    clock.advance(5.0)
    await send_window(recorder, version=0, agreed=20)
    second = await core.tick()

    assert first["verdict"]["result"] == "fail"
    assert first["state"] == "moe"
    assert second["state"] == "dense"
    assert second["moe_weight"] == 0.0
    event = second["event"]
    assert event["actor"] == "automatic"
    assert event["to"] == "dense"
    assert "2 failed window(s)" in event["reason"]
    assert "agreement 0.5 < 0.9" in event["reason"]
    assert event["metrics"]["agreement"]["value"] == 0.5


async def test_pass_between_failures_resets_count(core, recorder):
    await send_window(recorder, version=0, agreed=20)
    await core.tick()
    await send_window(recorder, version=0)
    await core.tick()
    await send_window(recorder, version=0, agreed=20)

    result = await core.tick()

    assert result["state"] == "moe"
    assert (await core.status())["failed_windows"] == 1


async def test_inconclusive_window_carries_samples(core, recorder):
    await send_window(recorder, version=0, rows=12)
    first = await core.tick()
    await send_window(recorder, version=0, rows=12)
    second = await core.tick()

    assert first["verdict"]["result"] == "inconclusive"
    assert "too few samples" in first["verdict"]["reason"]
    assert second["verdict"]["result"] == "pass"
    assert second["verdict"]["metrics"]["agreement"]["samples"] == 24


async def test_expert_errors_move_to_dense(core, recorder):
    for _ in range(2):
        await send_window(recorder, version=0, expert_errors=10)
        result = await core.tick()

    assert result["state"] == "dense"
    assert "error_rate" in result["event"]["reason"]


async def test_records_of_older_versions_are_ignored(core, recorder):
    await core.rollback()
    await core.promote()
    await send_window(recorder, version=0, agreed=0)

    result = await core.tick()

    assert result["policy_version"] == 2
    assert result["verdict"]["result"] == "inconclusive"
    assert result["records"] == 0


async def test_ramp_back_after_cooldown(core, recorder, clock):
    await core.rollback(reason="drill")
    clock.advance(29.0)
    waiting = await core.tick()
    clock.advance(1.0)
    first_step = await core.tick()
    await send_window(recorder, version=first_step["policy_version"])
    second_step = await core.tick()
    await send_window(recorder, version=second_step["policy_version"])
    promoted = await core.tick()

    assert waiting["state"] == "dense"
    assert first_step["state"] == "canary"
    assert first_step["moe_weight"] == 0.25
    assert "ramp-back starts at 25%" in first_step["event"]["reason"]
    assert second_step["state"] == "canary"
    assert second_step["moe_weight"] == 0.5
    assert promoted["state"] == "moe"
    assert promoted["moe_weight"] == 1.0
    assert [event["to"] for event in await core.events()] == ["dense", "canary", "canary", "moe"]


async def test_canary_step_needs_step_windows_passes(redis, keys, clock, recorder):
    core = SupervisorCore(redis, SETTINGS.model_copy(update={"step_windows": 2}), keys, clock=clock)
    await core.rollback()
    clock.advance(30.0)
    step = await core.tick()
    await send_window(recorder, version=step["policy_version"])
    first_pass = await core.tick()
    await send_window(recorder, version=step["policy_version"])
    second_pass = await core.tick()

    assert first_pass["moe_weight"] == 0.25
    assert first_pass["event"] is None
    assert second_pass["moe_weight"] == 0.5


async def test_failed_canary_step_returns_to_dense(core, recorder, clock):
    await core.rollback()
    clock.advance(30.0)
    step = await core.tick()
    await send_window(recorder, version=step["policy_version"], agreed=10)

    result = await core.tick()

    assert result["state"] == "dense"
    assert "1 failed window(s) in canary" in result["event"]["reason"]


async def test_inconclusive_canary_step_waits(core, recorder, clock):
    await core.rollback()
    clock.advance(30.0)
    step = await core.tick()
    await send_window(recorder, version=step["policy_version"], rows=5)

    result = await core.tick()

    assert result["state"] == "canary"
    assert result["moe_weight"] == 0.25
    assert result["event"] is None


async def test_paused_holds_automatic_changes(core, recorder):
    await core.pause()
    for _ in range(3):
        await send_window(recorder, version=1, agreed=0)
        result = await core.tick()

    assert result["state"] == "paused"
    assert result["verdict"]["result"] == "fail"
    assert result["moe_weight"] == 1.0


async def test_manual_rollback_while_paused_keeps_pause(core):
    await core.pause()
    await core.rollback()
    paused = await core.status()
    await core.resume()
    resumed = await core.status()

    assert paused["state"] == "paused"
    assert paused["moe_percent"] == 0.0
    assert paused["paused_from"] == "dense"
    assert resumed["state"] == "dense"


async def test_manual_actions_record_api_events(core):
    await core.set_weight(40.0)
    await core.promote(reason="fault fixed")

    events = await core.events()
    assert [(event["to"], event["moe_percent"], event["actor"]) for event in events] == [
        ("canary", 40.0, "api"), ("moe", 100.0, "api")]
    assert events[-1]["reason"] == "fault fixed"


async def test_repeated_promote_changes_nothing(core):
    result = await core.promote()

    assert result["changed"] is False
    assert await core.events() == []


async def test_resume_without_pause_is_rejected(core):
    with pytest.raises(ActionRejected, match="not paused"):
        await core.resume()


async def test_pause_twice_is_rejected(core):
    await core.pause()

    with pytest.raises(ActionRejected, match="already paused"):
        await core.pause()


async def test_restarted_core_keeps_state_and_events(redis, keys, clock, recorder):
    first = SupervisorCore(redis, SETTINGS, keys, clock=clock)
    await send_window(recorder, version=0, agreed=0)
    await first.tick()
    await send_window(recorder, version=0, agreed=0)
    await first.tick()

    restarted = SupervisorCore(redis, SETTINGS, keys, clock=clock)
    status = await restarted.status()
    events = await restarted.events()
    clock.advance(30.0)
    step = await restarted.tick()

    assert status["state"] == "dense"
    assert status["last_event"]["to"] == "dense"
    assert status["cooldown_remaining_s"] == 30.0
    assert [event["to"] for event in events] == ["dense"]
    assert step["state"] == "canary"


async def test_status_reports_window_against_thresholds(core, recorder):
    await send_window(recorder, version=0, agreed=30)
    await core.tick()

    status = await core.status()

    assert status["state"] == "moe"
    assert status["moe_percent"] == 100.0
    assert status["interval_s"] == 5.0
    assert status["window"]["agreement"] == {"value": 0.75, "threshold": 0.9, "ok": False, "samples": 40}
    assert status["verdict"] == "fail"
    assert status["traffic"]["requests"] == 40


def test_settings_reject_step_above_max_weight():
    with pytest.raises(ValueError, match=r"step_weight \(0.6\) must be <= max_weight \(0.5\)"):
        SupervisorSettings(step_weight=0.6, max_weight=0.5)


def test_settings_reject_flush_slower_than_interval():
    with pytest.raises(ValueError, match=r"flush_interval_s \(5.0 s\) must be shorter than interval_s"):
        SupervisorSettings(interval_s=5.0, flush_interval_s=5.0)


@pytest.mark.parametrize(("window", "message"), [
    (5.0, r"shadow_window_s \(5.0 s\) must be shorter than interval_s"),
    (float("inf"), "finite number"),
])
def test_settings_reject_shadow_window_beyond_interval(window, message):
    with pytest.raises(ValueError, match=message):
        SupervisorSettings(interval_s=5.0, shadow_window_s=window)
