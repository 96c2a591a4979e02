"""Hydra finds sweepers only in the ``hydra_plugins`` namespace: this module exposes
``harness.grid.launcher.CellListSweeperBase`` (a given list of cells, launched at once) there,
as ``hydra/sweeper=cells``, and registers its config."""

from dataclasses import dataclass

from hydra.core.config_store import ConfigStore

from harness.grid.launcher import CellListSweeperBase


@dataclass
class CellListSweeperConf:
    """``hydra/sweeper=cells``: the cells of ``cells_file`` (a JSON list of ``{name, overrides}``)."""

    _target_: str = "hydra_plugins.harness_launcher.cells_sweeper.CellListSweeper"
    cells_file: str | None = None


ConfigStore.instance().store(group="hydra/sweeper", name="cells", node=CellListSweeperConf, provider="harness")


class CellListSweeper(CellListSweeperBase):
    """Launches the grid's cells through the configured launcher in one call (see ``harness.grid.launcher``)."""
