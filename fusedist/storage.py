"""URL-addressed storage: plain paths, ``file://`` and ``s3://``.

Every stage reads and writes through these functions, so the same run works on local disk and
on S3. Writes are atomic (local: temp name + rename; S3: an object appears whole or not at all),
S3 requests are retried by botocore, streaming reads resume where a dropped body left off, and a
permanent failure raises :class:`StorageError` that names the URL and the endpoint.
Credentials come only from the standard AWS chain and are scrubbed from every error message.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import http.client
import io
import json
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any
from urllib.request import url2pathname

from fusedist.config import StorageConfig
from fusedist.secrets import mask_text


class StorageError(IOError):
    """A storage operation failed for good; the message names the URL and what to check.

    ``code`` is the S3 error code when S3 answered (e.g. ``NoSuchBucket``), else "".
    """

    code: str = ""


# Local errors that no retry fixes and that the user must act on: named with the path and a fix.
_WRITE_FIXES = {
    errno.ENOSPC: "no space left on the device; free space there or write elsewhere",
    errno.EDQUOT: "disk quota exceeded; free space there or write elsewhere",
    errno.EROFS: "the file system is read-only; point the output at a writable folder",
    errno.EACCES: "permission denied; fix the permissions or use another path",
    errno.EPERM: "operation not permitted; fix the permissions or use another path",
}


def local_write_error(path: str | Path, err: OSError, verb: str = "write") -> StorageError:
    """A one-line StorageError for a failed local write: the path, the errno name, the fix."""
    name = errno.errorcode.get(err.errno or 0, "")
    fix = _WRITE_FIXES.get(err.errno or 0, f"{err.strerror or err}")
    out = StorageError(f"cannot {verb} {path}: {fix} ({name or type(err).__name__})")
    out.code = name
    return out


@contextlib.contextmanager
def _writing(path: str | Path) -> Iterator[None]:
    try:
        yield
    except StorageError:
        raise
    except OSError as e:
        raise local_write_error(path, e) from e


class _LocalSink(io.RawIOBase):
    """The caller's writes into a temp file; a failing write (ENOSPC...) names the target."""

    def __init__(self, f: IO[bytes], target: Path):
        self.f, self.target = f, target

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        with _writing(self.target):
            return self.f.write(b)

    def flush(self) -> None:
        with _writing(self.target):
            self.f.flush()


# ----------------------------------------------------------------------------- URLs

def is_s3(url: str) -> bool:
    return str(url).startswith("s3://")


def local_path(url: str) -> Path:
    """The filesystem path of a plain path or ``file://`` URL (percent-escapes decoded)."""
    u = str(url)
    if u.startswith("file://"):
        rest = u[len("file://"):]
        # file:///abs/path has an empty host; file://localhost/abs/path names this machine.
        path = rest[rest.index("/"):] if "/" in rest else "/"
        return Path(url2pathname(path))
    if "://" in u:
        raise StorageError(f"{u}: unsupported URL scheme (use a path, file:// or s3://)")
    return Path(u)


def split_s3(url: str) -> tuple[str, str]:
    """``s3://bucket/some/key`` -> ``("bucket", "some/key")``.

    Parsed by hand, not with urlparse: S3 keys may contain '#', '?' and ';', which urlparse
    would cut off as fragment, query or params.
    """
    u = str(url)
    if not u.startswith("s3://"):
        raise StorageError(f"{u}: not an s3:// URL")
    bucket, _, key = u[len("s3://"):].partition("/")
    if not bucket:
        raise StorageError(f"{u}: an S3 URL needs a bucket (s3://bucket/prefix)")
    return bucket, key


def join(base: str, *parts: str) -> str:
    """Join URL parts with '/' (works for paths, file:// and s3://)."""
    out = str(base).rstrip("/")
    url = out.startswith("file://")
    for p in parts:
        p = str(p).strip("/")
        if url:  # a file:// URL decodes percent-escapes (local_path): a literal '%' is %25
            p = p.replace("%", "%25")
        if p:
            out = f"{out}/{p}"
    return out


def basename(url: str) -> str:
    return str(url).rstrip("/").rsplit("/", 1)[-1]


# ----------------------------------------------------------------------------- S3 client

_config = StorageConfig()
_clients: dict[tuple, Any] = {}
_lock = threading.Lock()


def _reset_after_fork() -> None:
    # A forked child must not reuse the parent's connection pools (shared sockets), and the
    # lock may have been held by a parent thread at fork time, which would deadlock the child.
    global _lock
    _lock = threading.Lock()
    _clients.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)


def configure(cfg: StorageConfig | None) -> None:
    """Set the process-wide storage options (each stage calls this with its config)."""
    global _config
    with _lock:
        _config = cfg or StorageConfig()
        _clients.clear()


def get_config() -> StorageConfig:
    return _config


def endpoint_url() -> str | None:
    return _config.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get(
        "AWS_ENDPOINT_URL")


def s3_client() -> Any:
    """A boto3 S3 client for this process and endpoint (boto3 clients are thread-safe)."""
    cfg = _config  # one snapshot, so a concurrent configure() cannot mix two configs
    ep = endpoint_url()
    key = (os.getpid(), ep, cfg.region, os.environ.get("AWS_DEFAULT_REGION"),
           os.environ.get("AWS_REGION"), cfg.max_attempts, cfg.retry_mode,
           cfg.connect_timeout, cfg.read_timeout)
    with _lock:
        client = _clients.get(key)
        if client is None:
            client = _clients[key] = _new_client(cfg, ep)
        return client


def _new_client(cfg: StorageConfig, ep: str | None) -> Any:
    import boto3
    from botocore.config import Config

    bcfg = Config(
        # total_max_attempts counts the first try; botocore's "max_attempts" key counts only
        # retries, which would make storage.max_attempts=8 mean 9 requests.
        retries={"total_max_attempts": max(1, cfg.max_attempts), "mode": cfg.retry_mode},
        connect_timeout=cfg.connect_timeout,
        read_timeout=cfg.read_timeout,
        # Above TransferConfig.max_concurrency, so parallel part uploads never queue on the pool.
        max_pool_connections=32,
    )
    session = boto3.session.Session()
    region = cfg.region or session.region_name or "us-east-1"
    return session.client("s3", endpoint_url=ep, region_name=region, config=bcfg)


def _transfer_config() -> Any:
    from boto3.s3.transfer import TransferConfig

    mb = 1024 * 1024
    return TransferConfig(multipart_threshold=_config.multipart_threshold_mb * mb,
                          multipart_chunksize=max(5, _config.multipart_chunk_mb) * mb,
                          use_threads=True, max_concurrency=4)


# ----------------------------------------------------------------------------- errors

_USERINFO = re.compile(r"(\w+://)[^/@\s]+@")


def _secrets() -> list[str]:
    """Credentials boto resolved (env ones are masked by :mod:`fusedist.secrets` itself)."""
    out = []
    for client in list(_clients.values()):
        creds = getattr(getattr(client, "_request_signer", None), "_credentials", None)
        # vars(), not the properties: refreshable credentials would refresh (network) on access.
        fields = vars(creds) if creds is not None and hasattr(creds, "__dict__") else {}
        out += [fields.get(k) for k in ("secret_key", "_secret_key", "token", "_token")]
    return [s for s in out if isinstance(s, str)]


def _redact(text: str) -> str:
    """A storage message safe to print: no user info in URLs, no credential anywhere."""
    return mask_text(_USERINFO.sub(r"\1***@", text), extra=_secrets())


def _error_code(err: BaseException | None) -> str:
    from botocore.exceptions import ClientError

    if isinstance(err, ClientError):
        return str(err.response.get("Error", {}).get("Code", ""))
    return ""


def _is_not_found(err: Exception) -> bool:
    return _error_code(err) in ("404", "NoSuchKey", "NotFound")


def _s3_error(url: str, op: str, err: Exception) -> StorageError:
    """Wrap a botocore error into one message that names the URL, the endpoint and a fix."""
    from botocore.exceptions import (
        ClientError,
        ConnectTimeoutError,
        EndpointConnectionError,
        NoCredentialsError,
        ReadTimeoutError,
    )

    ep = endpoint_url() or "(AWS default)"
    tries = f"after up to {_config.max_attempts} attempts (storage.max_attempts)"
    if isinstance(err, NoCredentialsError):
        hint = ("no AWS credentials found: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
                "a profile, or a Kubernetes Secret in the pod env")
    elif isinstance(err, (EndpointConnectionError, ConnectTimeoutError)):
        hint = (f"cannot reach the S3 endpoint {ep} {tries} "
                "(check AWS_ENDPOINT_URL / storage.endpoint_url)")
    elif isinstance(err, ReadTimeoutError):
        hint = (f"the S3 endpoint {ep} did not answer within storage.read_timeout="
                f"{_config.read_timeout}s {tries}")
    elif isinstance(err, ClientError):
        code = _error_code(err) or "?"
        meta = err.response.get("ResponseMetadata", {})
        hint = (f"S3 endpoint {ep} said {code} (HTTP {meta.get('HTTPStatusCode', '?')}, "
                f"{meta.get('RetryAttempts', 0)} retries)")
        if meta.get("RetryQuotaReached"):
            # botocore's client-wide retry quota (see standard.RetryQuotaChecker) stops retrying
            # once many recent requests failed, whatever storage.max_attempts says.
            hint += "; botocore's retry quota is spent: the endpoint has been failing often"
        if code == "NoSuchBucket":
            hint += "; create the bucket or fix the URL"
        elif code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403",
                      "Forbidden"):
            hint += ("; check the credentials and their permissions for this bucket. They "
                     f"come from {credential_source()} (the standard AWS chain: "
                     "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE or "
                     "~/.aws/credentials, or the pod's IAM role / Kubernetes Secret)")
    else:
        hint = f"{type(err).__name__}: {err} (endpoint {ep}, {tries})"
    out = StorageError(_redact(f"{op} {url} failed: {hint}"))
    out.code = _error_code(err)
    return out


def credential_source() -> str:
    """Where boto3 found credentials (e.g. ``env``, ``shared-credentials-file``, ``iam-role``),
    without touching the secrets themselves."""
    try:
        import boto3

        creds = boto3.session.Session().get_credentials()
    except Exception:  # noqa: BLE001 - only a hint for an error message
        return "an unknown source"
    if creds is None:
        return "nowhere (no credentials found)"
    return f"'{getattr(creds, 'method', None) or 'unknown'}'"


def _chain_is_clean(err: BaseException) -> bool:
    """Whether no message in ``err``'s cause/context chain carries a secret (tracebacks print
    the whole chain; botocore echoes endpoint URLs, which may embed user:password)."""
    seen: set[int] = set()
    cur: BaseException | None = err
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if _redact(str(cur)) != str(cur):
            return False
        cur = cur.__cause__ or cur.__context__
    return True


def _call(url: str, op: str, method: str, **kw: Any) -> Any:
    """``s3_client().<method>(**kw)``; a missing object becomes FileNotFoundError, any other
    failure (client construction included: a bad endpoint URL fails there) a StorageError."""
    try:
        return getattr(s3_client(), method)(**kw)
    except Exception as e:  # noqa: BLE001 - botocore raises many unrelated types
        if _is_not_found(e):
            raise FileNotFoundError(f"{url}: no such object") from None
        # Chain botocore's error for debugging, unless printing it would print a secret.
        raise _s3_error(url, op, e) from (e if _chain_is_clean(e) else None)


# ----------------------------------------------------------------------------- reads

def exists(url: str) -> bool:
    """True for an existing file/object, and (like a local directory) for a non-empty prefix."""
    if not is_s3(url):
        return local_path(url).exists()
    bucket, key = split_s3(url)
    if not key:
        try:
            _call(url, "HEAD", "head_bucket", Bucket=bucket)
            return True
        except FileNotFoundError:
            return False
    if not key.endswith("/"):
        try:
            _call(url, "HEAD", "head_object", Bucket=bucket, Key=key)
            return True
        except FileNotFoundError:
            pass
    page = _call(url, "LIST", "list_objects_v2", Bucket=bucket,
                 Prefix=key.rstrip("/") + "/", MaxKeys=1)
    return bool(page.get("KeyCount") or page.get("Contents"))


def _head(url: str) -> dict[str, Any]:
    bucket, key = split_s3(url)
    return _call(url, "HEAD", "head_object", Bucket=bucket, Key=key)


def size(url: str) -> int:
    if is_s3(url):
        return int(_head(url)["ContentLength"])
    return local_path(url).stat().st_size


def read_bytes(url: str) -> bytes:
    with open_read(url) as f:
        return f.read()


def read_text(url: str) -> str:
    return read_bytes(url).decode("utf-8")


def read_json(url: str) -> Any:
    return json.loads(read_text(url))


def _stream_errors() -> tuple[type[BaseException], ...]:
    """Errors a dropped or stalled body raises while streaming (not errors from S3 itself)."""
    import urllib3.exceptions
    from botocore.exceptions import BotoCoreError

    return (BotoCoreError, urllib3.exceptions.HTTPError, http.client.HTTPException,
            ConnectionError, TimeoutError, _ShortBody)


class _ShortBody(IOError):
    """The body ended before Content-Length bytes (a proxy or server cut it off)."""


class _S3RangeReader(io.RawIOBase):
    """A seekable streaming read of one S3 object that resumes with a Range GET after drops.

    botocore retries a request until its response headers arrive; a connection that drops while
    the body streams is not retried by it, so this reader re-requests from the current offset.
    Every GET after the first carries If-Match with the first ETag, so a resumed read never
    stitches together two versions of an object.
    """

    def __init__(self, url: str, etag: str | None = None, start: int = 0):
        self.url = url
        self.bucket, self.key = split_s3(url)
        self.pos = start  # > 0: the first GET is already a ranged one
        self.etag = etag
        self.length = -1  # known from the first response
        self._body: Any = None
        # Consecutive failures without progress before giving up; progress resets the count.
        self._max_failures = max(1, _config.max_attempts)
        self._open()  # eagerly: a missing object fails here, at open time

    def _open(self) -> None:
        kw: dict[str, Any] = {"Bucket": self.bucket, "Key": self.key}
        if self.etag:
            kw["IfMatch"] = self.etag
        if self.pos:
            kw["Range"] = f"bytes={self.pos}-"
        try:
            resp = _call(self.url, "GET", "get_object", **kw)
        except StorageError as e:
            if e.code == "PreconditionFailed":
                raise StorageError(f"GET {self.url}: the object changed while it was read "
                                   f"(ETag was {self.etag}); read it again") from None
            raise
        if self.pos == 0:
            self.length = int(resp["ContentLength"])
        elif not str(resp.get("ContentRange", "")).startswith(f"bytes {self.pos}-"):
            resp["Body"].close()
            raise StorageError(f"GET {self.url}: asked for bytes {self.pos}- but got "
                               f"{resp.get('ContentRange')!r} (endpoint {endpoint_url()})")
        elif self.length < 0:  # opened at an offset: "bytes <a>-<b>/<total>"
            self.length = int(str(resp["ContentRange"]).rsplit("/", 1)[1])
        self.etag = self.etag or resp.get("ETag")
        self._body = resp["Body"]

    def _drop_body(self) -> None:
        if self._body is not None:
            with contextlib.suppress(Exception):
                self._body.close()
        self._body = None

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.length}[whence]
        new = base + offset
        if new < 0:
            raise ValueError(f"{self.url}: negative seek position {new}")
        if new != self.pos:
            self._drop_body()  # reopened lazily with a Range GET at the next read
            self.pos = new
        return self.pos

    def readinto(self, b: Any) -> int:
        want = min(len(b), self.length - self.pos)
        if want <= 0:
            return 0
        failures = 0
        while True:
            try:
                if self._body is None:
                    self._open()
                data = self._body.read(want)
                if not data:
                    raise _ShortBody(f"body ended at byte {self.pos} of {self.length}")
            except _stream_errors() as e:
                failures += 1
                self._drop_body()
                if failures >= self._max_failures:
                    raise StorageError(_redact(
                        f"GET {self.url} broke at byte {self.pos} of {self.length} "
                        f"{failures} times in a row (endpoint {endpoint_url()}): "
                        f"{type(e).__name__}: {e}")) from None
                continue
            n = len(data)
            b[:n] = data
            self.pos += n
            return n

    def readall(self) -> bytes:
        # RawIOBase.readall reads 8 KiB at a time: slow for whole shards. One buffer instead.
        out = bytearray(max(0, self.length - self.pos))
        view, got = memoryview(out), 0
        while got < len(out):
            n = self.readinto(view[got:])
            if not n:
                break
            got += n
        view.release()
        del out[got:]
        return bytes(out)

    def close(self) -> None:
        self._drop_body()
        super().close()


def open_read(url: str, start: int = 0) -> IO[bytes]:
    """A buffered, seekable, streaming binary reader (S3 reads resume after drops), positioned
    at byte ``start`` (on S3 the first request is already a ranged GET from there)."""
    if is_s3(url):
        return io.BufferedReader(_S3RangeReader(url, start=start), buffer_size=1024 * 1024)
    p = local_path(url)
    if not p.is_file():
        raise FileNotFoundError(f"{url}: no such file")
    f = open(p, "rb")  # noqa: SIM115 - returned to the caller
    if start:
        f.seek(start)
    return f


def _is_temp_name(name: str) -> bool:
    """Our in-progress local writes (see open_write): not files yet, so never listed."""
    return name.startswith(".") and name.endswith(".tmp")


_LIST_PAGE_SIZE = 1000  # S3's maximum; tests lower it to exercise pagination


def _list_s3(url: str, delimiter: str, sizes: dict[str, int] | None = None) -> Iterator[str]:
    """Keys (and common prefixes, with a delimiter) under ``url``, relative to it; with
    ``sizes``, each key's size in bytes is recorded there too (the listing carries it)."""
    bucket, prefix = split_s3(url)
    prefix = prefix.rstrip("/") + "/" if prefix else ""
    kw: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix, "MaxKeys": _LIST_PAGE_SIZE}
    if delimiter:
        kw["Delimiter"] = delimiter
    token: str | None = None
    while True:  # paginated by hand, so each page is one retried call wrapped by _call
        page = _call(url, "LIST", "list_objects_v2",
                     **kw, **({"ContinuationToken": token} if token else {}))
        for o in page.get("Contents", []):
            if sizes is not None:
                sizes[o["Key"][len(prefix):]] = int(o["Size"])
            yield o["Key"][len(prefix):]
        for cp in page.get("CommonPrefixes", []):
            yield cp["Prefix"][len(prefix):]
        token = page.get("NextContinuationToken")
        if not page.get("IsTruncated") or not token:
            return


def listdir(url: str, suffix: str = "") -> list[str]:
    """Names (not URLs) of the entries directly under ``url``, sorted; directories end in '/'."""
    if is_s3(url):
        names = set(_list_s3(url, "/"))
    else:
        p = local_path(url)
        if not p.is_dir():
            return []
        names = {e.name + ("/" if e.is_dir() else "") for e in p.iterdir()
                 if not _is_temp_name(e.name)}
    return sorted(n for n in names if n and n.endswith(suffix))


def file_sizes(url: str, suffix: str = "") -> dict[str, int]:
    """{name: bytes} of the files directly under ``url`` ending in ``suffix``: one listing on
    S3 (the sizes come with it), a stat per file on local disk."""
    if is_s3(url):
        sizes: dict[str, int] = {}
        for _ in _list_s3(url, "/", sizes):
            pass
        return {n: b for n, b in sizes.items() if n.endswith(suffix) and "/" not in n}
    p = local_path(url)
    if not p.is_dir():
        return {}
    return {e.name: e.stat().st_size for e in p.iterdir()
            if e.is_file() and e.name.endswith(suffix) and not _is_temp_name(e.name)}


def walk_files(url: str) -> list[str]:
    """Relative names ('/'-separated) of all files below ``url`` (recursive), sorted."""
    if is_s3(url):
        return sorted(k for k in _list_s3(url, "") if k and not k.endswith("/"))
    root = local_path(url)
    if not root.is_dir():
        return []
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                  if p.is_file() and not _is_temp_name(p.name))


# ----------------------------------------------------------------------------- writes

@functools.lru_cache(maxsize=1)
def _umask() -> int:
    # os.umask() can only be read by setting it, which races with other threads; /proc cannot.
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    return 0o022


@contextlib.contextmanager
def _open_write_local(p: Path) -> Iterator[IO[bytes]]:
    # Our own steps and the caller's writes map OSErrors (ENOSPC, EROFS, EACCES...) to a
    # StorageError naming ``p``; other errors the caller's body raises pass through unchanged.
    with _writing(p):
        p.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    f = os.fdopen(fd, "wb")
    try:
        with _writing(p):
            # mkstemp creates 0600 files; give the result the mode a plain open() would have,
            # so other users/pods sharing the volume can read the outputs.
            os.fchmod(fd, 0o666 & ~_umask())
        yield _LocalSink(f, p)  # type: ignore[misc]
        with _writing(p):
            f.flush()
            os.fsync(f.fileno())
            f.close()
            os.replace(tmp_name, p)
    except BaseException:
        # The temp file goes first: a second interrupt (Ray cancels a task with
        # KeyboardInterrupt, which can land while this cleans up after ENOSPC) must not leave
        # it behind. Closing flushes what is buffered, which fails again on a full disk: that
        # second error must not replace the first.
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp_name)
        finally:
            with contextlib.suppress(OSError):
                f.close()
        raise
    # Make the rename itself durable (a crash could otherwise lose the new directory entry).
    with contextlib.suppress(OSError):
        dfd = os.open(p.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


@contextlib.contextmanager
def _open_write_s3(url: str) -> Iterator[IO[bytes]]:
    split_s3(url)  # a bad URL fails before the caller writes anything
    # Spooled (seekable) rather than piped: botocore rewinds the body to retry a failed PUT or
    # part, which a non-seekable stream cannot do. Nothing is sent unless the block succeeds.
    with tempfile.SpooledTemporaryFile(max_size=16 * 1024 * 1024) as tmp:
        yield tmp  # type: ignore[misc]
        _put(url, tmp, tmp.tell())


def _put(url: str, f: IO[bytes], nbytes: int) -> None:
    """Upload a seekable file: one PutObject when small, else a multipart upload."""
    bucket, key = split_s3(url)
    f.seek(0)
    if nbytes < _config.multipart_threshold_mb * 1024 * 1024:
        # Direct PutObject: s3transfer would do the same single PUT, but via a thread pool
        # that costs ~10 ms per call, which adds up over thousands of small manifests.
        _call(url, "PUT", "put_object", Bucket=bucket, Key=key, Body=f)
        return
    _call(url, "PUT", "upload_fileobj", Fileobj=f, Bucket=bucket, Key=key,
          Config=_transfer_config())


@contextlib.contextmanager
def open_write(url: str) -> Iterator[IO[bytes]]:
    """Write ``url`` atomically: the object appears whole when the block exits, or not at all.

    Local: a temp file in the same directory, fsynced and renamed. S3: a spooled temp file,
    uploaded on exit (multipart above ``storage.multipart_threshold_mb``; s3transfer aborts a
    failed multipart upload, so no object appears).
    """
    cm = _open_write_s3(url) if is_s3(url) else _open_write_local(local_path(url))
    with cm as f:
        yield f


def write_bytes(url: str, data: bytes) -> None:
    with open_write(url) as f:
        f.write(data)


def write_text(url: str, text: str) -> None:
    write_bytes(url, text.encode("utf-8"))


def write_json(url: str, obj: Any) -> None:
    write_text(url, json.dumps(obj, indent=1, sort_keys=True) + "\n")


def upload_file(path: str | Path, url: str) -> None:
    """Copy a local file to ``url`` atomically."""
    if is_s3(url):
        with open(path, "rb") as f:
            _put(url, f, os.fstat(f.fileno()).st_size)
        return
    with open(path, "rb") as src, open_write(url) as dst:
        shutil.copyfileobj(src, dst, 1024 * 1024)


def delete(url: str) -> None:
    """Remove a file/object if present (missing is fine)."""
    if is_s3(url):
        bucket, key = split_s3(url)
        with contextlib.suppress(FileNotFoundError):
            _call(url, "DELETE", "delete_object", Bucket=bucket, Key=key)
        return
    with contextlib.suppress(FileNotFoundError):
        local_path(url).unlink()


def delete_tree(url: str) -> None:
    """Remove a folder (local) or every object under a prefix (S3); missing is fine."""
    if is_s3(url):
        for rel in walk_files(url):
            delete(join(url, rel))
        return
    shutil.rmtree(local_path(url), ignore_errors=True)


# ----------------------------------------------------------------------------- local cache

def cache_dir() -> Path:
    d = _config.cache_dir or os.environ.get("FUSEDIST_CACHE") or str(
        Path.home() / ".cache" / "fusedist")
    p = Path(d)
    p.mkdir(parents=True, exist_ok=True)
    return p


def fetch_local(url: str, subdir: str = "slides") -> Path:
    """A local path for ``url``: the file itself, or a cached copy of an S3 object.

    The cache name includes the object's size and ETag, so a changed object is fetched again
    (and the stale copy removed); the copy is written atomically and read with If-Match, so a
    killed download, or one that raced an overwrite, is never reused.
    """
    if not is_s3(url):
        return local_path(url)
    bucket, key = split_s3(url)
    if not key or ".." in key.split("/"):
        # The key becomes a path under the cache; '..' would escape it.
        raise StorageError(f"{url}: cannot cache this key locally (empty or contains '..')")
    head = _head(url)
    stem, dest = _cache_names(url, head, subdir)
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    raw = _S3RangeReader(url, etag=head.get("ETag"))
    with io.BufferedReader(raw, buffer_size=4 * 1024 * 1024) as src, \
            open_write(str(dest)) as dst:
        shutil.copyfileobj(src, dst, 4 * 1024 * 1024)
    _remove_stale_copies(stem, Path(split_s3(url)[1]).suffix, keep=dest)
    return dest


def _cache_names(url: str, head: dict[str, Any], subdir: str) -> tuple[Path, Path]:
    """(stem, cached copy) of an S3 object: the name carries its size and ETag."""
    bucket, key = split_s3(url)
    tag = re.sub(r"[^A-Za-z0-9]", "_", str(head.get("ETag", "")).strip('"'))
    stem = cache_dir() / subdir / bucket / key
    # Keep the original suffix last: OpenSlide picks some vendor readers by extension.
    return stem, stem.with_name(f"{stem.name}.{head['ContentLength']}.{tag}{Path(key).suffix}")


def upload_to_cache(path: str | Path, url: str, subdir: str) -> Path:
    """Upload a local file to ``url`` and keep it as this node's cached copy of the object
    (what :func:`fetch_local` would download), so the writer never fetches it back."""
    upload_file(path, url)
    if not is_s3(url):
        return local_path(url)
    stem, dest = _cache_names(url, _head(url), subdir)
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.replace(path, dest)
    _remove_stale_copies(stem, Path(split_s3(url)[1]).suffix, keep=dest)
    return dest


def _remove_stale_copies(stem: Path, suffix: str, keep: Path) -> None:
    # Copies of older versions of the same key (same name pattern, other size/ETag). Another
    # process may still have one open, which is fine on POSIX: unlink keeps the inode alive.
    pattern = re.compile(
        re.escape(stem.name) + r"\.\d+\.[A-Za-z0-9_]+" + re.escape(suffix) + "$")
    for old in stem.parent.iterdir():
        if old != keep and pattern.match(old.name) and old.is_file():
            with contextlib.suppress(OSError):
                old.unlink()


# ----------------------------------------------------------------------------- WebDataset

def _wds_s3_opener(url: str, mode: str = "rb", bufsize: int = 8192, **kw: Any) -> IO[bytes]:
    if not mode.startswith("r"):
        raise StorageError(f"{url}: write WebDataset shards to S3 with "
                           "fusedist.storage.open_write (atomic), not gopen")
    return open_read(url)


def register_webdataset_opener() -> None:
    """Teach ``webdataset.gopen`` to stream ``s3://`` URLs through this module (retries incl.)."""
    import importlib

    # Not `import webdataset.gopen as m`: the package re-exports the *function* gopen under
    # that name, and the import statement returns the attribute, not the module.
    gopen_module = importlib.import_module("webdataset.gopen")
    gopen_module.gopen_schemes["s3"] = _wds_s3_opener
