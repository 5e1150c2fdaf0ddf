"""One small interface for ``s3://bucket/key`` URIs and local paths.

Stages exchange bundles and checkpoints through here, so a laptop (local paths or the SeaweedFS started by
``dfka stack up``) and a cluster (the Kubeflow object store) run the same code. Every S3 write stores the
sha256 of the content as ``x-amz-meta-sha256`` and every read checks it, so a truncated or tampered object
fails loudly instead of poisoning a run. Transient errors are retried here, by tenacity around the whole
operation (urllib3 retries are off, so one policy is in charge); errors that retrying cannot fix fail at once.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, TypeVar
from urllib.parse import urlparse

import tenacity
import urllib3
from minio import Minio
from minio.deleteobjects import DeleteObject
from minio.error import InvalidResponseError, S3Error, ServerError

from dfka.errors import StorageError
from dfka.settings import network_timeout, redact

log = logging.getLogger(__name__)
T = TypeVar("T")

PART_SIZE = 8 * 1024 * 1024
CHUNK = 1024 * 1024
META_KEY = "sha256"
ENDPOINT_KEYS = ("DFKA_S3_ENDPOINT", "MLFLOW_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL")
MISSING_CODES = {"NoSuchKey", "NoSuchBucket", "NoSuchUpload"}
AUTH_CODES = {"AccessDenied", "SignatureDoesNotMatch", "InvalidAccessKeyId"}
TRANSIENT_CODES = {"SlowDown", "InternalError", "ServiceUnavailable", "RequestTimeout"}


@dataclass
class RetryPolicy:
    """Exponential backoff (base, 2·base, … capped) with up to +50 % jitter so clients do not retry in lockstep.

    ``sleep`` is injectable so tests can observe the schedule without waiting for it.
    """

    retries: int = field(default_factory=lambda: int(os.environ.get("DFKA_S3_RETRIES", "5")))
    base: float = 0.5
    cap: float = 8.0
    sleep: Callable[[float], None] = time.sleep

    def delay(self, attempt: int) -> float:
        return min(self.cap, self.base * 2**attempt * random.uniform(1.0, 1.5))


#: Module-wide policy; ``None`` means "build one from the environment at call time". Tests replace it.
retry_policy: RetryPolicy | None = None
_http: urllib3.PoolManager | None = None
_known_buckets: set[tuple[str, str]] = set()


# ---------------------------------------------------------------- URIs


def is_s3(uri: str | os.PathLike[str]) -> bool:
    return str(uri).startswith("s3://")


def _split(uri: str) -> tuple[str, str]:
    parsed = urlparse(uri)
    if not parsed.netloc:
        raise StorageError(f"{uri!r} has no bucket", "use s3://BUCKET/KEY")
    return parsed.netloc, parsed.path.lstrip("/")


def _local(uri: str | os.PathLike[str]) -> Path:
    text = str(uri)
    return Path(urlparse(text).path if text.startswith("file://") else text)


def join(uri: str | os.PathLike[str], *parts: str) -> str:
    """Append path segments; works the same for ``s3://`` and local paths."""
    text = str(uri)
    if not is_s3(text):
        return str(_local(text).joinpath(*parts))
    segments = [text.rstrip("/")] + [p.strip("/") for p in parts if p.strip("/")]
    return "/".join(segments)


# ---------------------------------------------------------------- S3 client and errors


@dataclass(frozen=True)
class _Target:
    client: Minio
    endpoint: str
    bucket: str
    key: str

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.key}"


def _pool() -> urllib3.PoolManager:
    global _http
    if _http is None:
        import certifi

        limit = network_timeout()
        _http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=min(3.0, limit), read=limit),
            retries=False,
            maxsize=8,
            cert_reqs="CERT_REQUIRED",
            ca_certs=os.environ.get("SSL_CERT_FILE") or certifi.where(),
        )
    return _http


def _target(uri: str, env: Mapping[str, str] | None = None) -> _Target:
    env = os.environ if env is None else env
    endpoint = next((env[k] for k in ENDPOINT_KEYS if env.get(k)), "")
    access, secret = env.get("AWS_ACCESS_KEY_ID"), env.get("AWS_SECRET_ACCESS_KEY")
    if not (endpoint and access and secret):
        raise StorageError(
            f"cannot open {uri}: the S3 endpoint or credentials are not configured",
            "run `dfka stack up`, or set DFKA_S3_ENDPOINT, AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY",
        )
    parsed = urlparse(endpoint if "://" in endpoint else f"http://{endpoint}")
    client = Minio(
        parsed.netloc,
        access_key=access,
        secret_key=secret,
        secure=parsed.scheme == "https",
        region=env.get("AWS_DEFAULT_REGION", "us-east-1"),
        http_client=_pool(),
    )
    bucket, key = _split(uri)
    return _Target(client, endpoint, bucket, key)


def _is_transient(err: BaseException) -> bool:
    if isinstance(err, S3Error):
        return err.code in TRANSIENT_CODES or (err.response is not None and err.response.status >= 500)
    if isinstance(err, ServerError):
        return err.status_code >= 500 or err.status_code == 429
    return isinstance(
        err, urllib3.exceptions.HTTPError | ConnectionError | TimeoutError | InvalidResponseError
    )


def _storage_error(t: _Target, err: BaseException, attempts: int) -> StorageError:
    where = f"{t.uri} on {t.endpoint}"
    code = getattr(err, "code", None)
    if code in MISSING_CODES:
        return StorageError(f"{where} does not exist ({code})", "the key does not exist: check the URI")
    if code in AUTH_CODES:
        return StorageError(
            f"the object store at {t.endpoint} refused the credentials for {t.uri} ({code})",
            "check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (`dfka stack up` writes them to $DFKA_HOME/stack.env)",
        )
    detail = redact(f"{type(err).__name__}: {err}")
    if _is_transient(err):
        return StorageError(
            f"could not reach the object store for {where} after {attempts} attempts ({detail})",
            f"is the object store at {t.endpoint} up? `dfka stack status` (DFKA_NETWORK_TIMEOUT, now "
            f"{network_timeout():g} s, is how long dfka waits for an endpoint that does not answer)",
        )
    return StorageError(f"object store request for {where} failed ({detail})", "check the URI and the bucket")


def _call(t: _Target, what: str, fn: Callable[[], T]) -> T:
    """Run ``fn`` with the retry policy (tenacity); turn every failure into a StorageError without secrets.

    Transient errors are retried up to ``policy.retries`` times; retries ride out an outage (refused
    connections fail fast), while the time spent *waiting on the endpoint* is bounded separately, so
    one that accepts connections and never answers fails in ``DFKA_NETWORK_TIMEOUT``.
    """
    policy = retry_policy or RetryPolicy()
    limit, waited = network_timeout(), [0.0]

    def timed() -> T:
        started = time.monotonic()
        try:
            return fn()
        finally:
            waited[0] += time.monotonic() - started

    def warn(state: tenacity.RetryCallState) -> None:
        log.warning(
            "%s %s on %s failed (%s); retry %d/%d in %.1fs",
            what, t.uri, t.endpoint, type(state.outcome.exception()).__name__, state.attempt_number,
            policy.retries, state.upcoming_sleep,
        )  # fmt: skip

    retrying = tenacity.Retrying(
        retry=tenacity.retry_if_exception(
            lambda err: not isinstance(err, StorageError) and _is_transient(err)
        ),
        stop=tenacity.stop_after_attempt(policy.retries + 1) | (lambda _: waited[0] >= limit),
        wait=lambda state: policy.delay(state.attempt_number - 1),
        sleep=policy.sleep,
        before_sleep=warn,
        reraise=True,
    )
    try:
        return retrying(timed)
    except StorageError:
        raise
    except Exception as err:
        raise _storage_error(t, err, retrying.statistics.get("attempt_number", 1)) from None


def _ensure_bucket(t: _Target) -> None:
    """Create the bucket on first write; remembered per endpoint so later puts cost no extra request."""
    if (t.endpoint, t.bucket) in _known_buckets:
        return
    if not t.client.bucket_exists(t.bucket):
        try:
            t.client.make_bucket(t.bucket)
        except S3Error as err:
            if err.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise
    _known_buckets.add((t.endpoint, t.bucket))


def _expected_sha(headers: Any) -> str | None:
    return headers.get(f"x-amz-meta-{META_KEY}")


def _check(t: _Target, expected: str | None, actual: str) -> None:
    if expected is None:
        log.debug("%s has no sha256 metadata (not written by dfka); integrity not checked", t.uri)
    elif expected != actual:
        raise StorageError(
            f"{t.uri} on {t.endpoint} is corrupt: its content does not match the sha256 stored when dfka wrote it "
            "(the object was modified outside dfka or truncated)",
            "write the object again from its source; do not edit objects in the store by hand",
        )


def _sha_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------- local helpers


@contextmanager
def _atomic(path: Path) -> Iterator[IO[bytes]]:
    """Write to a temp file next to ``path`` and rename, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _local_missing(path: Path) -> StorageError:
    return StorageError(f"{path} does not exist", "check the path")


# ---------------------------------------------------------------- public API


def put_bytes(data: bytes, uri: str | os.PathLike[str]) -> None:
    if not is_s3(uri):
        with _atomic(_local(uri)) as fh:
            fh.write(data)
        return
    t = _target(str(uri))
    meta = {META_KEY: hashlib.sha256(data).hexdigest()}

    def put() -> None:
        _ensure_bucket(t)
        t.client.put_object(t.bucket, t.key, io.BytesIO(data), len(data), metadata=meta, part_size=PART_SIZE)

    _call(t, "put", put)


def get_bytes(uri: str | os.PathLike[str]) -> bytes:
    if not is_s3(uri):
        path = _local(uri)
        if not path.is_file():
            raise _local_missing(path)
        return path.read_bytes()
    t = _target(str(uri))

    def get() -> bytes:
        response = t.client.get_object(t.bucket, t.key)
        try:
            data = response.read()
            _check(t, _expected_sha(response.headers), hashlib.sha256(data).hexdigest())
            return data
        finally:
            response.close()
            response.release_conn()

    return _call(t, "get", get)


def put_file(local_path: str | os.PathLike[str], uri: str | os.PathLike[str]) -> None:
    src = Path(local_path)
    if not src.is_file():
        raise _local_missing(src)
    if not is_s3(uri):
        with _atomic(_local(uri)) as fh, src.open("rb") as inp:
            shutil.copyfileobj(inp, fh, CHUNK)
        return
    t = _target(str(uri))
    meta = {META_KEY: _sha_file(src)}

    def put() -> None:
        _ensure_bucket(t)
        t.client.fput_object(t.bucket, t.key, str(src), metadata=meta, part_size=PART_SIZE)

    _call(t, "put", put)


def get_file(uri: str | os.PathLike[str], local_path: str | os.PathLike[str]) -> None:
    """Stream to a temp file (hashing on the way), verify, then rename into place."""
    dest = Path(local_path)
    if not is_s3(uri):
        src = _local(uri)
        if not src.is_file():
            raise _local_missing(src)
        with _atomic(dest) as fh, src.open("rb") as inp:
            shutil.copyfileobj(inp, fh, CHUNK)
        return
    t = _target(str(uri))

    def get() -> None:
        response = t.client.get_object(t.bucket, t.key)
        try:
            digest = hashlib.sha256()
            with _atomic(dest) as fh:
                for block in response.stream(CHUNK):
                    digest.update(block)
                    fh.write(block)
                _check(t, _expected_sha(response.headers), digest.hexdigest())
        finally:
            response.close()
            response.release_conn()

    _call(t, "get", get)


def listdir(uri: str | os.PathLike[str], recursive: bool = True) -> list[str]:
    """Sorted keys relative to ``uri``; files only when recursive, else children (folders end in ``/``)."""
    if not is_s3(uri):
        root = _local(uri)
        if not root.is_dir():
            return []
        if recursive:
            return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
        return sorted(p.name + ("/" if p.is_dir() else "") for p in root.iterdir())
    t = _target(str(uri))
    prefix = t.key.rstrip("/") + "/" if t.key.strip("/") else ""

    def names() -> list[str]:
        if not t.client.bucket_exists(t.bucket):
            return []
        objects = t.client.list_objects(t.bucket, prefix=prefix, recursive=recursive)
        return sorted(o.object_name[len(prefix) :] for o in objects)

    return _call(t, "list", names)


def exists(uri: str | os.PathLike[str]) -> bool:
    """True for an object, or a prefix with at least one object under it (like a local directory)."""
    if not is_s3(uri):
        return _local(uri).exists()
    t = _target(str(uri))

    def check() -> bool:
        try:
            t.client.stat_object(t.bucket, t.key)
            return True
        except S3Error as err:
            if err.code not in MISSING_CODES:
                raise
        if not t.key.strip("/"):
            return t.client.bucket_exists(t.bucket)
        prefix = t.key.rstrip("/") + "/"
        try:
            return (
                next(iter(t.client.list_objects(t.bucket, prefix=prefix, recursive=True)), None) is not None
            )
        except S3Error as err:
            if err.code != "NoSuchBucket":
                raise
            return False

    return _call(t, "stat", check)


def remove(uri: str | os.PathLike[str]) -> None:
    """Delete a file/object, or everything under a folder/prefix. Missing targets are not an error."""
    if not is_s3(uri):
        path = _local(uri)
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
        return
    t = _target(str(uri))
    prefix = t.key.rstrip("/") + "/"

    def delete() -> None:
        if not t.client.bucket_exists(t.bucket):
            return
        names = [
            t.key,
            *(o.object_name for o in t.client.list_objects(t.bucket, prefix=prefix, recursive=True)),
        ]
        # one multi-object DeleteObjects request per 1,000 keys (minio batches them), not a call per key;
        # the iterator must be drained for the requests to be sent
        failed = list(t.client.remove_objects(t.bucket, (DeleteObject(n) for n in names if n)))
        if failed:
            first = failed[0]
            raise StorageError(
                f"{len(failed)} object(s) under {t.uri} were not deleted, e.g. {first.name}: {first.code}",
                "check that the credentials may delete in the bucket (s3:DeleteObject) and run it again",
            )

    _call(t, "remove", delete)


def ensure_bucket(bucket: str, env: Mapping[str, str] | None = None) -> None:
    """Create ``bucket`` if missing; ``env`` overrides ``os.environ`` (``dfka stack up`` uses it)."""
    t = _target(f"s3://{bucket}/", env)
    _call(t, "create bucket", lambda: _ensure_bucket(t))


def put_dir(local_dir: str | os.PathLike[str], uri: str | os.PathLike[str]) -> None:
    root = Path(local_dir)
    if not root.is_dir():
        raise _local_missing(root)
    for rel in listdir(root):
        put_file(root / rel, join(uri, rel))


def get_dir(uri: str | os.PathLike[str], local_dir: str | os.PathLike[str]) -> None:
    names = listdir(uri)
    if not names and not (not is_s3(uri) and _local(uri).is_dir()):
        raise StorageError(f"{uri} is empty or does not exist", "check the URI")
    Path(local_dir).mkdir(parents=True, exist_ok=True)
    for rel in names:
        get_file(join(uri, rel), Path(local_dir) / rel)
