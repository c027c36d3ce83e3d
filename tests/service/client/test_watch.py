"""The watcher draws a recorded event stream, reconnects with Last-Event-ID, and fails on a failed job."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from service import cli
from service.client import Zoofit
from service.client.errors import ApiError
from service.client.watch import watch
from tests.utils.recorded_events import DROP_AFTER, FAILED, MODEL_ID, SUCCEEDED, fake_events_app
from tests.utils.server import serve

KEY = "zf_test_key"


@pytest.fixture(scope="module")
def stream_server():
    seen: list[dict] = []
    plan = {"budget_s": 75.0, "default_budget": True, "device": "cpu", "kept": [], "why": ["the rule's depth"],
            "planned": {"image_size": 96}, "throughputs": [], "measure_seconds": 11.0, "estimate_seconds": 70.0}
    jobs = {"ok": {"id": "ok", "status": "succeeded", "metrics": {"val_acc": 0.875, "plan": plan}}}
    app = fake_events_app({"ok": SUCCEEDED, "bad": FAILED, "busy": SUCCEEDED, "full": SUCCEEDED}, KEY, seen,
                          drop_after={"ok": DROP_AFTER}, jobs=jobs, busy={"busy": (2, "7"), "full": (-1, "3")})
    with serve(app) as url:
        yield url, seen


def _console(terminal: bool) -> Console:
    return Console(file=io.StringIO(), force_terminal=terminal, width=160, color_system=None)


def test_watch_reconnects_after_a_drop_with_last_event_id_and_draws_the_summary(stream_server):
    url, seen = stream_server
    err, out = _console(False), _console(False)
    with Zoofit(url, KEY) as zf:
        done = watch(zf.events("ok", sleep=lambda _s: None), "ok", err, out)
    assert done["status"] == "succeeded" and done["model_id"] == MODEL_ID
    assert [s["last_event_id"] for s in seen if s["job"] == "ok"] == [None, str(DROP_AFTER)]
    log = err.file.getvalue()
    for member, epoch in ((1, 1), (1, 2), (2, 1), (2, 2)):
        assert log.count(f"member {member}/2 epoch {epoch}/2 ") == 1  # each epoch once: nothing lost or repeated
    assert "val loss 0.500 acc 0.812" in log and "stage: saving model" in log and "job succeeded" in log
    table = out.file.getvalue()
    assert "ensemble val acc" in table and "0.875" in table
    assert "member 2 val acc" in table and "0.812" in table and MODEL_ID in table


def test_live_bars_on_a_terminal(stream_server):
    url, _seen = stream_server
    err = _console(True)
    with Zoofit(url, KEY) as zf:
        watch(zf.events("bad", sleep=lambda _s: None), "bad", err)
    screen = err.file.getvalue()
    assert "member 1/2" in screen and "1/2" in screen
    assert "attempt 2 resumes at member 1, epoch 1" in screen
    assert "training diverged" in screen


def test_jobs_watch_exits_non_zero_on_a_failed_job(stream_server, monkeypatch, capsys, tmp_path):
    url, _seen = stream_server
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    monkeypatch.setenv("ZOOFIT_API_KEY", KEY)
    with pytest.raises(SystemExit) as exit_:
        cli.main(["jobs", "watch", "bad", "--url", url])
    assert exit_.value.code == 1
    captured = capsys.readouterr()
    assert "job bad: failed" in captured.out and "training diverged (loss is NaN)" in captured.out
    with pytest.raises(SystemExit) as exit_:
        cli.main(["jobs", "watch", "ok", "--url", url])
    assert exit_.value.code == 0
    # a job that succeeded ends with its time-budget plan, as jobs show prints it
    out = capsys.readouterr().out
    assert "plan for the time budget of 75" in out and "the default budget for this device" in out
    assert "the rule's depth" in out and out.index("job ok: succeeded") < out.index("plan for the time budget")


def test_a_refused_stream_is_an_error_not_a_retry(stream_server, monkeypatch, capsys, tmp_path):
    url, seen = stream_server
    before = len(seen)
    with Zoofit(url, KEY) as zf, pytest.raises(ApiError) as exc:
        list(zf.events("nope"))
    assert exc.value.status == 404 and exc.value.message == "job nope not found"
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    monkeypatch.setenv("ZOOFIT_API_KEY", "zf_wrong")
    with pytest.raises(SystemExit) as exit_:
        cli.main(["jobs", "watch", "ok", "--url", url])
    assert exit_.value.code == 1
    assert capsys.readouterr().err.strip() == "zoofit: missing or invalid API key"
    assert len(seen) == before


def test_a_stream_that_keeps_failing_gives_up_after_its_retries():
    from service.client.events import StreamLost
    from tests.utils.server import free_port

    waits: list[float] = []
    with Zoofit(f"http://127.0.0.1:{free_port()}", KEY) as zf, pytest.raises(StreamLost):
        list(zf.events("ok", retries=3, backoff_s=0.5, sleep=waits.append))
    assert waits == [0.5, 1.0, 2.0]  # doubling between tries


def test_a_stream_over_the_open_streams_limit_waits_as_the_server_asks(stream_server):
    """A 429 (too many streams open: one may close) is retried after its Retry-After, not the backoff."""
    from service.client.events import StreamLost

    url, seen = stream_server
    waits: list[float] = []
    with Zoofit(url, KEY) as zf:
        events = list(zf.events("busy", backoff_s=0.5, sleep=waits.append))
        assert waits == [7.0, 7.0] and events[-1].type == "done"  # refused twice, then the whole stream
        assert [e.id for e in events] == [str(i) for i in range(1, len(SUCCEEDED) + 1)]
        waits.clear()
        with pytest.raises(StreamLost) as lost:
            list(zf.events("full", retries=2, backoff_s=0.5, sleep=waits.append))
    assert waits == [3.0, 3.0]  # Retry-After (3 s) over the backoff (0.5, 1.0)
    assert "answered 429 (tenant 'default' has 2 event streams open already) 3 times in a row" in str(lost.value)
    assert len([s for s in seen if s["job"] == "full"]) == 3


def test_a_piped_epoch_line_stays_one_line_and_shows_a_warm_up_lr():
    from service.client.events import Event
    from service.client.watch import Watcher

    err = Console(file=io.StringIO(), force_terminal=False, width=80, color_system=None)
    with Watcher(err, live=False) as w:
        w.handle(Event("1", "epoch", {"member": 1, "members": 3, "epoch": 1, "epochs": 8, "train_loss": 2.412,
                                      "train_acc": 0.105, "val_loss": 2.389, "val_acc": 0.1, "lr": 1e-5}))
    lines = err.file.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].endswith("lr 1e-05"), lines
