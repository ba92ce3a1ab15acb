"""train/profiling.py: which steps the trace window covers, that it waits for the last
step before stopping, process 0 only, and its config checks. (A real trace of a real
run is checked in test_train.py's sharded smoke run.)"""
from __future__ import annotations

import jax
import ml_collections
import pytest

from tinyclip_jax.train import profiling


def config(start, num):
  return ml_collections.ConfigDict({"profile": {"start_step": start, "num_steps": num}})


@pytest.fixture
def events(monkeypatch):
  log = []
  monkeypatch.setattr(jax.profiler, "start_trace", lambda d: log.append(("start", d)))
  monkeypatch.setattr(jax.profiler, "stop_trace", lambda: log.append(("stop",)))
  monkeypatch.setattr(jax, "block_until_ready", lambda x: log.append(("block", x)))
  return log


def drive(window, steps, log):
  for step in steps:
    window.before(step)
    log.append(("step", step))
    window.after(step, f"outputs {step}")


def test_window_covers_its_steps_and_blocks_before_stopping(events):
  window = profiling.StepWindow(config(3, 2), "/run")
  drive(window, range(1, 7), events)
  window.close("state")
  assert events == [("step", 1), ("step", 2), ("start", "/run/profile"), ("step", 3), ("step", 4),
                    ("block", "outputs 4"), ("stop",), ("step", 5), ("step", 6)]


def test_window_past_the_end_stops_at_close(events):
  window = profiling.StepWindow(config(5, 10), "/run")
  drive(window, range(1, 7), events)
  window.close("state")
  assert events == [("step", s) for s in range(1, 5)] + [("start", "/run/profile"), ("step", 5),
                                                         ("step", 6), ("block", "state"), ("stop",)]


def test_resumed_inside_the_window_traces_the_rest(events):
  window = profiling.StepWindow(config(3, 4), "/run")
  drive(window, range(5, 8), events)
  assert events == [("start", "/run/profile"), ("step", 5), ("step", 6), ("block", "outputs 6"),
                    ("stop",), ("step", 7)]


@pytest.mark.parametrize("cfg", [config(0, 0), config(3, 0)])
def test_off(cfg, events):
  window = profiling.StepWindow(cfg, "/run")
  drive(window, range(1, 6), events)
  window.close("state")
  assert events == [("step", s) for s in range(1, 6)]


def test_only_process_0_traces(events, monkeypatch):
  monkeypatch.setattr(jax, "process_index", lambda: 1)
  window = profiling.StepWindow(config(1, 2), "/run")
  drive(window, range(1, 4), events)
  window.close("state")
  assert events == [("step", s) for s in range(1, 4)]


@pytest.mark.parametrize("cfg, words", [
    (config(-1, 2), "must be >= 0"),
    (config(2, -1), "must be >= 0"),
    (config(0, 2), "profile.start_step is 0"),
])
def test_bad_fields(cfg, words):
  with pytest.raises(ValueError, match=words):
    profiling.check(cfg, ValueError)
