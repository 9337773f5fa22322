"""lgdlm_ds/preemption.py in this process: the handlers record SIGUSR1 and SIGTERM, and the test hook
LGDLM_SIGNAL_AT fires on its step and rank only. tests/test_trainer.py stops real runs."""
from __future__ import annotations

import os
import signal

import pytest

from lgdlm_ds.config import ConfigError
from lgdlm_ds.preemption import HOOK, STOP_SIGNALS, StopSignal


@pytest.fixture
def restore_handlers():
    saved = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)


@pytest.mark.parametrize("sig", STOP_SIGNALS, ids=lambda s: s.name)
def test_stop_signal_records_the_signal(restore_handlers, sig):
    stop = StopSignal()
    assert not stop.requested(1)
    os.kill(os.getpid(), sig)
    assert stop.requested(2) and stop.received == sig


def test_signal_hook_fires_on_its_step_and_rank(restore_handlers, monkeypatch):
    monkeypatch.setenv(HOOK, "3:1")
    monkeypatch.setenv("RANK", "0")
    stop = StopSignal()
    assert not any(stop.requested(step) for step in range(1, 6))  # another rank's
    monkeypatch.setenv("RANK", "1")
    assert [stop.requested(step) for step in (1, 2, 3)] == [False, False, True]
    assert stop.received == signal.SIGUSR1
    monkeypatch.setenv(HOOK, "3")
    assert StopSignal().hook == (3, 0)
    monkeypatch.setenv(HOOK, "3:")
    with pytest.raises(ConfigError, match=f"{HOOK}='3:': expected STEP or STEP:RANK"):
        StopSignal()
