"""The store contract (service.storage.base), held by every store: the local folder and S3 (moto over HTTP)."""

from __future__ import annotations

import base64
import hashlib
import os
import threading
import time
from pathlib import Path

import pytest
from botocore.exceptions import ClientError
from botocore.stub import Stubber

import service.storage.s3 as s3_module
from service.config import Settings
from service.storage import KeyMissing, Store, StoreUnavailable, open_store
from service.storage.local import LocalStore
from service.storage.s3 import S3Store
from tests.utils.s3 import PREFIX, bucket_keys, s3_client
from tests.utils.server import free_port

BAD_KEYS = ["../x", "/abs", "a//b", "", "a/../b", "a/./b", "a\\b"]
SECRET = "do-not-print-this-s3cret"


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    if request.param == "local":
        return LocalStore(tmp_path / "store")
    settings: Settings = request.getfixturevalue("s3_settings")
    return open_store(settings)


@pytest.fixture
def s3(s3_settings: Settings, s3_settings_env: dict[str, str]) -> tuple[S3Store, str, str]:
    """(the store, the server's endpoint, the bucket)."""
    store = open_store(s3_settings)
    assert isinstance(store, S3Store)
    return store, s3_settings_env["ZOOFIT_S3_ENDPOINT_URL"], store.bucket


def _tree(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


def _keys(store: Store, prefix: str) -> list[str]:
    return [o.key for o in store.list(prefix)]


# round trips


def test_bytes_round_trip_and_overwrite(store: Store) -> None:
    store.put_bytes("models/m1/manifest.json", b'{"a": 1}')
    assert store.get_bytes("models/m1/manifest.json") == b'{"a": 1}'
    first = store.info("models/m1/manifest.json")
    assert (first.key, first.size) == ("models/m1/manifest.json", 8) and first.version
    store.put_bytes("models/m1/manifest.json", b'{"a": 22}')
    assert store.get_bytes("models/m1/manifest.json") == b'{"a": 22}'
    second = store.info("models/m1/manifest.json")
    assert second.size == 9 and second.version != first.version
    store.put_bytes("empty", b"")
    assert store.get_bytes("empty") == b"" and store.info("empty").size == 0


def test_files_round_trip_small_and_multipart(store: Store, tmp_path: Path) -> None:
    small = os.urandom(100_000)
    big = os.urandom(12 * 1024 * 1024)  # above boto3's 8 MB multipart threshold: two parts up, two ranges down
    (tmp_path / "small.bin").write_bytes(small)
    (tmp_path / "big.bin").write_bytes(big)
    store.put_file("datasets/d1/small.bin", tmp_path / "small.bin")
    store.put_file("checkpoints/j1/state.safetensors", tmp_path / "big.bin")
    assert (tmp_path / "small.bin").exists()  # put_file copies
    out = tmp_path / "out" / "deeper"  # a folder that does not exist yet
    store.get_file("datasets/d1/small.bin", out / "small.bin")
    store.get_file("checkpoints/j1/state.safetensors", out / "big.bin")
    assert (out / "small.bin").read_bytes() == small
    assert (out / "big.bin").read_bytes() == big
    assert store.info("checkpoints/j1/state.safetensors").size == len(big)
    assert sorted(p.name for p in out.iterdir()) == ["big.bin", "small.bin"]  # no temporary files left


def test_put_file_overwrites_and_get_file_replaces_dest(store: Store, tmp_path: Path) -> None:
    (tmp_path / "v1").write_bytes(b"one")
    (tmp_path / "v2").write_bytes(b"two!")
    store.put_file("k/f", tmp_path / "v1")
    store.put_file("k/f", tmp_path / "v2")
    dest = tmp_path / "dest"
    dest.write_bytes(b"old local content")
    store.get_file("k/f", dest)
    assert dest.read_bytes() == b"two!"


def test_open_read_streams_the_object(store: Store) -> None:
    data = os.urandom(300_000)
    store.put_bytes("a/stream", data)
    f = store.open_read("a/stream")
    try:
        head = f.read(1000)
        rest = f.read()
    finally:
        f.close()
    assert head + rest == data and len(head) == 1000


# missing keys


def test_a_missing_key_is_key_missing_everywhere(store: Store, tmp_path: Path) -> None:
    store.put_bytes("there/x", b"x")
    for call in (lambda k: store.get_bytes(k), lambda k: store.info(k), lambda k: store.open_read(k)):
        with pytest.raises(KeyMissing) as err:
            call("there/y")
        assert err.value.key == "there/y"
    assert store.exists("there/x") and not store.exists("there/y") and not store.exists("there")
    store.delete("there/y")  # a missing one is no error
    assert store.exists("there/x")


def test_get_file_of_a_missing_key_leaves_nothing_beside_dest(store: Store, tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(KeyMissing):
        store.get_file("no/such", out / "new.bin")
    assert not out.exists() or list(out.iterdir()) == []
    (out / "kept.bin").parent.mkdir(exist_ok=True)
    (out / "kept.bin").write_bytes(b"keep me")
    with pytest.raises(KeyMissing):
        store.get_file("no/such", out / "kept.bin")
    assert [p.name for p in out.iterdir()] == ["kept.bin"] and (out / "kept.bin").read_bytes() == b"keep me"


# listing and deleting


def test_list_is_recursive_sorted_relative_and_stops_at_the_prefix_boundary(store: Store) -> None:
    objects = {"a/1": b"1", "a/b/2": b"22", "a/b/c/3": b"333", "a/Z": b"z", "a/_u": b"u", "a/b-x": b"bx",
               "ab/x": b"no", "a.txt": b"no", "b/1": b"no"}
    for key, data in objects.items():
        store.put_bytes(key, data)
    listed = list(store.list("a"))
    expected = sorted(["a/1", "a/b/2", "a/b/c/3", "a/Z", "a/_u", "a/b-x"])
    assert [o.key for o in listed] == expected
    assert {o.key: o.size for o in listed} == {k: len(objects[k]) for k in expected}
    assert all(o.version for o in listed)
    assert _keys(store, "a/b") == ["a/b/2", "a/b/c/3"]  # not a/b-x
    assert _keys(store, "a/1") == []  # an object is not a prefix
    assert _keys(store, "nothing/here") == []


def test_delete_and_delete_tree(store: Store) -> None:
    for key in ("t/1", "t/2/3", "t/2/4/5", "tt/keep", "t.keep"):
        store.put_bytes(key, b"x")
    store.delete("t/1")
    assert not store.exists("t/1")
    assert store.delete_tree("t") == 2  # t/2/3 and t/2/4/5, nothing beside the prefix
    assert _keys(store, "t") == [] and not store.exists("t/2/3")
    assert store.exists("tt/keep") and store.exists("t.keep")
    assert store.delete_tree("t") == 0
    assert store.delete_tree("never/was") == 0


# trees


def test_put_tree_stores_every_regular_file_and_consumes_the_source(store: Store, tmp_path: Path) -> None:
    files = {"a.txt": b"A", "sub/b.bin": os.urandom(5000), "sub/deeper/c": b"", "sub/deeper/d e.jpg": b"D"}
    src = _tree(tmp_path / "upload", files)
    outside = tmp_path / "outside.txt"
    outside.write_bytes(b"not in the tree")
    (src / "link.txt").symlink_to(outside)
    (src / "linkdir").symlink_to(tmp_path / "upload" / "sub")
    assert store.put_tree("datasets/d7", src) == len(files)
    assert not src.exists() or not any(p.is_file() and not p.is_symlink() for p in src.rglob("*"))
    assert _keys(store, "datasets/d7") == sorted(f"datasets/d7/{rel}" for rel in files)
    for rel, data in files.items():
        assert store.get_bytes(f"datasets/d7/{rel}") == data
    assert not store.exists("datasets/d7/link.txt") and not store.exists("datasets/d7/linkdir/b.bin")


def test_put_tree_refuses_an_existing_tree(store: Store, tmp_path: Path) -> None:
    store.put_bytes("models/m/old.bin", b"old")
    src = _tree(tmp_path / "new", {"new.bin": b"new"})
    with pytest.raises(FileExistsError):
        store.put_tree("models/m", src)
    assert _keys(store, "models/m") == ["models/m/old.bin"]
    assert (src / "new.bin").read_bytes() == b"new"  # not consumed


# keys and health


@pytest.mark.parametrize("bad", BAD_KEYS)
def test_bad_keys_are_value_errors(store: Store, tmp_path: Path, bad: str) -> None:
    (tmp_path / "f").write_bytes(b"f")
    (tmp_path / "tree").mkdir()
    calls = [
        lambda: store.put_bytes(bad, b"x"), lambda: store.put_file(bad, tmp_path / "f"),
        lambda: store.get_bytes(bad), lambda: store.get_file(bad, tmp_path / "out"),
        lambda: store.open_read(bad), lambda: store.info(bad), lambda: store.exists(bad),
        lambda: list(store.list(bad)), lambda: store.delete(bad), lambda: store.delete_tree(bad),
        lambda: store.put_tree(bad, tmp_path / "tree"),
    ]
    for i, call in enumerate(calls):
        with pytest.raises(ValueError):
            call()
        assert not (tmp_path / "out").exists(), i


def test_check_passes_and_leaves_nothing(store: Store) -> None:
    store.check()
    store.check()
    assert _keys(store, "_zoofit") == []


# S3 only


def test_s3_keys_live_under_the_prefix_and_the_url_names_no_secret(s3: tuple[S3Store, str, str]) -> None:
    store, endpoint, bucket = s3
    assert store.url == f"s3://{bucket}/{PREFIX}"
    secret = S3Store(bucket=bucket, prefix=PREFIX, endpoint_url=endpoint, access_key_id="id", secret_access_key=SECRET)
    assert secret.url == store.url and SECRET not in repr(secret) and SECRET not in str(vars(secret).get("url"))
    store.put_bytes("a/1", b"1")
    client = s3_client(endpoint)
    # the same names outside the store's prefix are not the store's
    client.put_object(Bucket=bucket, Key="a/2", Body=b"outside")
    client.put_object(Bucket=bucket, Key=f"{PREFIX}x/a/3", Body=b"outside")
    client.put_object(Bucket=bucket, Key=f"{PREFIX}/a/dir/", Body=b"")  # a console's "folder" marker
    assert bucket_keys(endpoint, bucket) == sorted(["a/2", f"{PREFIX}/a/1", f"{PREFIX}/a/dir/", f"{PREFIX}x/a/3"])
    assert _keys(store, "a") == ["a/1"]
    assert store.local_path("a/1") is None
    assert store.delete_tree("a") == 2  # the marker goes with the tree
    assert bucket_keys(endpoint, bucket) == sorted(["a/2", f"{PREFIX}x/a/3"])


def test_s3_store_without_a_prefix(s3: tuple[S3Store, str, str]) -> None:
    _, endpoint, bucket = s3
    store = S3Store(bucket=bucket, endpoint_url=endpoint, region="us-east-1",
                    access_key_id="test", secret_access_key="test")
    assert store.url == f"s3://{bucket}"
    store.put_bytes("x/y", b"xy")
    assert bucket_keys(endpoint, bucket) == ["x/y"] and _keys(store, "x") == ["x/y"]


def test_s3_missing_bucket_is_unavailable_and_says_so(s3_server: str) -> None:
    store = S3Store(bucket="no-such-bucket-here", prefix="p", endpoint_url=s3_server, region="us-east-1",
                    access_key_id="test", secret_access_key=SECRET)
    for call in (store.check, lambda: store.put_bytes("k", b"x"), lambda: store.get_bytes("k"),
                 lambda: list(store.list("k")), lambda: store.delete_tree("k")):
        with pytest.raises(StoreUnavailable) as err:
            call()
        message = str(err.value)
        assert message.startswith("s3://no-such-bucket-here/p: ") and "does not exist" in message, message
        assert SECRET not in message and "\n" not in message


def test_s3_unreachable_endpoint_is_unavailable_and_says_where(tmp_path: Path) -> None:
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    store = S3Store(bucket="b", prefix="p", endpoint_url=endpoint, region="us-east-1",
                    access_key_id="test", secret_access_key=SECRET)
    started = time.monotonic()
    with pytest.raises(StoreUnavailable) as err:
        store.check()
    assert time.monotonic() - started < 30  # a few quick retries, not a hang
    message = str(err.value)
    assert message.startswith("s3://b/p: cannot reach " + endpoint), message
    assert SECRET not in message and "\n" not in message
    with pytest.raises(StoreUnavailable):
        store.get_file("k", tmp_path / "out.bin")
    assert not (tmp_path / "out.bin").exists() and list(tmp_path.iterdir()) == []


def test_s3_refused_credentials_are_unavailable_without_the_secret(s3: tuple[S3Store, str, str]) -> None:
    _, endpoint, bucket = s3
    store = S3Store(bucket=bucket, endpoint_url=endpoint, region="us-east-1",
                    access_key_id="AKIDEXAMPLE", secret_access_key=SECRET)
    with Stubber(store._client) as stub:  # moto accepts any key: the refusal is played back
        stub.add_client_error("put_object", service_error_code="SignatureDoesNotMatch", http_status_code=403,
                              service_message=f"The request signature we calculated does not match ({SECRET})")
        with pytest.raises(StoreUnavailable) as err:
            store.check()
    message = str(err.value)
    assert "access denied (SignatureDoesNotMatch" in message and SECRET not in message and "***" in message


def test_s3_no_credentials_at_all_is_unavailable(s3_server: str, monkeypatch: pytest.MonkeyPatch,
                                                 tmp_path: Path) -> None:
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    store = S3Store(bucket="b", endpoint_url=s3_server, region="us-east-1")
    with pytest.raises(StoreUnavailable, match="no S3 credentials"):
        store.check()
    with pytest.raises(ValueError, match="go together"):
        S3Store(bucket="b", endpoint_url=s3_server, access_key_id="only-the-id")


def test_s3_put_tree_that_fails_midway_leaves_nothing(s3: tuple[S3Store, str, str], tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    store, endpoint, bucket = s3
    files = {f"class{i % 3}/img{i:03d}.png": os.urandom(2000) for i in range(40)}
    src = _tree(tmp_path / "upload", files)
    real_put = store._client.put_object
    lock = threading.Lock()
    calls = {"n": 0, "ok": 0}

    def flaky_put(**kwargs):
        with lock:
            calls["n"] += 1
            n = calls["n"]
        if n == 3:
            raise ClientError({"Error": {"Code": "InternalError", "Message": "disk on fire"}}, "PutObject")
        out = real_put(**kwargs)
        with lock:
            calls["ok"] += 1
        return out

    monkeypatch.setattr(store._client, "put_object", flaky_put)
    with pytest.raises(StoreUnavailable, match="disk on fire"):
        store.put_tree("datasets/d9", src)
    assert calls["ok"] >= 2  # some did land before the failure ...
    assert bucket_keys(endpoint, bucket, f"{PREFIX}/") == []  # ... and were removed again
    assert sorted(p.relative_to(src).as_posix() for p in src.rglob("*") if p.is_file()) == sorted(files)
    monkeypatch.undo()
    assert store.put_tree("datasets/d9", src) == len(files)  # the source is intact: a retry works
    assert len(bucket_keys(endpoint, bucket, f"{PREFIX}/datasets/d9/")) == len(files)


def test_s3_delete_tree_goes_in_batches_with_content_md5(s3: tuple[S3Store, str, str],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    store, endpoint, bucket = s3
    for i in range(5):
        store.put_bytes(f"t/{i}", b"x")
    monkeypatch.setattr(s3_module, "_DELETE_BATCH", 2)
    sent: list[tuple[int, bool]] = []

    def capture(request, **_):
        body = request.body if isinstance(request.body, bytes) else bytes(request.body or b"")
        md5 = base64.b64encode(hashlib.md5(body).digest()).decode()
        header = request.headers.get("Content-MD5") or b""
        sent.append((body.count(b"<Key>"), (header.decode() if isinstance(header, bytes) else header) == md5))

    store._client.meta.events.register("before-send.s3.DeleteObjects", capture)
    assert store.delete_tree("t") == 5
    assert sent == [(2, True), (2, True), (1, True)]
    assert bucket_keys(endpoint, bucket) == []


def test_s3_a_forked_child_gets_a_client_of_its_own(s3: tuple[S3Store, str, str]) -> None:
    store, _, _ = s3
    store.put_bytes("f/1", b"parent")  # the parent's pool now holds a connection
    inherited = store._client
    pid = os.fork()
    if pid == 0:  # the child: a fresh client, and it works
        code = 1
        try:
            fresh = store._client
            store.put_bytes("f/2", b"child")
            code = 0 if fresh is not inherited and store.get_bytes("f/1") == b"parent" else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert store._client is inherited and store.get_bytes("f/2") == b"child"
