"""Count XLA compilations, to check that they stop growing."""

from __future__ import annotations

import threading

import jax

# Event that JAX records once per XLA backend compilation (jax 0.10).
BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"

_lock = threading.Lock()
_state = {"count": 0, "seconds": 0.0, "registered": False}


def _on_event_duration(event: str, duration: float, **kwargs) -> None:
  del kwargs
  if event == BACKEND_COMPILE_EVENT:
    with _lock:
      _state["count"] += 1
      _state["seconds"] += duration


def install() -> None:
  """Register the compilation listener once per process."""
  with _lock:
    if _state["registered"]:
      return
    _state["registered"] = True
  jax.monitoring.register_event_duration_secs_listener(_on_event_duration)


def compile_count() -> int:
  """Return the number of XLA compilations since `install`."""
  install()
  return _state["count"]


def compile_seconds() -> float:
  """Return the total XLA compile time in seconds since `install`."""
  install()
  return _state["seconds"]
