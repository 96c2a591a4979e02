"""Hydra finds launchers only in the ``hydra_plugins`` namespace: this module exposes
``harness.grid.launcher.ProcessLauncher`` (a fresh process per cell) there, as
``hydra/launcher=process``."""

from harness.grid.launcher import ProcessLauncherBase


class ProcessLauncher(ProcessLauncherBase):
    """Runs each cell of a sweep in its own process (see ``harness.grid.launcher``)."""
