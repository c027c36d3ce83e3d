"""Every write is committed before its answer is sent, and files are removed only after the commit.

A commit that fails must show in the response (503 with a message), never as a 2xx for a
change the database then rolled back. The clients here keep server exceptions as responses
(``raise_server_exceptions=False``): what is checked is exactly what a real client receives.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from service.app import create_app
from service.config import Settings, get_settings
from service.db import ApiKeyRow, DatasetRow, ModelRow, get_engine, new_id, session_scope
from tests.conftest import issue_key
from tests.utils.data import animals_zip


def _client(settings: Settings, key: str) -> TestClient:
    app = create_app(settings)
    app.dependency_overrides[get_settings] = lambda: settings
    return TestClient(app, headers={"Authorization": f"Bearer {key}"}, raise_server_exceptions=False)


@contextlib.contextmanager
def failing_commits(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Session]]:
    """Every ``Session.commit`` in this block fails, as a lost database connection would."""
    calls: list[Session] = []

    def refuse(self: Session) -> None:
        calls.append(self)
        raise OperationalError("COMMIT", {}, Exception("server closed the connection unexpectedly (injected)"))

    with monkeypatch.context() as m:
        m.setattr(Session, "commit", refuse)
        yield calls


def _assert_not_saved(r) -> None:  # type: ignore[no-untyped-def]
    assert r.status_code == 503, (r.status_code, r.text)
    detail = r.json()["detail"]
    assert "not saved" in detail and "retry" in detail, detail


def _upload(c: TestClient):  # type: ignore[no-untyped-def]
    return c.post("/v1/datasets", files={"file": ("a.zip", animals_zip(3, 2), "application/zip")})


def test_revoke_answers_503_when_its_commit_fails(settings, monkeypatch):
    admin = issue_key(settings, "ops", admin=True)
    carol = issue_key(settings, "carol")
    with session_scope(settings) as s:
        carol_id = s.query(ApiKeyRow).filter_by(tenant="carol").one().id
    with _client(settings, admin) as c:
        with failing_commits(monkeypatch) as calls:
            r = c.delete(f"/v1/keys/{carol_id}")
        assert calls, "the route never committed"
        _assert_not_saved(r)
        # The key was not revoked, and nobody was told it was.
        assert c.get("/v1/datasets", headers={"Authorization": f"Bearer {carol}"}).status_code == 200


def test_create_key_answers_503_when_its_commit_fails(settings, monkeypatch):
    admin = issue_key(settings, "ops", admin=True)
    with _client(settings, admin) as c:
        with failing_commits(monkeypatch):
            r = c.post("/v1/keys", json={"tenant": "carol"})
        _assert_not_saved(r)
        assert "key" not in r.json()  # no secret handed out for a key that does not exist
        assert [k["tenant"] for k in c.get("/v1/keys").json()["data"]] == ["ops"]


def test_upload_answers_503_and_leaves_no_files_when_its_commit_fails(settings, monkeypatch):
    with _client(settings, issue_key(settings, "alice")) as c:
        with failing_commits(monkeypatch):
            r = _upload(c)
        _assert_not_saved(r)
        assert c.get("/v1/datasets").json()["count"] == 0
    assert list(settings.datasets_dir.iterdir()) == []
    assert list(settings.tmp_dir.iterdir()) == []


def test_delete_dataset_keeps_files_when_its_commit_fails(settings, monkeypatch):
    with _client(settings, issue_key(settings, "alice")) as c:
        ds = _upload(c).json()
        folder = settings.datasets_dir / ds["id"]
        before = sorted(p.relative_to(folder) for p in folder.rglob("*"))
        with failing_commits(monkeypatch):
            r = c.delete(f"/v1/datasets/{ds['id']}")
        _assert_not_saved(r)
        assert c.get(f"/v1/datasets/{ds['id']}").status_code == 200
        assert sorted(p.relative_to(folder) for p in folder.rglob("*")) == before != []
        # and with a working database the delete goes through, files included
        assert c.delete(f"/v1/datasets/{ds['id']}").status_code == 204
        assert not folder.exists()


def _stored_model(settings: Settings, tenant: str) -> tuple[str, Path]:
    model_id = new_id()
    folder = settings.models_dir / model_id
    folder.mkdir(parents=True)
    (folder / "weights.bin").write_bytes(b"\x00" * 16)
    with session_scope(settings) as s:
        s.add(ModelRow(id=model_id, tenant=tenant, job_id=new_id(), dataset_id=new_id(), classes=["a", "b"],
                       manifest={}, metrics={}, store_key=f"models/{model_id}"))
    return model_id, folder


def test_delete_model_keeps_files_when_its_commit_fails(settings, monkeypatch):
    model_id, folder = _stored_model(settings, "alice")
    with _client(settings, issue_key(settings, "alice")) as c:
        with failing_commits(monkeypatch):
            r = c.delete(f"/v1/models/{model_id}")
        _assert_not_saved(r)
        assert (folder / "weights.bin").is_file()
        with session_scope(settings) as s:
            assert s.get(ModelRow, model_id) is not None
        assert c.delete(f"/v1/models/{model_id}").status_code == 204
        assert not folder.exists()


# ------------------------------------------------------------------ a real commit-time failure


def _refuse_at_commit(settings: Settings, table: str, event: str) -> None:
    """A deferred PostgreSQL constraint trigger: the statement succeeds, the COMMIT fails."""
    with get_engine(settings).begin() as conn:
        conn.execute(text(
            "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS "
            "$$ BEGIN RAISE EXCEPTION 'refused at commit (test trigger)'; END $$"
        ))
        conn.execute(text(
            f"CREATE CONSTRAINT TRIGGER refuse AFTER {event} ON {table} "
            "DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION refuse()"
        ))


@pytest.mark.integration
def test_revoke_on_postgresql_whose_commit_fails_is_503(make_settings, pg_url):
    s = make_settings(database_url=pg_url)
    admin, carol = issue_key(s, "ops", admin=True), issue_key(s, "carol")
    with session_scope(s) as session:
        carol_id = session.query(ApiKeyRow).filter_by(tenant="carol").one().id
    _refuse_at_commit(s, "api_keys", "UPDATE")
    with _client(s, admin) as c:
        _assert_not_saved(c.delete(f"/v1/keys/{carol_id}"))
        assert c.get("/v1/datasets", headers={"Authorization": f"Bearer {carol}"}).status_code == 200


@pytest.mark.integration
def test_upload_on_postgresql_whose_commit_fails_is_503_and_leaves_nothing(make_settings, pg_url):
    s = make_settings(database_url=pg_url)
    key = issue_key(s, "alice")
    _refuse_at_commit(s, "datasets", "INSERT")
    with _client(s, key) as c:
        _assert_not_saved(_upload(c))
    with session_scope(s) as session:
        assert session.query(DatasetRow).count() == 0
    assert list(s.datasets_dir.iterdir()) == []


# ------------------------------------------------------------------ the CLI says it only once it is true


@pytest.mark.parametrize("command", ["create", "revoke"])
def test_cli_reports_a_key_change_only_after_its_commit(settings, monkeypatch, capsys, command):
    from service import cli

    issue_key(settings, "carol")
    with session_scope(settings) as s:
        carol_id = s.query(ApiKeyRow).filter_by(tenant="carol").one().id
    argv = ["keys", "create", "--tenant", "dave"] if command == "create" else ["keys", "revoke", carol_id]
    with failing_commits(monkeypatch), pytest.raises(BaseException) as info:
        cli.main(argv)
    out = capsys.readouterr()
    assert "zf_" not in out.out + out.err and "revoked" not in out.out, out
    # an error on stderr and a non-zero exit, as for any other CLI error
    assert isinstance(info.value, SystemExit) and "not saved" in str(info.value.code), info.value
    with session_scope(settings) as s:
        assert s.get(ApiKeyRow, carol_id).revoked is False
        assert s.query(ApiKeyRow).count() == 1
