"""Count XLA compilations and keep compiled programs under the map limit."""

from __future__ import annotations

import gc
import threading

import jax
from absl import logging

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


# Share of the kernel's memory-mapping limit at which compiled programs are
# dropped (see `release_programs_near_map_limit`).
MAP_LIMIT_FRACTION = 0.7
_MAPS_PATH = "/proc/self/maps"
_MAP_LIMIT_PATH = "/proc/sys/vm/max_map_count"


def memory_map_count() -> int | None:
  """Return this process's number of memory mappings (Linux), else None."""
  try:
    with open(_MAPS_PATH, "rb") as maps:
      return sum(1 for _ in maps)
  except OSError:
    return None


def memory_map_limit() -> int | None:
  """Return the kernel's per-process mapping limit (Linux), else None."""
  try:
    with open(_MAP_LIMIT_PATH) as limit:
      return int(limit.read().strip())
  except (OSError, ValueError):
    return None


def release_programs_near_map_limit(
  fraction: float = MAP_LIMIT_FRACTION,
) -> bool:
  """Drop every compiled program when mappings near the kernel's limit.

  Each compiled XLA CPU program keeps its machine code in memory mappings
  (measured 4-25 per program with jax 0.10). Meta-training compiles one
  program per op signature, thousands in a long run, and at the limit
  (`vm.max_map_count`, 65,530 by default) LLVM cannot map new code and the
  process aborts. Past `fraction` of the limit this clears JAX's caches,
  which unmaps them; programs compile again (or load from the persistent
  compilation cache) when next used.

  Returns:
    Whether the programs were dropped.
  """
  count, limit = memory_map_count(), memory_map_limit()
  if count is None or limit is None or count < fraction * limit:
    return False
  logging.warning(
    "%d memory mappings of the kernel's limit of %d (vm.max_map_count): "
    "dropping all compiled programs, which compile again on use. Raise "
    "vm.max_map_count to keep them.",
    count,
    limit,
  )
  jax.clear_caches()
  gc.collect()
  return True
