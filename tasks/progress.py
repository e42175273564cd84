"""Progress of long work, where it can be seen.

- In a terminal (stderr is a TTY): rich bars with elapsed time and ETA, one for the study's rounds
  (two units a round: training, then evaluation) and one for the training steps of the round
  running now (``Editor.on_step(step, loss)``: every method that trains in steps; not MEMIT).
- Run by a worker (the process of a deployment's flow run): a Prefect progress artifact per study and per
  round's training, updated at most every ``every_s`` seconds.
- Always, when the study has an MLflow run: the loss of every training step as the metric
  ``train.step_loss`` at step ``round x steps cap + step`` (batched, sent every ``every_s`` seconds).
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Any

_lock = threading.Lock()
_live: dict[str, Any] = {"progress": None, "tasks": 0, "shared": False}


def share(progress) -> None:
    """Put this process's bars into ``progress`` (a running rich Progress: ``memoe sweep``'s), since
    a terminal has room for one live display; ``share(None)`` ends that."""
    with _lock:
        _live.update(progress=progress, tasks=0, shared=progress is not None)


def in_terminal() -> bool:
    return sys.stderr.isatty()


def on_worker() -> bool:
    """A worker started this process for a flow run (it sets PREFECT__FLOW_RUN_ID; subflows have no
    deployment of their own, so the flow run's deployment id does not tell)."""
    import os

    return bool(os.environ.get("PREFECT__FLOW_RUN_ID"))


def _bar(description: str, total: float):
    """A bar in the process's one live rich display (created with the first bar, closed with the last)."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        Progress,
        TaskProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    with _lock:
        if _live["progress"] is None:
            p = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                TaskProgressColumn(),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
                console=Console(stderr=True),
                transient=True,
            )
            p.start()
            _live["progress"] = p
        _live["tasks"] += 1
        return _live["progress"], _live["progress"].add_task(description, total=total)


def _close(task_id) -> None:
    with _lock:
        p = _live["progress"]
        if p is None:
            return
        p.remove_task(task_id)
        _live["tasks"] -= 1
        if _live["tasks"] <= 0 and not _live["shared"]:
            p.stop()
            _live["progress"], _live["tasks"] = None, 0


class Reporter:
    """One unit of long work (``total`` parts): terminal bar, Prefect progress artifact, or neither."""

    def __init__(
        self,
        description: str,
        total: float,
        key: str | None = None,
        every_s: float = 2.0,
        terminal: bool | None = None,
        artifact: bool | None = None,
    ):
        self.description, self.total, self.done, self.every_s = description, float(total), 0.0, every_s
        self.bar = _bar(description, total) if (in_terminal() if terminal is None else terminal) else None
        self.artifact_id, self._last = None, 0.0
        if on_worker() if artifact is None else artifact:
            try:
                from prefect.artifacts import create_progress_artifact

                self.artifact_id = create_progress_artifact(0.0, key=key, description=description)
            except Exception:  # noqa: BLE001 - progress is informative
                self.artifact_id = None

    def update(self, done: float, description: str | None = None, force: bool = False) -> None:
        self.done = done
        if self.bar:
            p, tid = self.bar
            p.update(tid, completed=done, **({"description": description} if description else {}))
        now = time.monotonic()
        if self.artifact_id and (force or now - self._last >= self.every_s):
            self._last = now
            try:
                from prefect.artifacts import update_progress_artifact

                update_progress_artifact(self.artifact_id, min(100.0, 100.0 * done / max(self.total, 1e-9)))
            except Exception:  # noqa: BLE001
                pass

    def close(self) -> None:
        self.update(self.done, force=True)
        if self.bar:
            _close(self.bar[1])
            self.bar = None


class StepLoss:
    """``on_step`` callback of a training round: the bar, the artifact and ``train.step_loss`` in MLflow."""

    def __init__(self, progress: dict | None, total_steps: int, round_index: int):
        progress = progress or {}
        self.total, self.offset = total_steps, progress.get("step_offset", round_index * total_steps)
        label = progress.get("label") or ""
        self.reporter = Reporter(f"{label + ' ' if label else ''}round {round_index + 1} training steps", total_steps)
        self.tracker, self.run_id = None, progress.get("run_id")
        if self.run_id and progress.get("tracking"):
            from tasks.tracking import tracker

            self.tracker = tracker(**progress["tracking"])
        self.buffer: dict[int, float] = {}
        self.losses: list[float] = []
        self._last = time.monotonic()

    def __call__(self, step: int, loss: float) -> None:
        self.losses.append(loss)
        self.reporter.update(step, f"{self.reporter.description} (loss {loss:.3f})")
        if self.tracker:
            self.buffer[self.offset + step] = loss
            if time.monotonic() - self._last >= self.reporter.every_s:
                self.flush()

    def flush(self) -> None:
        self._last = time.monotonic()
        if not (self.tracker and self.buffer):
            return
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = [Metric("train.step_loss", float(v), ts, s) for s, v in sorted(self.buffer.items())]
        self.buffer.clear()
        try:
            self.tracker.client.log_batch(self.run_id, metrics=items, synchronous=True)
        except Exception:  # noqa: BLE001 - a lost progress point never fails a round
            pass

    def close(self) -> None:
        self.flush()
        self.reporter.update(self.total)
        self.reporter.close()
