"""fusedist.storage on local disk and on S3 (a moto server over real HTTP, and a fault proxy)."""

from __future__ import annotations

import http.client
import io
import os
import signal
import subprocess
import sys
import tarfile
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from fusedist import storage
from fusedist.config import StorageConfig
from fusedist.storage import StorageError
from tests.s3util import FAKE_SECRET, FaultProxy, dead_endpoint, silent_endpoint
from tests.s3util import fault_proxy, moto_server, s3_bucket  # noqa: F401  (fixtures)

MiB = 1024 * 1024


@pytest.fixture(autouse=True)
def _default_storage_config():
    """Every test starts and ends with default storage options and fresh clients."""
    storage.configure(None)
    yield
    storage.configure(None)


def _via(proxy: FaultProxy, **cfg) -> None:
    """Send this process's S3 traffic through ``proxy`` (retries in standard mode by default)."""
    cfg.setdefault("retry_mode", "standard")
    storage.configure(StorageConfig(endpoint_url=proxy.endpoint, **cfg))


def _payload(n: int, seed: int = 0) -> bytes:
    # Position-dependent bytes: a resume at the wrong offset cannot go unnoticed.
    return (bytes(range(256)) * (n // 256 + 1))[:n] if seed == 0 else os.urandom(n)


def _no_secret(err: BaseException) -> None:
    text = "".join(traceback.format_exception(err))
    assert FAKE_SECRET not in text


# ----------------------------------------------------------------------------- URLs

def test_url_helpers():
    assert storage.split_s3("s3://bkt/a/b#c?d;e.json") == ("bkt", "a/b#c?d;e.json")
    assert storage.split_s3("s3://bkt") == ("bkt", "")
    with pytest.raises(StorageError, match="needs a bucket"):
        storage.split_s3("s3:///key")
    assert storage.local_path("file:///tmp/a%20b/c.txt") == Path("/tmp/a b/c.txt")
    assert storage.local_path("file://localhost/tmp/x") == Path("/tmp/x")
    assert storage.local_path("rel/x.txt") == Path("rel/x.txt")
    with pytest.raises(StorageError, match="unsupported URL scheme"):
        storage.local_path("gs://bkt/x")
    assert storage.join("s3://b/", "/x/", "", "y.tar") == "s3://b/x/y.tar"
    assert storage.basename("s3://b/x/y.tar") == "y.tar"
    assert storage.is_s3("s3://b") and not storage.is_s3("/s3://b")
    # A bad retry mode is rejected when the config is built, before any request.
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="standard"):
        StorageConfig(retry_mode="fastest")


# ----------------------------------------------------------------------------- local

@pytest.mark.parametrize("scheme", ["", "file://"])
def test_local_roundtrip(tmp_path, scheme):
    root = f"{scheme}{tmp_path}/out"
    storage.write_bytes(storage.join(root, "a.bin"), b"\x00\x01")
    storage.write_json(storage.join(root, "sub/m.json"), {"k": [1, 2]})
    storage.write_text(storage.join(root, "sub/deep/t.txt"), "héllo")
    assert storage.read_bytes(storage.join(root, "a.bin")) == b"\x00\x01"
    assert storage.read_json(storage.join(root, "sub/m.json")) == {"k": [1, 2]}
    assert storage.read_text(storage.join(root, "sub/deep/t.txt")) == "héllo"
    assert storage.size(storage.join(root, "a.bin")) == 2
    assert storage.exists(storage.join(root, "sub")) and not storage.exists(root + "/nope")
    assert storage.listdir(root) == ["a.bin", "sub/"]
    assert storage.listdir(root, suffix=".bin") == ["a.bin"]
    assert storage.walk_files(root) == ["a.bin", "sub/deep/t.txt", "sub/m.json"]
    assert storage.listdir(root + "/missing") == [] and storage.walk_files(root + "/x") == []
    src = tmp_path / "src.bin"
    src.write_bytes(b"xyz")
    storage.upload_file(src, storage.join(root, "up.bin"))
    assert storage.read_bytes(storage.join(root, "up.bin")) == b"xyz"
    assert storage.fetch_local(storage.join(root, "up.bin")) == tmp_path / "out/up.bin"
    storage.delete(storage.join(root, "a.bin"))
    storage.delete(storage.join(root, "a.bin"))  # missing is fine
    assert not storage.exists(storage.join(root, "a.bin"))
    with pytest.raises(FileNotFoundError, match="a.bin"):
        storage.read_bytes(storage.join(root, "a.bin"))


def test_local_write_is_atomic(tmp_path):
    target = tmp_path / "m.json"
    storage.write_json(str(target), {"v": 1})
    with pytest.raises(RuntimeError), storage.open_write(str(target)) as f:
        f.write(b'{"v": 2, "trunc')
        # Mid-write, readers and listings see only the old, complete file.
        assert storage.read_json(str(target)) == {"v": 1}
        assert storage.listdir(str(tmp_path)) == ["m.json"]
        raise RuntimeError("killed mid-write")
    assert storage.read_json(str(target)) == {"v": 1}
    assert os.listdir(tmp_path) == ["m.json"]  # no temp file left behind
    with pytest.raises(RuntimeError), storage.open_write(str(tmp_path / "new.bin")) as f:
        f.write(b"partial")
        raise RuntimeError
    assert os.listdir(tmp_path) == ["m.json"]
    # Published with the usual umask mode, not mkstemp's private 0600.
    umask = os.umask(0o022)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask


# ----------------------------------------------------------------------------- S3 basics

def test_s3_roundtrip(s3_bucket, tmp_path):
    root = storage.join(s3_bucket, "run")
    odd = storage.join(root, "slide #1?.json")  # '#' and '?' are legal in keys
    storage.write_bytes(storage.join(root, "a.bin"), b"\x00\x01")
    storage.write_json(odd, {"k": 1})
    storage.write_text(storage.join(root, "sub/deep/t.txt"), "héllo")
    assert storage.read_bytes(storage.join(root, "a.bin")) == b"\x00\x01"
    assert storage.read_json(odd) == {"k": 1}
    assert storage.read_text(storage.join(root, "sub/deep/t.txt")) == "héllo"
    assert storage.size(storage.join(root, "a.bin")) == 2
    assert storage.exists(odd) and not storage.exists(storage.join(root, "nope"))
    assert storage.exists(storage.join(root, "sub")) and storage.exists(s3_bucket)
    assert storage.listdir(root) == ["a.bin", "slide #1?.json", "sub/"]
    assert storage.listdir(root, suffix=".json") == ["slide #1?.json"]
    assert storage.walk_files(root) == ["a.bin", "slide #1?.json", "sub/deep/t.txt"]
    assert storage.listdir(storage.join(root, "nothing")) == []
    src = tmp_path / "src.bin"
    src.write_bytes(b"xyz")
    storage.upload_file(src, storage.join(root, "up.bin"))
    assert storage.read_bytes(storage.join(root, "up.bin")) == b"xyz"
    storage.delete(storage.join(root, "a.bin"))
    storage.delete(storage.join(root, "a.bin"))  # missing is fine
    assert not storage.exists(storage.join(root, "a.bin"))
    with pytest.raises(FileNotFoundError, match="a.bin"):
        storage.read_bytes(storage.join(root, "a.bin"))
    with pytest.raises(FileNotFoundError):
        storage.size(storage.join(root, "a.bin"))
    with pytest.raises(StorageError, match="NoSuchBucket"):
        storage.listdir("s3://no-such-bucket-fusedist/x")


def test_s3_listing_follows_pages(s3_bucket, monkeypatch):
    monkeypatch.setattr(storage, "_LIST_PAGE_SIZE", 4)
    root = storage.join(s3_bucket, "p")
    for i in range(9):
        storage.write_bytes(storage.join(root, f"{i:02d}"), b"")
    for i in range(6):
        storage.write_bytes(storage.join(root, f"d{i}/x"), b"")
    assert storage.walk_files(root) == [f"{i:02d}" for i in range(9)] + [
        f"d{i}/x" for i in range(6)]
    assert storage.listdir(root) == [f"{i:02d}" for i in range(9)] + [
        f"d{i}/" for i in range(6)]


def test_s3_write_is_atomic(s3_bucket):
    url = storage.join(s3_bucket, "m.json")
    with pytest.raises(RuntimeError), storage.open_write(url) as f:
        f.write(b"partial")
        raise RuntimeError("killed mid-write")
    assert not storage.exists(url) and storage.walk_files(s3_bucket) == []
    storage.write_json(url, {"v": 1})
    with pytest.raises(RuntimeError), storage.open_write(url) as f:
        f.write(b"{broken")
        raise RuntimeError
    assert storage.read_json(url) == {"v": 1}


def test_s3_multipart_upload(s3_bucket, tmp_path):
    storage.configure(StorageConfig(multipart_threshold_mb=5, multipart_chunk_mb=5))
    data = _payload(12 * MiB, seed=1)
    url = storage.join(s3_bucket, "big.bin")
    with storage.open_write(url) as f:
        for i in range(0, len(data), MiB):
            f.write(data[i:i + MiB])
    etag = storage._head(url)["ETag"].strip('"')
    assert etag.endswith("-3")  # 5 + 5 + 2 MiB parts
    assert storage.read_bytes(url) == data
    src = tmp_path / "big.bin"
    src.write_bytes(data)
    storage.upload_file(src, storage.join(s3_bucket, "big2.bin"))
    assert storage._head(storage.join(s3_bucket, "big2.bin"))["ETag"].strip('"').endswith("-3")
    bucket, _ = storage.split_s3(s3_bucket)
    assert not storage.s3_client().list_multipart_uploads(Bucket=bucket).get("Uploads")


def test_s3_reader_seeks(s3_bucket):
    data = _payload(3 * MiB)
    url = storage.join(s3_bucket, "x.bin")
    storage.write_bytes(url, data)
    with storage.open_read(url) as f:
        assert f.read(10) == data[:10]
        f.seek(2 * MiB + 7)
        assert f.tell() == 2 * MiB + 7
        assert f.read(100) == data[2 * MiB + 7:2 * MiB + 107]
        f.seek(-5, io.SEEK_END)
        assert f.read() == data[-5:]
        f.seek(1)
        assert f.read(3) == data[1:4]


# ----------------------------------------------------------------------------- faults

def test_proxy_forwards_chunked_uploads(s3_bucket, fault_proxy):
    # botocore sends Content-Length over http, but other clients (and aws-chunked uploads)
    # use chunked framing: the proxy must de-frame it faithfully.
    bucket, _ = storage.split_s3(s3_bucket)
    host, port = fault_proxy.endpoint.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    body = [b"a" * 70000, b"b" * 3, b"c" * 12345]
    conn.request("PUT", f"/{bucket}/chunked.bin", body=iter(body), encode_chunked=True,
                 headers={"Transfer-Encoding": "chunked"})
    assert conn.getresponse().status == 200
    assert storage.read_bytes(storage.join(s3_bucket, "chunked.bin")) == b"".join(body)


def test_reads_resume_after_cut_bodies(s3_bucket, fault_proxy):
    url = storage.join(s3_bucket, "shard.bin")
    data = _payload(6 * MiB)
    storage.write_bytes(url, data)
    _via(fault_proxy)
    fault_proxy.set_faults(cut_rate=0.8, seed=3)
    assert storage.read_bytes(url) == data
    assert fault_proxy.counts["cuts"] >= 2
    with storage.open_read(url) as f:  # a seek after a cut resumes at the right offset too
        f.seek(4 * MiB)
        assert f.read() == data[4 * MiB:]


def test_resumed_read_refuses_a_changed_object(s3_bucket):
    url = storage.join(s3_bucket, "x.bin")
    storage.write_bytes(url, _payload(2 * MiB))
    f = storage.open_read(url)
    f.read(10)
    storage.write_bytes(url, _payload(2 * MiB, seed=1))
    f.seek(MiB + 5)  # the next read is a Range GET with If-Match: the old ETag
    with pytest.raises(StorageError, match="changed while it was read"):
        f.read(10)
    f.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", ["standard", "adaptive"])
def test_all_operations_survive_faults(s3_bucket, fault_proxy, tmp_path, mode):
    _via(fault_proxy, retry_mode=mode, max_attempts=10, multipart_threshold_mb=5,
         multipart_chunk_mb=5, cache_dir=str(tmp_path / "cache"))
    fault_proxy.set_faults(error_rate=0.12, drop_rate=0.12, cut_rate=0.15, seed=1,
                           slowdown_share=0.3)
    t0 = time.monotonic()
    root = storage.join(s3_bucket, "run")
    big = _payload(11 * MiB, seed=1)
    storage.write_bytes(storage.join(root, "big.bin"), big)  # multipart, parts retried
    for i in range(12):
        storage.write_json(storage.join(root, f"m/{i}.json"), {"i": i})
    assert [storage.read_json(storage.join(root, f"m/{i}.json")) for i in range(12)] == [
        {"i": i} for i in range(12)]
    assert storage.read_bytes(storage.join(root, "big.bin")) == big
    assert storage.size(storage.join(root, "big.bin")) == len(big)
    assert storage.exists(storage.join(root, "m/3.json"))
    assert storage.listdir(root) == ["big.bin", "m/"]
    assert len(storage.walk_files(root)) == 13
    assert storage.fetch_local(storage.join(root, "big.bin")).read_bytes() == big
    for i in range(12):
        storage.delete(storage.join(root, f"m/{i}.json"))
    assert storage.walk_files(root) == ["big.bin"]
    c = fault_proxy.counts
    assert c["errors"] > c["slowdowns"] > 0 and c["drops"] and c["cuts"], c  # every kind
    assert fault_proxy.faults >= 0.2 * c["requests"], c  # ~20-30% of requests broken
    assert time.monotonic() - t0 < 45


def test_threads_share_clients_under_faults(s3_bucket, fault_proxy):
    _via(fault_proxy, max_attempts=10)
    fault_proxy.set_faults(error_rate=0.1, drop_rate=0.1, cut_rate=0.1, seed=11,
                           slowdown_share=0.0)

    def roundtrip(i: int) -> bytes:
        url = storage.join(s3_bucket, f"t/{i}.bin")
        storage.write_bytes(url, _payload(64 * 1024 + i, seed=1))
        return storage.read_bytes(url)

    with ThreadPoolExecutor(8) as pool:
        sizes = [len(b) for b in pool.map(roundtrip, range(32))]
    assert sizes == [64 * 1024 + i for i in range(32)]
    assert fault_proxy.faults > 0


@pytest.mark.parametrize("mode", ["standard", "adaptive"])
def test_max_attempts_counts_every_request(s3_bucket, fault_proxy, mode):
    # botocore's own "max_attempts" key counts retries only (one request more than asked).
    _via(fault_proxy, retry_mode=mode, max_attempts=3)
    fault_proxy.set_faults(error_rate=1.0, slowdown_share=0.0)
    with pytest.raises(StorageError, match="InternalError.*2 retries"):
        storage.read_bytes(storage.join(s3_bucket, "k"))
    assert fault_proxy.counts["requests"] == 3


@pytest.mark.timeout(30)
def test_dead_endpoint_fails_fast_with_a_clear_error(moto_server):
    with dead_endpoint() as ep:
        storage.configure(StorageConfig(endpoint_url=ep, max_attempts=3, connect_timeout=0.5))
        for op in (lambda u: storage.exists(u), lambda u: storage.read_bytes(u),
                   lambda u: storage.write_bytes(u, b"x"), lambda u: storage.listdir(u)):
            t0 = time.monotonic()
            with pytest.raises(StorageError) as ei:
                op("s3://bkt/runs/m.json")
            assert time.monotonic() - t0 < 5
            msg = str(ei.value)
            assert "s3://bkt/runs/m.json" in msg and ep in msg and "3 attempts" in msg, msg
            _no_secret(ei.value)


def test_forbidden_says_to_check_credentials_and_their_source(s3_bucket, moto_server):
    """moto with its IAM checks on: the fake keys are unknown, every request gets a 403."""
    import urllib.request

    def auth_after(count: str) -> None:
        # text/plain: a form body would be parsed away before moto reads it.
        urllib.request.urlopen(urllib.request.Request(
            f"{moto_server}/moto-api/reset-auth", data=count.encode(), method="POST",
            headers={"Content-Type": "text/plain"}))

    auth_after("0")
    try:
        for op in (lambda u: storage.read_bytes(u), lambda u: storage.write_bytes(u, b"x")):
            with pytest.raises(StorageError) as ei:
                op(storage.join(s3_bucket, "k.bin"))
            msg = str(ei.value)
            assert "check the credentials" in msg and "'env'" in msg, msg
            assert "AWS_ACCESS_KEY_ID" in msg and "403" in msg
            _no_secret(ei.value)
    finally:
        auth_after("inf")


@pytest.mark.timeout(30)
def test_silent_endpoint_times_out(moto_server):
    with silent_endpoint() as ep:
        storage.configure(StorageConfig(endpoint_url=ep, max_attempts=2, read_timeout=0.3))
        t0 = time.monotonic()
        with pytest.raises(StorageError, match="read_timeout") as ei:
            storage.read_bytes("s3://bkt/x.bin")
        assert time.monotonic() - t0 < 5
        assert "s3://bkt/x.bin" in str(ei.value) and ep in str(ei.value)


def test_credentials_never_appear_in_errors(s3_bucket, fault_proxy):
    errors = []
    for call in (lambda: storage.read_bytes("s3://no-such-bucket-fusedist/k"),
                 lambda: storage.write_bytes("s3://no-such-bucket-fusedist/k", b"x")):
        with pytest.raises(StorageError) as ei:
            call()
        errors.append(ei.value)
    # Every attempt fails: the message reports botocore's last answer.
    _via(fault_proxy, max_attempts=2)
    fault_proxy.set_faults(error_rate=1.0, slowdown_share=0.0)
    with pytest.raises(StorageError, match="InternalError") as ei:
        storage.read_bytes(storage.join(s3_bucket, "k"))
    errors.append(ei.value)
    # An endpoint URL carrying a password is scrubbed wherever it is echoed.
    with dead_endpoint() as ep:
        storage.configure(StorageConfig(endpoint_url=ep.replace("//", "//u:url-pass-9f3@"),
                                        max_attempts=1))
        with pytest.raises(StorageError) as ei:
            storage.exists("s3://bkt/k")
        assert "url-pass-9f3" not in "".join(traceback.format_exception(ei.value))
        errors.append(ei.value)
    for err in errors:
        assert FAKE_SECRET not in str(err) and FAKE_SECRET not in repr(err)
        _no_secret(err)


# ----------------------------------------------------------------------------- consumers

def _tar(samples: dict[str, dict[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for key, members in samples.items():
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_webdataset_streams_s3_shards(s3_bucket, fault_proxy):
    import webdataset as wds

    samples = {f"slide{i}/{i * 896}_0": {"hi.jpg": _payload(300_000 + i, seed=1),
                                         "meta.json": b'{"i": %d}' % i} for i in range(6)}
    url = storage.join(s3_bucket, "tiles/shard-000000.tar")
    storage.write_bytes(url, _tar(samples))
    storage.register_webdataset_opener()
    _via(fault_proxy)
    fault_proxy.set_faults(cut_rate=0.9, seed=5)  # the opener must resume cut bodies too
    got = {s["__key__"]: s for s in wds.WebDataset(url, shardshuffle=False)}
    assert sorted(got) == sorted(samples)
    for key, members in samples.items():
        assert got[key]["hi.jpg"] == members["hi.jpg"]
        assert got[key]["meta.json"] == members["meta.json"]
    assert fault_proxy.counts["cuts"] > 0
    with wds.gopen(url) as f:
        assert f.read(512)[:len("slide0")] == b"slide0"
    with pytest.raises(StorageError, match="open_write"):
        wds.gopen(url, "wb")


def test_fetch_local_caches_by_etag(s3_bucket, tmp_path):
    storage.configure(StorageConfig(cache_dir=str(tmp_path / "cache")))
    url = storage.join(s3_bucket, "slides/a.svs")
    storage.write_bytes(url, b"version-1")
    first = storage.fetch_local(url)
    assert first.read_bytes() == b"version-1" and first.suffix == ".svs"
    assert first.is_relative_to(tmp_path / "cache")

    # A cached copy is reused without reading the object again.
    def no_read(*a, **k):
        raise AssertionError("re-downloaded")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(storage, "_S3RangeReader", no_read)
        assert storage.fetch_local(url) == first

    storage.write_bytes(url, b"version-2")  # same size, new content -> new ETag
    second = storage.fetch_local(url)
    assert second != first and second.read_bytes() == b"version-2"
    assert not first.exists()  # the stale copy is removed
    with pytest.raises(FileNotFoundError):
        storage.fetch_local(storage.join(s3_bucket, "slides/none.svs"))


def test_fetch_local_never_keeps_a_partial_copy(s3_bucket, tmp_path):
    storage.configure(StorageConfig(cache_dir=str(tmp_path / "cache")))
    url = storage.join(s3_bucket, "slides/b.tiff")
    storage.write_bytes(url, _payload(3 * MiB))

    def killed(src, dst, length=0):
        dst.write(src.read(1000))
        raise KeyboardInterrupt  # e.g. the job was killed mid-download
    with pytest.MonkeyPatch.context() as mp, pytest.raises(KeyboardInterrupt):
        mp.setattr(storage.shutil, "copyfileobj", killed)
        storage.fetch_local(url)
    assert [p for p in (tmp_path / "cache").rglob("*") if p.is_file()] == []
    assert storage.fetch_local(url).read_bytes() == _payload(3 * MiB)


def test_forked_child_and_subprocess_get_their_own_clients(s3_bucket):
    url = storage.join(s3_bucket, "x.json")
    storage.write_json(url, {"v": 1})
    parent_client = storage.s3_client()
    # Fork while the client lock is held (as when another thread is building a client): the
    # child must neither deadlock on it nor reuse the parent's client and pooled sockets.
    with storage._lock:
        pid = os.fork()
        if pid == 0:  # never return into pytest from here: always os._exit
            try:
                # SIG_DFL first: pytest-timeout's SIGALRM handler would not end the child.
                signal.signal(signal.SIGALRM, signal.SIG_DFL)
                signal.alarm(10)  # a deadlocked child dies instead of hanging the test
                ok = (storage.s3_client() is not parent_client
                      and storage.read_json(url) == {"v": 1})
                os._exit(0 if ok else 1)
            finally:
                os._exit(2)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    # A separate process reaches the same moto server through the environment alone.
    code = f"from fusedist import storage; print(storage.read_json({url!r})['v'])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, cwd=Path(__file__).parents[1])
    assert out.returncode == 0 and out.stdout.strip() == "1", out.stderr
