"""Reporting: the leaderboard (``leaderboard``), the shortcut baselines it compares against
(``baselines``), the speed tables and plots (``efficiency``) and ``load_frame``, the results as a
pandas DataFrame (``frames``). Reads records; builds on ``harness.core``."""

from harness.report.baselines import baselines_for, compute_baselines
from harness.report.frames import load_frame
from harness.report.leaderboard import write_report

__all__ = ["baselines_for", "compute_baselines", "load_frame", "write_report"]
