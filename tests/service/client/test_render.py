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
    ],
)
def test_api_strings_are_shown_verbatim(table, expected: list[str]) -> None:
    out = shown(table())
    for text in expected:
        assert text in out, (text, out)
