"""A Hydra launcher that runs every cell of a sweep in its own fresh process
(``hydra/launcher=process``, the grid's default; ``hydra.launcher.n_jobs=N`` side by side).

Why not the basic launcher: it runs every cell inside the sweep's process, so one cell the
kernel kills (out of memory, a segfault in a kernel) ends the whole grid, and every cell
reads the sweep's peak memory. Here each cell is ``python -m harness.train <its overrides>``:

* a cell that dies without writing its result (SIGKILL from the OOM killer, a segfault, an
  abort) is recorded by the launcher, under the cell's lock, as ``oom`` (killed by SIGKILL)
  or ``failed``, with the signal and the last line the cell logged; the sweep goes on;
* an interrupt is not a failure: SIGINT/SIGTERM to the sweep (Ctrl-C, ``kill``, the grid
  stopping, a cluster's preemption) is passed on to the running cells as SIGTERM, no further
  cell starts, and a cell that stopped on it (exit 130/143, or killed by SIGINT/SIGTERM) is
  left unrecorded with its checkpoints, so a rerun resumes it; the sweep then exits;
* each cell process gets ``PR_SET_PDEATHSIG``: when the sweep dies, its cells die with it
  (no orphan left training and racing a rerun);
* the cell's output goes to ``<log_dir>/process.out``; the sweep prints one progress line
  per finished cell through Hydra's callbacks (``harness.grid.progress.CellProgress``);
* with ``n_jobs > 1`` the cores are shared out: each cell gets ``OMP_NUM_THREADS`` =
  cores // n_jobs (at least 1) unless the caller set it. Without this every cell starts
  torch's default of one thread per core, and n_jobs cells oversubscribe the machine
  (measured on 2 cores: two 2-thread cells ran each ~6x slower than one alone).

Hydra instantiates launchers only from its ``hydra_plugins`` namespace, so the class Hydra
sees is ``hydra_plugins.harness_launcher.process_launcher.ProcessLauncher``, a thin
subclass of the one here. The grid launches all its cells at once through
``hydra/sweeper=cells`` (``CellListSweeperBase`` here, ``hydra_plugins.harness_launcher.cells_sweeper``
there): a list of cells rather than a crossed product, in one ``launch`` call of any launcher. Hydra's own
machinery stays: the sweeper expands the overrides (``glob()``, ``choice()``,
``range()``), ``load_sweep_config`` composes each job, callbacks see every job, and the
joblib and submitit launchers remain one override away.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, open_dict

log = logging.getLogger(__name__)
_RESOLVE = threading.Lock()  # resolving a cell composes configs through Hydra's global state


class SweepInterrupted(KeyboardInterrupt):
    """The sweep stopped on SIGINT/SIGTERM (its running cells unrecorded, checkpoints kept)."""

    def __init__(self, signum: int):
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum


def die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:  # not Linux: the grid's own signal handler still stops its children
        pass


def last_line(path: Path) -> str:
    """The last non-empty line of a text file (the cell's last words), '' if none."""
    lines = [x.strip() for x in _tail_text(path, 8192).splitlines() if x.strip()]
    return lines[-1] if lines else ""


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def cell_environment(n_jobs: int, environ: dict[str, str] | None = None, cores: int | None = None) -> dict[str, str]:
    """The environment of a cell process: the sweep's, plus a share of the cores when cells run
    side by side (``OMP_NUM_THREADS`` and ``MKL_NUM_THREADS``, unless the caller set them)."""
    env = dict(os.environ if environ is None else environ)
    if n_jobs > 1:
        share = str(max(1, (cores or available_cores()) // n_jobs))
        for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            env.setdefault(name, share)
    return env


class ProcessLauncherBase(Launcher):
    def __init__(self, n_jobs: int = 1) -> None:
        super().__init__()
        self.n_jobs = max(1, int(n_jobs))
        self._stopping: int | None = None  # the stop signal the sweep received
        self._running: set[subprocess.Popen] = set()
        self._procs = threading.Lock()
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None
        self.task_function: TaskFunction | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        setup_globals()
        assert self.config is not None and self.hydra_context is not None
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        log.info("launching %d cells, each in its own process, %d at a time", len(job_overrides), self.n_jobs)
        jobs = [(initial_job_idx + i, list(o)) for i, o in enumerate(job_overrides)]
        old = self._catch_stop_signals()
        try:
            with ThreadPoolExecutor(max_workers=self.n_jobs) as pool:
                returns = list(pool.map(lambda job: self._run(*job), jobs))
        finally:
            for signum, handler in old.items():
                signal.signal(signum, handler)
        if self._stopping is not None:
            log.warning(
                "sweep interrupted by %s: running cells stopped unrecorded (checkpoints kept); "
                "rerun the same command to resume",
                signal.Signals(self._stopping).name,
            )
            raise SweepInterrupted(self._stopping)
        return returns

    def _catch_stop_signals(self) -> dict[int, Any]:
        """SIGINT/SIGTERM: pass SIGTERM on to the running cells and start no more (the pool's
        threads return once their cells have stopped; launch() then raises)."""
        if threading.current_thread() is not threading.main_thread():
            return {}

        def stop(signum, frame):
            if self._stopping is None:
                self._stopping = signum
            with self._procs:
                running = list(self._running)
            for proc in running:
                try:
                    proc.send_signal(signal.SIGTERM)
                except OSError:
                    pass

        return {signum: signal.signal(signum, stop) for signum in (signal.SIGINT, signal.SIGTERM)}

    def _run(self, idx: int, overrides: list[str]) -> JobReturn:
        from harness.train.cells import resolve_cell

        assert self.config is not None and self.hydra_context is not None
        sweep_config = self.hydra_context.config_loader.load_sweep_config(self.config, overrides)
        with open_dict(sweep_config):
            sweep_config.hydra.job.id = idx
            sweep_config.hydra.job.num = idx
        if self.task_function is None:
            raise RuntimeError("the launcher runs a job before Hydra's setup() gave it the task function")
        callbacks = self.hydra_context.callbacks
        callbacks.on_job_start(config=sweep_config, task_function=self.task_function)
        ret = JobReturn(
            overrides=overrides,
            cfg=sweep_config,
            hydra_cfg=sweep_config,
            task_name="harness.train.run",
            working_dir=os.getcwd(),
        )
        try:
            with _RESOLVE:
                cell = resolve_cell(sweep_config)
            rerun = str(sweep_config.get("rerun", "none"))
            record = (
                self._run_cell_process(cell, overrides, rerun) if self._stopping is None else self._interrupted(cell)
            )
            ret.status, ret._return_value = JobStatus.COMPLETED, record
        except Exception as exc:  # a bad cell config: recorded in the sweep, never the end of it
            log.error("cell #%d (%s) could not start: %s", idx, " ".join(filter_overrides(overrides)), exc)
            ret.status, ret._return_value = JobStatus.FAILED, exc
        callbacks.on_job_end(config=sweep_config, job_return=ret)
        return ret

    def _run_cell_process(self, cell, overrides: list[str], rerun: str = "none") -> dict[str, Any]:
        from harness.core.results import read_result
        from harness.train.run import record_stands

        kept = read_result(cell.result_path)
        if kept is not None and kept.get("config_hash") == cell.config_hash and record_stands(kept, rerun):
            return {**kept, "_skipped": True}  # what the cell's own process would do, without starting one
        cell.log_dir.mkdir(parents=True, exist_ok=True)
        out_path = cell.log_dir / "process.out"
        command = [sys.executable, "-m", "harness.train", *overrides]
        started = time.time()
        env = cell_environment(self.n_jobs)
        with open(out_path, "ab") as out:
            out.write(f"\n$ {' '.join(command)}\n".encode())
            out.flush()
            with self._procs:
                if self._stopping is not None:
                    return self._interrupted(cell)
                proc = subprocess.Popen(
                    command,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    env=env,
                    preexec_fn=die_with_parent if sys.platform.startswith("linux") else None,
                )
                self._running.add(proc)
            try:
                rc = proc.wait()
            except BaseException:  # the sweep is stopping: take the cell down with it
                proc.kill()
                proc.wait()
                raise
            finally:
                with self._procs:
                    self._running.discard(proc)
        record = read_result(cell.result_path)
        fresh = record is not None and cell.result_path.stat().st_mtime >= started - 1
        if not fresh and (self._stopping is not None or is_interrupt(rc)):  # stopped, not failed: resumable
            return self._interrupted(cell, rc)
        lived = round(time.time() - started, 2)
        if rc < 0 and not fresh:  # killed by a signal before it could write its result
            return self._record_killed(
                cell, -rc, last_line(cell.log_dir / "cell.log") or last_line(out_path), process_wall_s=lived
            )
        if record is None:
            tail = last_line(out_path)
            if "running in another process" in tail or "running in another process" in _tail_text(out_path):
                return {"status": "running", "task": cell.task, "mechanism": cell.mechanism, "seed": cell.seed}
            return self._record_killed(cell, None, tail, returncode=rc, process_wall_s=lived)
        record["_skipped"] = not fresh  # a recorded cell the child only skipped
        return record

    def _interrupted(self, cell, returncode: int | None = None) -> dict[str, Any]:
        """A cell stopped by an interrupt (or never started because of one): nothing recorded."""
        how = "not started" if returncode is None else f"stopped (exit {returncode})"
        log.warning("interrupted %s: %s, nothing recorded; a rerun resumes it", cell.name, how)
        return {
            "status": "interrupted",
            "task": cell.task,
            "mechanism": cell.mechanism,
            "scale": cell.scale,
            "seed": cell.seed,
            "variant": cell.variant,
            "error": f"interrupted: {how}",
            "_skipped": returncode is None,
        }

    def _record_killed(
        self, cell, signum: int | None, last: str, returncode: int | None = None, process_wall_s: float | None = None
    ) -> dict[str, Any]:
        """Write the result of a cell whose process died without writing one (``process_wall_s``:
        how long its process lived)."""
        from harness.core.results import write_result
        from harness.train.cells import cell_lock
        from harness.train.run import new_result

        if signum is not None:
            name = signal.Signals(signum).name if signum in {s.value for s in signal.Signals} else str(signum)
            status = "oom" if signum == signal.SIGKILL else "failed"
            why = f"cell process killed by {name}" + (
                " (the kernel's OOM killer sends SIGKILL)" if status == "oom" else ""
            )
        else:
            status, why = "failed", f"cell process exited with code {returncode} without writing a result"
        result = new_result(
            cell, status, error=f"{why}; last log line: {last}" if last else why, process_wall_s=process_wall_s
        )
        with cell_lock(cell):
            write_result(cell.results_dir, result)
        log.error("%s %s: %s", status, cell.name, result.error)
        return result.as_dict()


def is_interrupt(returncode: int | None) -> bool:
    """A cell process that ended on SIGINT/SIGTERM: killed by one, or exited 128 + its number
    (what ``harness.train.run`` does after stopping cleanly on one)."""
    stops = (signal.SIGINT, signal.SIGTERM)
    return returncode is not None and (returncode in {-s for s in stops} or returncode in {128 + s for s in stops})


def _tail_text(path: Path, size: int = 4096) -> str:
    """The last ``size`` bytes of a text file, decoded ('' when it cannot be read)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - size))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def read_cells(path: str | Path) -> list[dict[str, Any]]:
    """A cells file (written by the grid, ``harness.grid.sweep.write_cells``): a JSON list of
    ``{"name": label, "overrides": [...]}``, one per cell, in launch order."""
    import json

    cells = json.loads(Path(path).read_text())
    if not isinstance(cells, list) or not all(
        isinstance(c, dict) and isinstance(c.get("overrides"), list) for c in cells
    ):
        raise ValueError(f"{path}: not a cells file (a JSON list of {{name, overrides}})")
    return cells


class CellListSweeperBase(Sweeper):
    """``hydra/sweeper=cells``: launches a given list of cells (``hydra.sweeper.cells_file``, each
    cell its own override list, no crossed product) through the configured launcher in one
    ``launch`` call, so a launcher with ``n_jobs`` workers keeps them all busy to the last cell
    (the grid's groups need not wait for each other). The multirun's own overrides (scale,
    results_dir) follow each cell's; ``hydra.job.num`` is the cell's place in the file."""

    def __init__(self, cells_file: str | None = None) -> None:
        super().__init__()
        self.cells_file = cells_file
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None
        self.launcher: Launcher | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        from hydra.core.plugins import Plugins

        self.config, self.hydra_context = config, hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    def sweep(self, arguments: list[str]) -> Any:
        from hydra.core.override_parser.overrides_parser import OverridesParser
        from omegaconf import OmegaConf

        assert self.config is not None and self.launcher is not None and self.hydra_context is not None
        if not self.cells_file:
            raise ValueError("hydra/sweeper=cells needs hydra.sweeper.cells_file=<a JSON list of cells>")
        common = OverridesParser.create(config_loader=self.hydra_context.config_loader).parse_overrides(arguments)
        swept = [str(o.input_line) for o in common if o.is_sweep_override()]  # parse_overrides keeps the text
        if swept:
            raise ValueError(
                f"hydra/sweeper=cells takes its cells from {self.cells_file}; sweep them there, not "
                f"with {', '.join(swept)}"
            )
        jobs = [[*cell["overrides"], *(o.input_line for o in common)] for cell in read_cells(self.cells_file)]
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        returns = self.launcher.launch(jobs, initial_job_idx=0)
        for ret in returns:
            _ = ret.return_value  # a job that failed raises here, as in Hydra's basic sweeper
        return [returns]
