"""Tables of the API's answers for people (``--json`` prints the answers themselves for scripts).

Every cell and title goes in as ``rich.text.Text`` (``row``, ``_table``): class, dataset and file
names and error messages are anyone's strings, and rich would read ``[/b]`` or ``[link=…]`` in a
plain ``str`` as markup (a MarkupError, vanished text, a hyperlink).
"""

from __future__ import annotations

import json
from typing import Any

from rich.table import Table
from rich.text import Text


def num(value: Any, digits: int = 3) -> str:
    return f"{value:.{digits}f}" if isinstance(value, int | float) and not isinstance(value, bool) else "-"


def when(value: Any) -> str:
    return str(value)[:16].replace("T", " ") if value else "-"


def row(table: Table, *cells: str) -> None:
    """Add a row of plain text (no markup) to ``table``."""
    table.add_row(*(Text(c) for c in cells))


def _table(*columns: str, title: str | None = None) -> Table:
    table = Table(title=None if title is None else Text(title), show_edge=False, pad_edge=False)
    for c in columns:
        table.add_column(c, no_wrap=c in ("id", "model", "dataset", "job", "status", "created", "val acc"),
                         overflow="fold")
    return table


def _val_acc(row: dict[str, Any]) -> str:
    return num((row.get("metrics") or {}).get("val_acc"))


def datasets_table(body: dict[str, Any]) -> Table:
    t = _table("id", "name", "images", "classes", "created", title=f"{body['count']} datasets")
    for d in body["data"]:
        row(t, d["id"], d["name"], str(d["num_images"]), str(len(d["classes"])), when(d["created_at"]))
    return t


def dataset_table(d: dict[str, Any]) -> Table:
    t = _table("class", "images", title=f"dataset {d['id']} ({d['name']}): {d['num_images']} images")
    for name in d["classes"]:
        row(t, name, str(d["counts"].get(name, 0)))
    for s in d.get("skipped") or []:
        row(t, f"skipped {s['file']}", s["reason"])
    return t


def jobs_table(body: dict[str, Any]) -> Table:
    # Ids are 32 characters: a list keeps to one of them per row to fit a terminal (show has the rest).
    t = _table("id", "status", "stage", "val acc", "created", title=f"{body['count']} jobs")
    for j in body["data"]:
        row(t, j["id"], j["status"], str(j["progress"].get("stage", "-")), _val_acc(j), when(j["created_at"]))
    return t


def _fields(title: str, rows: list[tuple[str, Any]]) -> Table:
    t = Table(title=Text(title), show_header=False, show_edge=False, pad_edge=False)
    t.add_column("", style="bold", no_wrap=True)
    t.add_column("", overflow="fold")
    for k, v in rows:
        row(t, k, v if isinstance(v, str) else json.dumps(v))
    return t


def job_table(j: dict[str, Any]) -> Table:
    m = j.get("metrics") or {}
    rows: list[tuple[str, Any]] = [
        ("status", j["status"] + (" (cancel requested)" if j.get("cancel_requested") else "")),
        ("stage", str(j["progress"].get("stage", "-"))),
        ("attempts", str(j["attempts"])),
        ("dataset", j["dataset_id"]),
        ("model", j.get("model_id") or "-"),
        ("backbone", str(j["spec"].get("backbone", "-"))),
        ("members", str((j["spec"].get("ensemble") or {}).get("members", 1))),
        ("epochs run", str(len(j.get("history") or []))),
        ("val acc", num(m.get("val_acc"))),
        ("member val acc", ", ".join(num(a) for a in m.get("member_val_acc") or []) or "-"),
        ("created", when(j["created_at"])),
        ("started", when(j.get("started_at"))),
        ("finished", when(j.get("finished_at"))),
    ]
    if j.get("error"):
        rows.append(("error", j["error"]))
    return _fields(f"job {j['id']}", rows)


def models_table(body: dict[str, Any]) -> Table:
    t = _table("id", "classes", "members", "val acc", "created", title=f"{body['count']} models")
    for m in body["data"]:
        row(t, m["id"], str(len(m["classes"])), str(len(m["members"])), _val_acc(m), when(m["created_at"]))
    return t


def model_table(m: dict[str, Any]) -> Table:
    metrics = m.get("metrics") or {}
    rows: list[tuple[str, Any]] = [
        ("job", m["job_id"]),
        ("dataset", m["dataset_id"]),
        ("classes", ", ".join(m["classes"])),
        ("backbone", str(m["spec"].get("backbone", "-"))),
        ("image size", str(metrics.get("image_size", "-"))),
        ("val acc", num(metrics.get("val_acc"))),
        ("member val acc", ", ".join(num(a) for a in metrics.get("member_val_acc") or []) or "-"),
        ("temperature", num(metrics.get("temperature"))),
        ("created", when(m["created_at"])),
    ]
    return _fields(f"model {m['id']}", rows)


def report_table(r: dict[str, Any]) -> Table:
    """Per-class precision, recall, F1 and support of the validation split, with the averages."""
    ev = r["evaluation"]
    topk = ", ".join(f"top-{k} {num(v)}" for k, v in sorted(ev.get("top_k_acc", {}).items(), key=lambda kv: int(kv[0])))
    t = _table("class", "precision", "recall", "f1", "support",
               title=f"model {r['model_id']}: accuracy {num(ev.get('accuracy'))} on {ev['size']} images"
               + (f" ({topk})" if topk else ""))
    for c in ev["per_class"]:
        row(t, c["label"], num(c["precision"]), num(c["recall"]), num(c["f1"]), str(c["support"]))
    t.add_section()
    for name in ("macro_avg", "weighted_avg"):
        a = ev[name]
        row(t, name.replace("_", " "), num(a["precision"]), num(a["recall"]), num(a["f1"]), str(ev["size"]))
    return t


def _seconds(value: Any) -> str:
    return f"{num(value, 1)} s" if isinstance(value, int | float) else "-"


def plan_table(r: dict[str, Any]) -> Table | None:
    """What the time-budget planner chose and why (a report's ``plan``); None for a job without a budget.

    ``r`` is a report: ``GET /v1/models/{id}/report``, or the ``metrics`` of a model or a finished job.
    """
    plan = r.get("plan")
    if not plan:
        return None
    rows: list[tuple[str, Any]] = [
        ("budget", _seconds(plan.get("budget_s"))
         + (" (the default budget for this device)" if plan.get("default_budget") else "")),
        ("device", str(plan.get("device", "-"))),
        ("estimated", f"{_seconds(plan.get('estimate_seconds'))} (measuring the speed "
         f"{_seconds(plan.get('measure_seconds'))})"),
        ("took", _seconds(plan.get("seconds"))),
    ]
    rows += [(f"planned {k}", v if isinstance(v, str) else json.dumps(v))
             for k, v in (plan.get("planned") or {}).items()]
    if plan.get("kept"):
        rows.append(("you set", ", ".join(plan["kept"])))
    lf = r.get("lr_finder")
    if lf:
        rows.append(("lr picked", f"{lf['lr']:.2g} ({lf.get('method', '-')})"))
    rows += [("why" if i == 0 else "", f"- {line}") for i, line in enumerate(plan.get("why") or [])]
    for key, title in (("deadline", "deadline"), ("members_shortened", "members shortened"),
                       ("members_skipped", "members skipped")):
        note = (plan.get(key) or r.get(key) or {}).get("note")
        if note:
            rows.append((title, note))
    return _fields(f"plan for the time budget of {_seconds(plan.get('budget_s'))}", rows)


def predictions_table(body: dict[str, Any]) -> Table:
    t = _table("file", "rank", "label", "probability", title=f"model {body['model_id']}")
    for p in body["predictions"]:
        for rank, lp in enumerate(p["top_k"], start=1):
            row(t, p["file"] if rank == 1 else "", str(rank), lp["label"], num(lp["probability"]))
    return t


def presets_table(body: dict[str, Any]) -> Table:
    t = _table("name", "title", "description", title=f"{body['count']} presets")
    for p in body["data"]:
        row(t, p["name"], p["title"], p["description"])
    return t
