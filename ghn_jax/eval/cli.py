"""Command-line helpers shared by the evaluation scripts."""

from __future__ import annotations

import argparse


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
  """Append "(default: ...)" to option help unless the default is None.

  An option whose default is None computes its value at run time, so its
  help text describes that default itself.
  """

  def _get_help_string(self, action: argparse.Action) -> str | None:
    if action.default is None:
      return action.help
    return super()._get_help_string(action)
