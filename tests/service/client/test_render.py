"""The client's tables show the API's strings as they are: never parsed as rich markup."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from service.client import render
from service.client.watch import summary_table

# Each would be markup: a closing tag with no opening one (MarkupError), a tag that swallows the
# text, a hyperlink, a style.
NAMES = ["x[/b]", "[unlabeled]", "[link=https://evil.example]click[/link]", "[bold red]loud"]


def shown(table) -> str:
    out = io.StringIO()
    Console(file=out, width=400, color_system=None, force_terminal=False).print(table)
    return out.getvalue()


def _dataset() -> dict:
    return {
        "id": "d1", "name": "[b]set[/b]", "num_images": 4, "classes": NAMES, "created_at": "2026-01-01T00:00:00",
        "counts": {n: 1 for n in NAMES}, "skipped": [{"file": "[/]bad.png", "reason": "[red]not an image"}],
    }


def _evaluation() -> dict:
    avg = {"precision": 1.0, "recall": 1.0, "f1": 1.0}
    return {
        "model_id": "m1",
        "evaluation": {"accuracy": 1.0, "size": 4, "macro_avg": avg, "weighted_avg": avg,
                       "per_class": [{"label": n, **avg, "support": 1} for n in NAMES]},
    }


def _plan() -> dict:
    return {
        "budget_s": 60.0, "default_budget": True, "device": "cpu", "kept": ["backbone"],
        "planned": {"image_size": 128, "freeze": {"mode": "linear_probe"}, "optimizer.lr": "auto"},
        "why": ["5 training images per class (< 20): only a new linear classifier trains"],
        "throughputs": [], "measure_seconds": 1.25, "estimate_seconds": 52.5, "seconds": 48.0,
    }


def test_the_plan_says_what_the_planner_chose_and_why() -> None:
    assert render.plan_table({"val_acc": 1.0}) is None and render.plan_table({"plan": None}) is None
    out = shown(render.plan_table({
        "plan": {**_plan(), "deadline": {"member": 0, "epoch": 3, "note": "stopped in member 1, epoch 4"}},
        "members_skipped": {"note": "member 3 of 3 not started"},  # the report's own copy (older reports)
        "members_shortened": {"note": "member 2 of 3 trains 3 of 6 epochs"},
        "lr_finder": {"lr": 0.0031, "method": "steepest"},
    }))
    for text in ("plan for the time budget of 60.0 s", "60.0 s (the default budget for this device)", "52.5 s",
                 "(measuring the speed 1.2 s)", "48.0 s", "planned image_size", "128",
                 '{"mode": "linear_probe"}', "you set", "backbone", "0.0031 (steepest)",
                 "5 training images per class (< 20): only a new linear classifier trains",
                 "stopped in member 1, epoch 4", "member 3 of 3 not started", "members shortened",
                 "member 2 of 3 trains 3 of 6 epochs"):
        assert text in out, (text, out)


@pytest.mark.parametrize(
    ("table", "expected"),
    [
        (lambda: render.dataset_table(_dataset()), [*NAMES, "[b]set[/b]", "[/]bad.png", "[red]not an image"]),
        (lambda: render.datasets_table({"count": 1, "data": [_dataset()]}), ["[b]set[/b]"]),
        (lambda: render.report_table(_evaluation()), NAMES),
        (lambda: render.predictions_table({"model_id": "m1", "predictions": [
            {"file": "[/i]x.png", "top_k": [{"label": n, "probability": 0.25} for n in NAMES]}]}),
         ["[/i]x.png", *NAMES]),
        (lambda: render.model_table({"id": "m1", "job_id": "j", "dataset_id": "d", "classes": NAMES, "spec": {},
                                     "metrics": {}, "created_at": None}), [", ".join(NAMES)]),
        (lambda: render.job_table({"id": "j", "status": "failed", "progress": {"stage": "[x]"}, "attempts": 1,
                                   "dataset_id": "d", "spec": {}, "created_at": None, "error": "bad [/b] label"}),
         ["[x]", "bad [/b] label"]),
        (lambda: summary_table("j", {"status": "failed", "error": "class [/b] [unlabeled]"}),
         ["class [/b] [unlabeled]"]),
        (lambda: render.plan_table({"plan": {**_plan(), "why": NAMES, "members_skipped": {"note": "[/b] skipped"}}}),
         [*NAMES, "[/b] skipped"]),
    ],
)
def test_api_strings_are_shown_verbatim(table, expected: list[str]) -> None:
    out = shown(table())
    for text in expected:
        assert text in out, (text, out)
