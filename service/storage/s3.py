"""The shared store: an S3-compatible bucket (AWS S3, MinIO), through boto3.

Keys live under ``prefix/`` in the bucket. One boto3 client serves every thread (boto3 clients are
thread-safe; sessions are not). Single objects appear whole or not at all: a plain PUT is atomic
on S3, and a multipart upload (``upload_file`` above its threshold) is published by its
CompleteMultipartUpload. Errors come out as the store's own: ``KeyMissing`` for an absent object,
``StoreUnavailable`` (one line: the store's URL and the cause, never the secret) for a missing
bucket, refused credentials or an endpoint that does not answer.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import shutil
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO, cast

import boto3
from boto3.exceptions import RetriesExceededError, S3UploadFailedError
from boto3.s3.transfer import TransferConfig, create_transfer_manager
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    EndpointConnectionError,
    NoCredentialsError,
    PartialCredentialsError,
    ReadTimeoutError,
)
from s3transfer.exceptions import RetriesExceededError as TransferRetriesExceededError

from service.storage.base import KeyMissing, ObjectInfo, StoreUnavailable, check_key, written_whole

_MISSING = {"NoSuchKey", "404", "NotFound"}
_DENIED = {"403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken",
           "ExpiredToken", "AllAccessDisabled", "AccountProblem"}
_DELETE_BATCH = 1000  # the most keys one DeleteObjects request takes



class S3Store:
    """Objects in ``bucket`` under ``prefix`` (empty: the bucket's root).

    Args:
        bucket: the bucket's name; it must exist (``check()`` says so at start-up).
        prefix: keys are stored as ``<prefix>/<key>``.
        endpoint_url: the S3 API's address for a store that is not AWS (MinIO, moto); path-style
            addressing is used then.
        region: the bucket's region (AWS); None: boto3's own lookup.
        access_key_id: with ``secret_access_key``; both None: boto3's own lookup (env, profile, role).
        secret_access_key: goes with ``access_key_id``; never in ``url``, ``repr`` or an error message.
        transfer_threads: requests in flight at once when one big file or a whole tree moves.
        max_attempts: attempts per request, the first included (botocore's "standard" retry mode:
            throttling, 5xx and connection errors are retried with jittered backoff).
    """

    def __init__(
        self,
        *,
        bucket: str,
        prefix: str = "",
        endpoint_url: str | None = None,
        region: str | None = None,
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
        transfer_threads: int = 16,
        max_attempts: int = 3,
    ) -> None:
        if not bucket:
            raise ValueError("an S3 store needs a bucket")
        if (access_key_id is None) != (secret_access_key is None):
            raise ValueError("the S3 access key id and secret access key go together: give both or neither")
        prefix = prefix.strip("/")
        self.bucket = bucket
        self.prefix = check_key(prefix) if prefix else ""
        self.url = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        self.endpoint_url = endpoint_url
        self._base = f"{self.prefix}/" if self.prefix else ""
        self._secret = secret_access_key  # to scrub it from error messages
        self.transfer_threads = transfer_threads
        options: dict[str, Any] = {}
        if endpoint_url:
            # MinIO and other S3-compatible stores: bucket in the path (no wildcard DNS needed), and
            # checksums only where the API requires them (botocore >= 1.36 otherwise sends trailing
            # CRC checksums in aws-chunked bodies, which several of them refuse).
            options.update(
                s3={"addressing_style": "path"},
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
            )
        config = Config(
            retries={"mode": "standard", "total_max_attempts": max_attempts},
            max_pool_connections=max(10, 2 * transfer_threads),
            connect_timeout=10,
            read_timeout=60,
            **options,
        )
        self._client_args: dict[str, Any] = dict(
            endpoint_url=endpoint_url,
            region_name=region,
            aws_access_key_id=access_key_id,
            aws_secret_access_key=secret_access_key,
            config=config,
        )
        self._transfer = TransferConfig(max_concurrency=transfer_threads)
        self._pid = os.getpid()
        self._client_now = self._new_client()

    def _new_client(self) -> Any:
        client = boto3.session.Session().client("s3", **self._client_args)
        if self.endpoint_url:
            client.meta.events.register("before-call.s3.DeleteObjects", _add_content_md5)
        return client

    @property
    def _client(self) -> Any:
        """This process's boto3 client: a forked child (Celery's prefork pool) makes its own, since
        the parent's connection pool holds sockets that the two processes must not share."""
        if self._pid != os.getpid():
            self._client_now = self._new_client()
            self._pid = os.getpid()
        return self._client_now

    def __repr__(self) -> str:
        return f"S3Store({self.url!r}, endpoint_url={self.endpoint_url!r})"

    # keys and errors

    def _key(self, key: str) -> str:
        return self._base + check_key(key)

    def _relative(self, s3_key: str) -> str | None:
        """The store key of a bucket key under the prefix, None for one no store key names."""
        rel = s3_key[len(self._base):]
        try:
            return check_key(rel) if rel == rel.rstrip("/") else None  # "folder/" markers are not objects
        except ValueError:
            return None

    @contextlib.contextmanager
    def _errors(self, key: str | None = None) -> Iterator[None]:
        """botocore's errors as the store's: KeyMissing for ``key``'s absence, else StoreUnavailable."""
        try:
            yield
        except S3UploadFailedError as exc:
            cause = exc.__cause__ or exc.__context__
            if isinstance(cause, ClientError):
                raise self._client_error(cause, key) from cause
            raise StoreUnavailable(self._message(str(exc))) from exc
        except ClientError as exc:
            raise self._client_error(exc, key) from exc
        except (EndpointConnectionError, ConnectionClosedError, ConnectTimeoutError, ReadTimeoutError) as exc:
            raise StoreUnavailable(self._message(f"cannot reach {self._endpoint()} ({exc})")) from exc
        except (RetriesExceededError, TransferRetriesExceededError) as exc:
            raise StoreUnavailable(self._message(f"gave up after retries ({exc.last_exception})")) from exc
        except (NoCredentialsError, PartialCredentialsError) as exc:
            raise StoreUnavailable(self._message(
                f"no S3 credentials ({exc}): set ZOOFIT_S3_ACCESS_KEY_ID and ZOOFIT_S3_SECRET_ACCESS_KEY"
            )) from exc
        except BotoCoreError as exc:
            raise StoreUnavailable(self._message(str(exc))) from exc

    def _client_error(self, exc: ClientError, key: str | None) -> Exception:
        err = exc.response.get("Error", {})
        code = str(err.get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if key is not None and (code in _MISSING or (status == 404 and code != "NoSuchBucket")):
            return KeyMissing(key)
        if code == "NoSuchBucket":
            return StoreUnavailable(self._message(f"bucket {self.bucket!r} does not exist"))
        text = str(err.get("Message") or exc)
        if code in _DENIED or status == 403:
            return StoreUnavailable(self._message(
                f"access denied ({code or status}: {text}); check the access key, secret and bucket policy"
            ))
        op = getattr(exc, "operation_name", "request")
        return StoreUnavailable(self._message(f"{op} failed ({code or status}: {text})"))

    def _message(self, cause: str) -> str:
        text = f"{self.url}: {cause}"
        if self._secret:
            text = text.replace(self._secret, "***")
        return " ".join(text.split())  # one line

    def _endpoint(self) -> str:
        return self.endpoint_url or str(self._client.meta.endpoint_url)

    # objects

    def put_file(self, key: str, src: Path) -> None:
        s3_key = self._key(key)
        with self._errors():
            self._client.upload_file(os.fspath(src), self.bucket, s3_key, Config=self._transfer)

    def put_bytes(self, key: str, data: bytes) -> None:
        s3_key = self._key(key)
        with self._errors():
            self._client.put_object(Bucket=self.bucket, Key=s3_key, Body=data)

    def get_file(self, key: str, dest: Path) -> None:
        s3_key = self._key(key)
        with written_whole(Path(dest)) as tmp, self._errors(key):
            obj = self._client.get_object(Bucket=self.bucket, Key=s3_key)
            body = obj["Body"]
            try:
                if int(obj.get("ContentLength", 0)) <= self._transfer.multipart_threshold:
                    # One GET: most objects are small (images), and the managed download's
                    # HEAD and per-call thread pool cost more than the transfer itself.
                    with open(tmp, "wb") as f:
                        shutil.copyfileobj(body, f, 1024 * 1024)
                else:
                    body.close()
                    # Ranged GETs in parallel, each retried by s3transfer should its stream break.
                    self._client.download_file(self.bucket, s3_key, os.fspath(tmp), Config=self._transfer)
            finally:
                body.close()

    def get_bytes(self, key: str) -> bytes:
        s3_key = self._key(key)
        with self._errors(key):
            body = self._client.get_object(Bucket=self.bucket, Key=s3_key)["Body"]
            try:
                return cast(bytes, body.read())
            finally:
                body.close()

    def open_read(self, key: str) -> BinaryIO:
        s3_key = self._key(key)
        with self._errors(key):
            return cast(BinaryIO, self._client.get_object(Bucket=self.bucket, Key=s3_key)["Body"])

    def info(self, key: str) -> ObjectInfo:
        s3_key = self._key(key)
        with self._errors(key):
            head = self._client.head_object(Bucket=self.bucket, Key=s3_key)
        return ObjectInfo(check_key(key), int(head["ContentLength"]), str(head["ETag"]).strip('"'))

    def exists(self, key: str) -> bool:
        try:
            self.info(key)
        except KeyMissing:
            return False
        return True

    def _list_keys(self, prefix: str) -> Iterator[dict[str, Any]]:
        """The bucket's listing entries under ``prefix/`` (raw, in the store's order)."""
        pages = self._client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=f"{self._key(prefix)}/"
        )
        it = iter(pages)
        while True:
            with self._errors():
                page = next(it, None)
            if page is None:
                return
            yield from page.get("Contents", [])

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        found = []
        for obj in self._list_keys(prefix):
            rel = self._relative(obj["Key"])
            if rel is not None:
                found.append(ObjectInfo(rel, int(obj["Size"]), str(obj.get("ETag", "")).strip('"')))
        # S3 lists in UTF-8 byte order, which is str order; sorted anyway: not every store promises it.
        yield from sorted(found, key=lambda o: o.key)

    def delete(self, key: str) -> None:
        s3_key = self._key(key)
        with self._errors():
            self._client.delete_object(Bucket=self.bucket, Key=s3_key)

    def _delete_keys(self, s3_keys: Sequence[str]) -> int:
        n = 0
        for i in range(0, len(s3_keys), _DELETE_BATCH):
            batch = s3_keys[i:i + _DELETE_BATCH]
            with self._errors():
                out = self._client.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True}
                )
            errors = out.get("Errors", [])
            if errors:
                first = errors[0]
                raise StoreUnavailable(self._message(
                    f"{len(errors)} of {len(batch)} objects not deleted "
                    f"({first.get('Key')}: {first.get('Code')} {first.get('Message')})"
                ))
            n += len(batch)
        return n

    def delete_tree(self, prefix: str) -> int:
        return self._delete_keys([obj["Key"] for obj in self._list_keys(prefix)])

    def put_tree(self, prefix: str, src: Path) -> int:
        base = check_key(prefix)
        src = Path(src)
        files = _regular_files(src)
        if next(self._list_keys(base), None) is not None:
            raise FileExistsError(f"store tree {prefix!r} already exists in {self.url}")
        uploads = [(path, self._key(f"{base}/{rel}")) for path, rel in files]
        try:
            # One transfer manager for the whole tree: small files and the parts of big ones share
            # transfer_threads workers (a thread pool per file would multiply them).
            with self._errors(), create_transfer_manager(self._client, self._transfer) as manager:
                futures = [manager.upload(os.fspath(path), self.bucket, s3_key) for path, s3_key in uploads]
                for future in futures:
                    future.result()
        except BaseException:
            # Every key tried, not only those known to be done: a PUT cut off may still have landed.
            with contextlib.suppress(Exception):
                self._delete_keys([s3_key for _, s3_key in uploads])
            raise
        shutil.rmtree(src, ignore_errors=True)
        return len(uploads)

    def local_path(self, key: str) -> Path | None:
        return None

    def check(self) -> None:
        key = f"_zoofit/check-{uuid.uuid4().hex}"
        data = os.urandom(16)
        self.put_bytes(key, data)
        try:
            try:
                back = self.get_bytes(key)
            except KeyMissing:
                raise StoreUnavailable(self._message(f"wrote {key!r} but could not read it back")) from None
            if back != data:
                raise StoreUnavailable(self._message(f"wrote {key!r} but read other bytes back"))
        finally:
            self.delete(key)


def _regular_files(src: Path) -> list[tuple[Path, str]]:
    """(path, relative POSIX path) of every regular file under ``src``, symlinks neither followed nor kept."""
    if src.is_symlink() or not src.is_dir():
        raise NotADirectoryError(f"not a folder: {src}")
    out = []
    for dirpath, dirnames, filenames in os.walk(src):
        dirnames[:] = sorted(d for d in dirnames if not os.path.islink(os.path.join(dirpath, d)))
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if path.is_symlink() or not path.is_file():
                continue
            out.append((path, path.relative_to(src).as_posix()))
    return out


def _add_content_md5(params: dict[str, Any], **_: Any) -> None:
    # DeleteObjects must carry a checksum; botocore >= 1.36 sends CRC32 alone, and MinIO before 2025
    # (and others) insist on Content-MD5. Both are sent.
    body = params.get("body") or b""
    if isinstance(body, str):
        body = body.encode()
    digest = hashlib.md5(body, usedforsecurity=False).digest()
    params["headers"]["Content-MD5"] = base64.b64encode(digest).decode("ascii")
