"""The client's ``zoofit`` subcommands: login, datasets, jobs, models, presets.

Results go to stdout (tables, or the API's JSON with ``--json``); progress, notes and errors go to
stderr, and an error exits with status 1 after printing the API's one-line message.
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.progress import DownloadColumn, Progress, TransferSpeedColumn
from rich.table import Table

from service.client import render
from service.client.api import FIGURES, LR_FINDER, Zoofit
from service.client.credentials import NotLoggedIn, credentials_path, normalize_url, resolve, save
from service.client.errors import ApiError
from service.client.events import StreamLost
from service.client.recipe import RecipeError, build_job, load_recipe
from service.client.uploads import upload_size
from service.client.watch import FINAL_OK, watch

Command = Callable[[Zoofit, argparse.Namespace, "Io"], int]
CLIENT_COMMANDS = ("login", "datasets", "jobs", "models", "presets")


class Io:
    """Where output goes: ``out`` (stdout) for results, ``err`` (stderr) for everything else."""

    def __init__(self, out: Console | None = None, err: Console | None = None) -> None:
        # Piped, a table keeps whole ids on one line rather than fitting rich's default 80 columns.
        self.out = out or Console(highlight=False, width=None if sys.stdout.isatty() else 200)
        self.err = err or Console(stderr=True, highlight=False)

    def json(self, data: Any) -> None:
        self.out.file.write(json.dumps(data, indent=2) + "\n")

    def note(self, text: str) -> None:
        # soft_wrap: a long message stays one line (the terminal wraps it; a pipe or a log keeps it whole)
        self.err.print(text, markup=False, soft_wrap=True)


# -- datasets ---------------------------------------------------------------------------------------

def datasets_upload(zf: Zoofit, args: argparse.Namespace, io: Io) -> int:
    total = upload_size(args.path)
    bar = Progress(*Progress.get_default_columns()[:2], DownloadColumn(), TransferSpeedColumn(),
                   console=io.err, disable=not io.err.is_terminal, transient=True)
    with bar:
        task = bar.add_task(f"uploading {Path(args.path).name}", total=total)
        ds = zf.upload_dataset(args.path, name=args.name, on_bad_file="skip" if args.skip_bad else "reject",
                               on_bytes=lambda n: bar.advance(task, n))
    if args.json:
        io.json(ds)
    else:
        io.out.print(render.dataset_table(ds))
    return 0


def datasets_ls(zf: Zoofit, args: argparse.Namespace, io: Io) -> int:
    body = zf.datasets(limit=args.limit)
    io.json(body) if args.json else io.out.print(render.datasets_table(body))
    return 0


def datasets_show(zf: Zoofit, args: argparse.Namespace, io: Io) -> int:
    ds = zf.dataset(args.id)
    io.json(ds) if args.json else io.out.print(render.dataset_table(ds))
    return 0


# -- jobs -------------------------------------------------------------------------------------------

def _watch(zf: Zoofit, job_id: str, io: Io, out: Console) -> int:
    done = watch(zf.events(job_id), job_id, io.err, out)
    if done.get("status") != FINAL_OK:
        return 1
    # The done event carries the figures; the time-budget plan is in the job's report (as jobs show prints it).
    plan = render.plan_table(zf.job(job_id).get("metrics") or {})
    if plan is not None:
        out.print(plan)
    return 0


def jobs_submit(zf: Zoofit, args: argparse.Namespace, io: Io) -> int:
    preset = zf.preset(args.preset)["job"] if args.preset else {}
    recipe = load_recipe(args.file) if args.file else {}
    job = zf.create_job(build_job(preset, recipe, args.set or (), args.dataset))
    if args.json:
        io.json(job)
    else:
        io.out.print(f"submitted job {job['id']} ({job['status']})", markup=False)
    # With --json, stdout holds only the job's JSON: the summary table goes to stderr.
    return _watch(zf, job["id"], io, io.err if args.json else io.out) if args.watch else 0


def jobs_watch(zf: Zoofit, args: argparse.Namespace, io: Io) -> int:
    return _watch(zf, args.id, io, io.out)


def jobs_ls(zf: Zoofit, args: argparse.Namespace, io: Io) -> int:
    body = zf.jobs(status=args.status, limit=args.limit)
    io.json(body) if args.json else io.out.print(render.jobs_table(body))
    return 0


def _show(io: Io, table: Table, report: dict[str, Any]) -> None:
    """Print ``table``, then the report's time-budget plan when it has one."""
    io.out.print(table)
    plan = render.plan_table(report)
    if plan is not None:
        io.out.print(plan)


def jobs_show(zf: Zoofit, args: argparse.Namespace, io: Io) -> int:
    job = zf.job(args.id)
    io.json(job) if args.json else _show(io, render.job_table(job), job.get("metrics") or {})
    return 0


def jobs_cancel(zf: Zoofit, args: argparse.Namespace, io: Io) -> int:
    job = zf.cancel_job(args.id)
    if args.json:
        io.json(job)
    else:
        io.out.print(f"job {job['id']}: {job['status']}"
                     + (" (cancel requested)" if job.get("cancel_requested") else ""), markup=False)
    return 0


# -- models -----------------------------------------------------------------------------------------

def models_ls(zf: Zoofit, args: argparse.Namespace, io: Io) -> int:
    body = zf.models(limit=args.limit)
    io.json(body) if args.json else io.out.print(render.models_table(body))
    return 0


def models_show(zf: Zoofit, args: argparse.Namespace, io: Io) -> int:
    m = zf.model(args.id)
    io.json(m) if args.json else _show(io, render.model_table(m), m.get("metrics") or {})
    return 0


def models_report(zf: Zoofit, args: argparse.Namespace, io: Io) -> int:
    report = zf.report(args.id)
    io.json(report) if args.json else _show(io, render.report_table(report), report)
    if args.save_figures:
        folder = Path(args.save_figures)
        folder.mkdir(parents=True, exist_ok=True)
        for name in (*FIGURES, LR_FINDER) if report.get("lr_finder") else FIGURES:
            path = folder / f"{name}.png"
            path.write_bytes(zf.figure(args.id, name))
            io.note(f"saved {path}")
    return 0


def models_predict(zf: Zoofit, args: argparse.Namespace, io: Io) -> int:
    body = zf.predict(args.id, args.images, top_k=args.top_k, tta=args.tta)
    io.json(body) if args.json else io.out.print(render.predictions_table(body))
    return 0


def models_export(zf: Zoofit, args: argparse.Namespace, io: Io) -> int:
    export = zf.create_export(args.id, args.format, args.quantization)
    deadline = time.monotonic() + args.timeout
    with io.err.status(f"building the {args.format} export", spinner="dots") if io.err.is_terminal \
            else contextlib.nullcontext():
        while export["status"] in ("queued", "running"):
            if time.monotonic() > deadline:
                io.note(f"export {export['id']} is still {export['status']} after {args.timeout:g} s")
                return 1
            time.sleep(args.poll)
            export = zf.export(args.id, export["id"])
    if export["status"] != "succeeded":
        io.note(f"export {export['id']} failed: {export.get('error')}")
        if args.json:
            io.json(export)
        return 1
    folder = Path(args.output)
    folder.mkdir(parents=True, exist_ok=True)
    q = "" if export["quantization"] == "none" else f"-{export['quantization']}"
    path = zf.download_export(args.id, export["id"], folder / f"zoofit-{args.id}-{export['format']}{q}.zip")
    if args.json:
        io.json({**export, "saved": str(path)})
    else:
        io.out.print(str(path), markup=False)
        fid = (export.get("details") or {}).get("fidelity")
        if fid:
            io.note(f"checked against the service: max |p difference| {fid['max_abs_diff']:.1e}, "
                    f"top-1 agreement {100 * fid['top1_agreement']:.0f}%")
        q8 = (export.get("details") or {}).get("int8")
        if q8:
            io.note(f"int8 validation top-1: {100 * q8['fp32_top1']:.1f}% -> {100 * q8['int8_top1']:.1f}% "
                    f"({q8['delta_points']:+.2f} points)")
    return 0


def presets_ls(zf: Zoofit, args: argparse.Namespace, io: Io) -> int:
    body = zf.presets()
    io.json(body) if args.json else io.out.print(render.presets_table(body))
    return 0


# -- login ------------------------------------------------------------------------------------------

def _read_key() -> str:
    key = os.environ.get("ZOOFIT_API_KEY")
    if key:
        return key.strip()
    if sys.stdin.isatty():
        return getpass.getpass("API key: ").strip()
    return sys.stdin.readline().strip()


def login(args: argparse.Namespace, io: Io, http: httpx.Client | None = None) -> int:
    url = normalize_url(args.url_arg)
    key = _read_key()
    if not key:
        io.note("zoofit: no API key: pipe it on stdin or set ZOOFIT_API_KEY")
        return 1
    with Zoofit(url, key, http=http) as zf:
        zf.jobs(limit=1)  # an authenticated call: a wrong key answers 401 and nothing is stored
    path = credentials_path()
    save(path, url, key)
    io.note(f"logged in to {url}; the key is stored in {path}")
    return 0


# -- the parser -------------------------------------------------------------------------------------

def add_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the client's subcommands to the ``zoofit`` parser's ``sub``."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", default=None, help="the API (default: ZOOFIT_URL, else the stored login)")
    as_json = argparse.ArgumentParser(add_help=False)
    as_json.add_argument("--json", action="store_true", help="print the API's JSON on stdout, nothing else")
    listing = argparse.ArgumentParser(add_help=False, parents=[common, as_json])
    listing.add_argument("--limit", type=int, default=100)

    def leaf(group: argparse._SubParsersAction, name: str, fn: Command, help_: str,  # type: ignore[type-arg]
             parents: list[argparse.ArgumentParser]) -> argparse.ArgumentParser:
        p = group.add_parser(name, help=help_, parents=parents)
        p.set_defaults(client_run=fn)
        return p

    lg = sub.add_parser("login", help="store the API's URL and a key (read from stdin or ZOOFIT_API_KEY)")
    lg.add_argument("url_arg", metavar="URL")
    lg.set_defaults(client_run=None)

    ds = sub.add_parser("datasets", help="upload and list datasets").add_subparsers(dest="sub", required=True)
    up = leaf(ds, "upload", datasets_upload, "upload an archive, or a folder of <class>/<image> (zipped on the fly)",
              [common, as_json])
    up.add_argument("path")
    up.add_argument("--name", default=None)
    up.add_argument("--skip-bad", action="store_true", help="skip files that are not images instead of refusing")
    leaf(ds, "ls", datasets_ls, "list datasets", [listing])
    leaf(ds, "show", datasets_show, "one dataset's classes and counts", [common, as_json]).add_argument("id")

    jb = sub.add_parser("jobs", help="submit, watch and manage training jobs").add_subparsers(dest="sub", required=True)
    sm = leaf(jb, "submit", jobs_submit, "submit a job: preset, then recipe file, then --set", [common, as_json])
    sm.add_argument("-f", "--file", default=None, help="a YAML or JSON recipe of job fields")
    sm.add_argument("--preset", default=None, help="start from a named preset (zoofit presets)")
    sm.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a field, e.g. optimizer.lr=0.01")
    sm.add_argument("--dataset", default=None, help="the dataset id (overrides the recipe's dataset_id)")
    sm.add_argument("--watch", action="store_true", help="follow the job until it ends")
    leaf(jb, "watch", jobs_watch, "follow a job's progress until it ends", [common]).add_argument("id")
    ls = leaf(jb, "ls", jobs_ls, "list jobs", [listing])
    ls.add_argument("--status", default=None)
    leaf(jb, "show", jobs_show, "one job", [common, as_json]).add_argument("id")
    leaf(jb, "cancel", jobs_cancel, "cancel a queued or running job", [common, as_json]).add_argument("id")

    md = sub.add_parser("models", help="trained models: reports and predictions").add_subparsers(dest="sub",
                                                                                              required=True)
    leaf(md, "ls", models_ls, "list models", [listing])
    leaf(md, "show", models_show, "one model", [common, as_json]).add_argument("id")
    rp = leaf(md, "report", models_report, "per-class precision, recall, F1 and support; a time budget's plan",
              [common, as_json])
    rp.add_argument("id")
    rp.add_argument("--save-figures", metavar="DIR", default=None,
                    help="also save the report's PNGs in DIR (the lr finder's too, when it ran)")
    pr = leaf(md, "predict", models_predict, "top-k labels of image files", [common, as_json])
    pr.add_argument("id")
    pr.add_argument("images", nargs="+")
    pr.add_argument("--top-k", type=int, default=5)
    pr.add_argument("--tta", default="none", help="test-time augmentation: none, hflip or five_crop")

    ex = leaf(md, "export", models_export, "export a model as a zip bundle (waits for the build, then downloads)",
              [common, as_json])
    ex.add_argument("id")
    ex.add_argument("--format", required=True, choices=["onnx", "torchscript", "safetensors"])
    ex.add_argument("--quantization", default="none", choices=["none", "int8_dynamic", "int8_static"],
                    help="ONNX only; int8_static is calibrated on the training images")
    ex.add_argument("-o", "--output", default=".", metavar="DIR", help="where the zip goes (default: here)")
    ex.add_argument("--timeout", type=float, default=1800.0, help="seconds to wait for the build")
    ex.add_argument("--poll", type=float, default=1.0, help=argparse.SUPPRESS)

    leaf(sub, "presets", presets_ls, "named starting recipes", [common, as_json])


def run(args: argparse.Namespace, io: Io | None = None, http: httpx.Client | None = None) -> int:
    """Run a parsed client subcommand; the exit status (0 ok, 1 an error or a job that did not succeed)."""
    io = io or Io()
    try:
        if args.command == "login":
            return login(args, io, http)
        target = resolve(args.url)
        with Zoofit(target.url, target.key, http=http) as zf:
            return int(args.client_run(zf, args, io))
    except ApiError as exc:
        retry = f" (the API asks to retry after {exc.retry_after:.0f} s)" if exc.retry_after is not None else ""
        io.note(f"zoofit: {exc.message}{retry}")
    except httpx.TransportError as exc:
        io.note(f"zoofit: cannot reach the API: {exc.__class__.__name__}: {exc}")
    except (NotLoggedIn, RecipeError, StreamLost, RuntimeError, ValueError, OSError) as exc:
        io.note(f"zoofit: {exc}")
    except KeyboardInterrupt:
        # Only the client stops: a submitted job keeps running (zoofit jobs cancel stops it).
        io.note("zoofit: interrupted")
        return 130
    return 1
