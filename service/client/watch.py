"""Drawing a job's event stream in the terminal: a bar per ensemble member, then a summary table.

On a terminal the bars update in place (rich); elsewhere (a log, a pipe, CI) each event is one
plain line, so the output reads well when it is not watched live.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from service.client.events import Event
from service.client.render import row

FINAL_OK = "succeeded"


def _num(value: Any, digits: int = 3) -> str:
    return f"{value:.{digits}f}" if isinstance(value, int | float) else "-"


def _lr(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, int | float) else "-"  # warm-up rates are 1e-5 and less


def epoch_metrics(e: dict[str, Any]) -> str:
    return (f"train loss {_num(e.get('train_loss'))} acc {_num(e.get('train_acc'))}  "
            f"val loss {_num(e.get('val_loss'))} acc {_num(e.get('val_acc'))}  lr {_lr(e.get('lr'))}")


class Watcher:
    """Turns events into bars and lines on ``console``; ``live`` (default: a terminal) draws bars in place."""

    def __init__(self, console: Console, live: bool | None = None) -> None:
        self.console = console
        self.live = console.is_terminal if live is None else live
        self.progress = Progress(
            TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[metrics]}", markup=False), TimeElapsedColumn(),
            console=console, disable=not self.live,
        )
        self.bars: dict[int, TaskID] = {}
        self.members: int | None = None
        self.epochs: int | None = None
        self.stage: str | None = None
        self.status: str | None = None
        self.done: dict[str, Any] | None = None

    def line(self, text: str) -> None:
        # One event, one line, even where a log or pipe would wrap it at rich's default 80 columns.
        self.console.print(text, highlight=False, markup=False, soft_wrap=True)

    def __enter__(self) -> Watcher:
        if self.live:
            self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.live:
            self.progress.stop()

    def handle(self, event: Event) -> None:
        getattr(self, f"_on_{event.type}", self._on_other)(event.data)

    def _on_other(self, data: dict[str, Any]) -> None:
        pass  # an event type newer than this client: nothing to draw

    def _on_status(self, d: dict[str, Any]) -> None:
        if d.get("status") != self.status:
            self.status = d.get("status")
            attempt = f" (attempt {d['attempt']})" if (d.get("attempt") or 0) > 1 else ""
            self.line(f"job {self.status}{attempt}" + (f": {d['error']}" if d.get("error") else ""))

    def _on_stage(self, d: dict[str, Any]) -> None:
        stage = d.get("stage")
        if stage != self.stage:
            self.stage = stage
            if stage != "training":  # the bars show training
                self.line(f"stage: {stage}")

    def _on_epoch(self, d: dict[str, Any]) -> None:
        self.members = d.get("members") or self.members
        self.epochs = d.get("epochs") or self.epochs
        member, epoch = int(d["member"]), int(d["epoch"])
        label = f"member {member}/{self.members or '?'}"
        metrics = epoch_metrics(d)
        if member not in self.bars:
            self.bars[member] = self.progress.add_task(label, total=self.epochs, metrics="")
        self.progress.update(self.bars[member], completed=epoch, total=self.epochs, metrics=metrics)
        if not self.live:
            self.line(f"{label} epoch {epoch}/{self.epochs or '?'}  {metrics}")

    def _on_trial(self, d: dict[str, Any]) -> None:
        outcome = f" ({d['outcome']})" if d.get("outcome") else ""
        self.line(f"sweep trial {d.get('trial')} round {d.get('round')} rung {d.get('rung')}: "
                  f"{d.get('epochs')} epochs, lr {_num(d.get('lr'), 4)} -> val acc {_num(d.get('val_acc'))}{outcome}")

    def _on_restart(self, d: dict[str, Any]) -> None:
        resumed = d.get("resumed_from")
        how = (f"resumes at member {resumed.get('member')}, epoch {resumed.get('epoch')}" if resumed
               else "starts over")
        self.line(f"attempt {d.get('attempt')} {how}")
        for bar in self.bars.values():
            self.progress.remove_task(bar)
        self.bars.clear()
        for h in d.get("history") or []:  # in the epoch events' shape: 1-based member and epoch
            member, epoch = int(h["member"]), int(h["epoch"])
            if member not in self.bars:
                self.bars[member] = self.progress.add_task(f"member {member}/{self.members or '?'}",
                                                           total=self.epochs, metrics="")
            self.progress.update(self.bars[member], completed=epoch, metrics=epoch_metrics(h))

    def _on_done(self, d: dict[str, Any]) -> None:
        self.done = d
        self.status = d.get("status")


def summary_table(job_id: str, done: dict[str, Any]) -> Table:
    """Status, ensemble and member validation accuracy, and the model id of a finished job."""
    status = done.get("status")
    table = Table(title=Text(f"job {job_id}: {status}"), show_header=False)
    table.add_column("", style="bold")
    table.add_column("value")
    metrics = done.get("metrics") or {}
    if metrics:
        row(table, "ensemble val acc", _num(metrics.get("val_acc")))
        for i, acc in enumerate(metrics.get("member_val_acc") or [], start=1):
            row(table, f"member {i} val acc", _num(acc))
        if metrics.get("val_size") is not None:
            row(table, "validation images", str(metrics["val_size"]))
        if metrics.get("seconds") is not None:
            row(table, "training time", f"{metrics['seconds']:.1f} s")
    if done.get("model_id"):
        row(table, "model id", str(done["model_id"]))
    if done.get("error"):
        row(table, "error", str(done["error"]))
    return table


def watch(events: Iterable[Event], job_id: str, console: Console, out: Console | None = None,
          live: bool | None = None) -> dict[str, Any]:
    """Draw ``events`` on ``console`` until ``done``; print the summary table on ``out``; return ``done``'s data.

    Raises:
        RuntimeError: the stream ended without a ``done`` event.
    """
    watcher = Watcher(console, live)
    with watcher:
        for event in events:
            watcher.handle(event)
            if watcher.done is not None:
                break
    if watcher.done is None:
        raise RuntimeError(f"the event stream of job {job_id} ended without its done event")
    (out or console).print(summary_table(job_id, watcher.done))
    return watcher.done
