"""The ``zoofit`` command: serve, api, worker, db, keys, demo, and the client (login, datasets, jobs, models)."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time

from models.runtime import available_cpus
from service.client import commands as client_commands
from service.config import get_settings
from service.logs import configure_logging
from service.processes import start_worker_process, stop_process
from service.queue import get_celery, worker_queues


def check_schema(command: str) -> None:
    """Exit with the reason when this process may not run on the database's schema (``service.schema``)."""
    from service.db import get_engine
    from service.schema import SchemaError

    try:
        get_engine(get_settings())
    except SchemaError as exc:
        sys.exit(f"zoofit {command}: {exc}")


def check_store(command: str) -> None:
    """Exit with the reason when the artifact store cannot be written and read (a wrong bucket, endpoint
    or key fails here, at start, not at the first upload)."""
    from service.storage import StoreUnavailable, store_for

    settings = get_settings()
    try:
        store_for(settings).check()
    except (StoreUnavailable, ValueError) as exc:
        sys.exit(f"zoofit {command}: the artifact store is not usable: {exc}")


def run_api(host: str | None = None, port: int | None = None) -> None:
    import uvicorn

    from service.app import create_app

    settings = get_settings()
    check_schema("api")
    check_store("api")
    # log_config=None: uvicorn's lines go through the root handler (service.logs); the app writes
    # its own access lines, with the request id (service.api.request_id).
    uvicorn.run(create_app(settings), host=host or settings.host, port=port or settings.port, log_level="info",
                log_config=None, access_log=False)


def run_worker(extra: list[str] | None = None) -> None:
    settings = get_settings()
    settings.ensure_dirs()
    check_schema("worker")
    check_store("worker")
    try:
        queues = worker_queues(settings)
    except ValueError as exc:
        sys.exit(f"zoofit worker: ZOOFIT_WORKER_QUEUES: {exc}")
    argv = [
        "worker",
        "--loglevel=INFO",
        f"--queues={','.join(queues)}",
        f"--concurrency={settings.worker_concurrency}",
        "--pool=prefork",
        "--without-gossip",
        "--without-mingle",
        *(extra or []),
    ]
    # The app names its worker modules (service.queue.WORKER_MODULES) rather than this CLI importing
    # them: the worker loads workers.tasks, and with it workers.celery_app's start-up reconciler.
    get_celery().worker_main(argv)


def split_threads(cores: int, concurrency: int = 1) -> tuple[int, int]:
    """Torch threads for the API's predictions and for each training task when both share ``cores``.

    Two processes that each use every core make torch's thread pools wait on each other: on
    2 cores, epochs and predictions ran up to 10x slower while the other process was busy. The API
    gets a quarter of the cores (at least 1), each of the worker's ``concurrency`` tasks a share of
    the rest (at least 1).
    """
    api = max(1, cores // 4)
    return api, max(1, (cores - api) // max(1, concurrency))


def serve(host: str | None, port: int | None) -> None:
    """The API and a worker subprocess on one machine; unless configured, they split the cores."""
    settings = get_settings()
    check_schema("serve")
    if settings.torch_threads is None and settings.predict_threads is None:
        cores = available_cpus()
        api, worker_threads = split_threads(cores, settings.worker_concurrency)
        os.environ["ZOOFIT_PREDICT_THREADS"] = str(api)
        os.environ["ZOOFIT_TORCH_THREADS"] = str(worker_threads)
        get_settings.cache_clear()
    worker = start_worker_process()
    try:
        run_api(host, port)
    finally:
        stop_process(worker, signal.SIGTERM)


def db_command(args: argparse.Namespace) -> None:
    from service.db import Base, make_engine
    from service.schema import SchemaError, current_revision, head_revision, upgrade

    settings = get_settings()
    url = settings.resolved_database_url
    if url.startswith("sqlite"):
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    engine = make_engine(url)  # not get_engine: that one checks the schema first
    try:
        if args.db_command == "upgrade":
            before, after = upgrade(engine, Base.metadata)
            if before == after:
                print(f"database schema at revision {after} (head): nothing to do")
            else:
                print(f"database schema upgraded: {before or 'none'} -> {after}")
        elif args.db_command == "current":
            head = head_revision()
            with engine.connect() as conn:
                current = current_revision(conn)
            state = "head" if current == head else f"behind: head is {head}; run `zoofit db upgrade`"
            print(f"{current or 'none'} ({state})")
    except SchemaError as exc:
        sys.exit(f"zoofit db {args.db_command}: {exc}")
    finally:
        engine.dispose()


def keys_command(args: argparse.Namespace) -> None:
    import re

    from service import auth
    from service.db import commit, session_scope
    from service.errors import ServiceError

    settings = get_settings()
    try:
        with session_scope(settings) as session:
            if args.keys_command == "create":
                if not re.match(auth.TENANT_PATTERN, args.tenant):
                    sys.exit(f"invalid tenant name {args.tenant!r}: letters, digits, '_', '.', '-' (max 64)")
                row, key = auth.create_key(session, args.tenant, admin=args.admin)
                commit(session)  # a key is shown only once it exists
                print(f"key id {row.id} for tenant {row.tenant!r}{' (admin)' if row.admin else ''}", file=sys.stderr)
                print("store it now; it is not shown again:", file=sys.stderr)
                print(key)
            elif args.keys_command == "list":
                for r in auth.list_keys(session):
                    state = "revoked" if r.revoked else "active"
                    print(f"{r.id}  zf_{r.prefix}_...  tenant={r.tenant}  admin={r.admin}  {state}")
            elif args.keys_command == "revoke":
                auth.revoke_key(session, args.key_id)
                commit(session)
                print(f"revoked {args.key_id}")
    except ServiceError as exc:
        sys.exit(f"zoofit keys {args.keys_command}: {exc.message}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="zoofit", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_ in (("serve", "API plus a training worker subprocess"), ("api", "the HTTP API only")):
        p = sub.add_parser(name, help=help_)
        p.add_argument("--host", default=None)
        p.add_argument("--port", type=int, default=None)
    sub.add_parser("worker", help="a Celery training worker (queues 'train', 'export' and 'train-cpu' or "
                   "'train-cuda' by its hardware; ZOOFIT_WORKER_QUEUES overrides)")
    db = sub.add_parser("db", help="the database schema (migrations)")
    dbsub = db.add_subparsers(dest="db_command", required=True)
    dbsub.add_parser("upgrade", help="upgrade the schema to this release's (also stamps a pre-migration database)")
    dbsub.add_parser("current", help="the schema revision of the database, and whether it is this release's")
    k = sub.add_parser("keys", help="manage API keys")
    ksub = k.add_subparsers(dest="keys_command", required=True)
    kc = ksub.add_parser("create", help="issue a key for a tenant (printed once)")
    kc.add_argument("--tenant", required=True)
    kc.add_argument("--admin", action="store_true", help="may manage keys through /v1/keys")
    ksub.add_parser("list", help="list keys (no secrets)")
    kr = ksub.add_parser("revoke", help="revoke a key by id")
    kr.add_argument("key_id")
    d = sub.add_parser("demo", help="run the main job end to end through the HTTP API")
    d.add_argument("--port", type=int, default=None, help="port for the demo's API (default: a free one)")
    d.add_argument("--per-class", type=int, default=None, help="training images per class")
    client_commands.add_commands(sub)
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "worker":  # only the worker passes extra arguments on (to Celery)
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command in client_commands.CLIENT_COMMANDS:
        sys.exit(client_commands.run(args))

    configure_logging(get_settings().log_format)
    if args.command == "serve":
        serve(args.host, args.port)
    elif args.command == "api":
        run_api(args.host, args.port)
    elif args.command == "worker":
        run_worker(extra)
    elif args.command == "db":
        db_command(args)
    elif args.command == "keys":
        keys_command(args)
    elif args.command == "demo":
        from service.demo import run_demo

        t0 = time.monotonic()
        code = run_demo(port=args.port, per_class=args.per_class)
        print(f"demo wall time: {time.monotonic() - t0:.1f} s")
        sys.exit(code)


if __name__ == "__main__":
    main()
