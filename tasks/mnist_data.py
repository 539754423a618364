"""MNIST in, verified byte for byte; MNIST out, to an immutable content-addressed prefix in S3.

Download: each of the four files comes from the first mirror that serves it with the expected MD5 (the official
sums, or an md5sum file named by the `mnist_md5sums` setting). Mirrors are http(s) URLs, file:// URLs or local
directories; a failed attempt moves on to the next mirror, with backoff between attempts. Files land in the cache
by rename only once verified, so the cache never holds a partial or unverified file.

Upload: the dataset's address is the SHA-256 of its manifest (a `sha256sum` listing of the four files), written
last under `<prefix>/datasets/mnist/<sha256>/`. A prefix without its manifest is an unfinished upload that no one
takes as a dataset: the skip check requires it, and a rerun completes the upload.

Imported by DAG tasks: airflow and boto3 are imported inside the functions that use them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import http.client
import ipaddress
import logging
import os
import socket
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Iterator
from pathlib import Path

from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_exponential

from tasks.config import PUBLIC_MNIST_MIRRORS, PipelineConfig, comma_list, load_config
from tasks.hooks import s3_hook
from tasks.s3 import UploadError, put_once, stored_difference
from training.channel import MANIFEST
from training.mnist_idx import MNIST_FILES

log = logging.getLogger(__name__)

OFFICIAL_MD5 = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
DEFAULT_MIRRORS = PUBLIC_MNIST_MIRRORS
TIMEOUT_S = 30.0
ROUNDS = 3  # times each mirror is tried before a file is given up
_CHUNK = 1 << 16


class MirrorRefused(ValueError):
    """A mirror the configuration does not allow; the message names it and what is allowed."""


class DownloadError(RuntimeError):
    """No mirror served a copy of a file that matches its checksum; the message lists every attempt."""


class _MirrorFailed(Exception):
    """One attempt at one mirror failed; ``permanent`` when asking that mirror again cannot help."""

    def __init__(self, message: str, permanent: bool):
        super().__init__(message)
        self.permanent = permanent


# -- download ----------------------------------------------------------------------------------------------------


def resolve_mirrors(mirrors: str | Iterable[str] | None = None) -> list[str]:
    """Mirror base URLs, in order: the argument, else $MNIST_MIRROR, else the defaults (comma-separated lists ok)."""
    if isinstance(mirrors, str):
        mirrors = [mirrors]
    entries = [entry for item in (mirrors or []) for entry in comma_list(item)]
    if not entries:
        entries = list(comma_list(os.environ.get("MNIST_MIRROR", "")))
    return [_mirror_url(entry) for entry in entries or DEFAULT_MIRRORS]


def _mirror_url(entry: str) -> str:
    scheme = entry.split("://", 1)[0].lower() if "://" in entry else ""
    if not scheme:
        directory = Path(entry).expanduser().resolve()
        if not directory.is_dir():
            raise ValueError(f"MNIST mirror {entry!r} is neither a URL nor an existing directory")
        entry = directory.as_uri()
    elif scheme not in ("http", "https", "file"):
        raise ValueError(f"MNIST mirror {entry!r}: only http(s):// and file:// URLs or directories are supported")
    return entry.rstrip("/") + "/"


def _local_path(url: str) -> Path:
    """The directory a file:// mirror URL names."""
    return Path(urllib.request.url2pathname(urllib.parse.urlsplit(url).path))


def _refused_address(url: str) -> str | None:
    """Why ``url``'s host may not be asked (it resolves to a link-local or a cloud metadata address), else None."""
    host = urllib.parse.urlsplit(url).hostname
    if not host:
        return f"{url} names no host"
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except OSError:
        return None  # it cannot be reached either; the download names the failure
    for address in addresses:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
        if ip.is_link_local or ip == ipaddress.ip_address("fd00:ec2::254"):
            return f"{url}: {host} is {ip}, a link-local or metadata address"
    return None


class MirrorPolicy:
    """What the trigger form's mirror may be: an allowed URL prefix (redirects too), or a directory under an
    allowed root; never a link-local or metadata address. The administrator's $MNIST_MIRROR entries are allowed."""

    def __init__(self, config: PipelineConfig):
        trusted = [_mirror_url(entry) for entry in comma_list(os.environ.get("MNIST_MIRROR", ""))]
        self.prefixes = [_mirror_url(prefix) for prefix in comma_list(config.mnist_mirrors_allowed)] + [
            url for url in trusted if not url.startswith("file:")
        ]
        self.roots = [Path(root).expanduser().resolve() for root in comma_list(config.mnist_mirror_roots)] + [
            _local_path(url) for url in trusted if url.startswith("file:")
        ]

    def check(self, url: str) -> None:
        """MirrorRefused naming ``url`` unless it is allowed."""
        if url.startswith("file:"):
            path = _local_path(url).resolve()
            if not any(path.is_relative_to(root) for root in self.roots):
                roots = ", ".join(map(str, self.roots)) or "none (the mnist_mirror_roots setting)"
                raise MirrorRefused(f"MNIST mirror {path} is not under an allowed directory: {roots}")
            return
        if not any(url.startswith(prefix) for prefix in self.prefixes):
            raise MirrorRefused(
                f"MNIST mirror {url} is not allowed: use one of {', '.join(self.prefixes)} "
                "(the mnist_mirrors_allowed setting)"
            )
        if reason := _refused_address(url):
            raise MirrorRefused(f"MNIST mirror refused: {reason}")

    def allowed(self, mirrors: str | None) -> list[str] | None:
        """The trigger form's ``mnist_mirror`` as mirror URLs, each checked (MirrorRefused naming the first that
        is not allowed); None when it is empty (then $MNIST_MIRROR or the defaults serve)."""
        urls = [_mirror_url(entry) for entry in comma_list(mirrors or "")]
        for url in urls:
            self.check(url)
        return urls or None


def allowed_mirrors(mirrors: str | None, config: PipelineConfig) -> list[str] | None:
    """``MirrorPolicy(config).allowed(mirrors)``."""
    return MirrorPolicy(config).allowed(mirrors)


class _AllowedRedirects(urllib.request.HTTPRedirectHandler):
    """Follow a redirect only where the policy allows a mirror to be."""

    def __init__(self, policy: MirrorPolicy):
        self.policy = policy

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        try:
            self.policy.check(newurl)
        except MirrorRefused as refused:
            raise _MirrorFailed(f"{req.full_url}: redirected to {newurl}, refused: {refused}", permanent=True) from None
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def expected_md5(config: PipelineConfig | None = None) -> dict[str, str]:
    """MD5 by file name: the official sums, or those of the md5sum-format file the `mnist_md5sums` setting names."""
    source = (config or load_config()).mnist_md5sums
    if not source:
        return dict(OFFICIAL_MD5)
    sums = {}
    for line in Path(source).read_text().splitlines():
        if line.strip():
            digest, name = line.split(maxsplit=1)
            sums[Path(name.lstrip("*")).name] = digest.lower()
    missing = [name for name in MNIST_FILES.values() if name not in sums]
    if missing:
        raise ValueError(f"{source}: no MD5 sum for {', '.join(missing)}")
    return {name: sums[name] for name in MNIST_FILES.values()}


def default_cache_dir(config: PipelineConfig | None = None) -> Path:
    return Path(os.environ.get("MNIST_CACHE") or Path((config or load_config()).state_dir) / "mnist")


def _file_md5(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "md5").hexdigest()


def download_mnist(
    dest: str | os.PathLike | None = None,
    mirrors: str | Iterable[str] | None = None,
    *,
    config: PipelineConfig | None = None,
    timeout: float = TIMEOUT_S,
    rounds: int = ROUNDS,
    backoff: float = 1.0,
    policy: MirrorPolicy | None = None,
) -> Path:
    """Make sure ``dest`` (default: $MNIST_CACHE or <state_dir>/mnist) holds the four verified files; return it.

    Files already there with the right MD5 are kept. Raises DownloadError naming the file (and, for a corrupt
    copy, the expected and the actual sum) when no mirror serves it intact, a file is over the size cap, or the
    whole download passes its deadline (the mnist_max_file_bytes and mnist_download_seconds settings). With a
    ``policy``, redirects go only where it allows.
    """
    config = config or load_config()
    limits = _Limits(
        config.mnist_max_file_bytes,
        time.monotonic() + config.mnist_download_seconds,
        urllib.request.build_opener(_AllowedRedirects(policy)) if policy else None,
    )
    sums = expected_md5(config)
    order = resolve_mirrors(mirrors)
    dest = Path(dest) if dest else default_cache_dir(config)
    dest.mkdir(parents=True, exist_ok=True)
    # One downloader per cache at a time: concurrent runs then find the files verified, and any temporary file
    # left in it can only be the leftover of a killed process.
    with open(dest / ".lock", "w") as lock, _progress_bar() as progress:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for leftover in dest.glob(".*.part"):
            leftover.unlink()
        for name, md5 in sums.items():
            target = dest / name
            if target.is_file():
                if _file_md5(target) == md5:
                    log.info("%s: cached copy in %s matches md5 %s", name, dest, md5)
                    continue
                log.warning("%s: cached copy does not match md5 %s; downloading it again", name, md5)
            mirror = _download_file(name, md5, target, order, timeout, rounds, backoff, progress, limits)
            # The mirror that served this file is asked first for the next one (a dead mirror costs one timeout).
            order.remove(mirror)
            order.insert(0, mirror)
    return dest


@dataclasses.dataclass(frozen=True)
class _Limits:
    max_bytes: int
    deadline: float  # time.monotonic()
    opener: urllib.request.OpenerDirector | None = None  # None: urllib's own


def _download_file(name, md5, target, mirrors, timeout, rounds, backoff, progress, limits: _Limits) -> str:
    """Fetch one file into ``target`` from the first mirror that serves it intact; return that mirror."""
    pending = list(mirrors)  # a failed mirror goes to the back, or out when asking again cannot help
    failures = []
    retrying = Retrying(
        retry=retry_if_exception_type(_MirrorFailed),
        stop=stop_after_attempt(rounds * len(mirrors))
        | (lambda _state: not pending)
        | (lambda _state: time.monotonic() > limits.deadline),
        wait=wait_exponential(multiplier=backoff, max=10 * backoff),
        reraise=True,
    )
    try:
        for attempt in retrying:
            with attempt:
                mirror = pending.pop(0)
                remaining = limits.deadline - time.monotonic()
                if remaining <= 0:
                    failures.append("the download's deadline passed (the mnist_download_seconds setting)")
                    break
                try:
                    _fetch(mirror + name, target, md5, min(timeout, remaining), progress, limits)
                except _MirrorFailed as exc:
                    log.warning("%s: attempt %d failed: %s", name, attempt.retry_state.attempt_number, exc)
                    failures.append(str(exc))
                    if not exc.permanent:
                        pending.append(mirror)
                    raise
                log.info("%s: downloaded from %s, md5 %s verified", name, mirror, md5)
                return mirror
    except _MirrorFailed:
        pass
    raise DownloadError(f"{name}: no mirror served a verified copy:\n" + "\n".join(f"  {f}" for f in failures))


def _fetch(url: str, target: Path, md5: str, timeout: float, progress, limits: _Limits) -> None:
    request = urllib.request.Request(url, headers={"User-Agent": "mnist-pipeline"})
    opener = limits.opener.open if limits.opener else urllib.request.urlopen
    try:
        with opener(request, timeout=timeout) as response, _atomic_file(target) as out:
            size = int(response.headers.get("Content-Length") or 0) or None
            if size is not None and size > limits.max_bytes:
                raise _MirrorFailed(f"{url}: {size} bytes, over the {limits.max_bytes} a file may have", permanent=True)
            task = progress.add_task(target.name, total=size) if progress else None
            digest, received = hashlib.md5(), 0
            try:
                while chunk := response.read(_CHUNK):
                    digest.update(chunk)
                    out.write(chunk)
                    received += len(chunk)
                    if received > limits.max_bytes:
                        raise _MirrorFailed(f"{url}: over the {limits.max_bytes} bytes a file may have", permanent=True)
                    if time.monotonic() > limits.deadline:
                        raise _MirrorFailed(f"{url}: the download's deadline passed", permanent=True)
                    if progress:
                        progress.advance(task, len(chunk))
            finally:
                if progress:
                    progress.remove_task(task)
            if size is not None and received != size:  # the connection broke: worth another try
                raise _MirrorFailed(f"{url}: connection closed after {received} of {size} bytes", permanent=False)
            if digest.hexdigest() != md5:
                raise _MirrorFailed(
                    f"{url}: checksum mismatch for {target.name}: expected md5 {md5}, got {digest.hexdigest()}",
                    permanent=True,
                )
    except urllib.error.HTTPError as exc:
        raise _MirrorFailed(f"{url}: HTTP {exc.code} {exc.reason}", permanent=not _retryable_status(exc.code)) from exc
    except urllib.error.URLError as exc:
        # Name resolution or a missing local file fail the same way on the next try.
        permanent = isinstance(exc.reason, socket.gaierror | FileNotFoundError | NotADirectoryError)
        raise _MirrorFailed(f"{url}: {exc.reason}", permanent=permanent) from exc
    except (OSError, http.client.HTTPException) as exc:  # timeouts, resets, a body cut short
        raise _MirrorFailed(f"{url}: {type(exc).__name__}: {exc or 'connection failed'}", permanent=False) from exc


def _retryable_status(code: int) -> bool:
    return code in (408, 425, 429) or code >= 500


@contextlib.contextmanager
def _atomic_file(target: Path) -> Iterator:
    """A temporary file next to ``target`` that becomes ``target`` only if the block completes."""
    fd, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out:
            yield out
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def _progress_bar():
    """A rich progress bar when a person watches a terminal; nothing in task logs and pipes."""
    if not sys.stderr.isatty():
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn())
    with Progress(*columns, console=Console(stderr=True)) as progress:
        yield progress


def download_command(args) -> int:
    """`mnist-pipeline data download [--mirror M]... [--dest DIR]`: prints the directory of verified files."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr, force=True)
    try:
        print(download_mnist(args.dest, mirrors=args.mirror))
    except (DownloadError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


# -- upload ------------------------------------------------------------------------------------------------------


def _read_dataset(directory: str | os.PathLike) -> dict[str, bytes]:
    return {name: (Path(directory) / name).read_bytes() for name in MNIST_FILES.values()}


def _manifest(bodies: dict[str, bytes]) -> bytes:
    """The `sha256sum` listing of the four files, in the fixed order of MNIST_FILES."""
    return "".join(f"{hashlib.sha256(body).hexdigest()}  {name}\n" for name, body in bodies.items()).encode()


def dataset_sha256(directory: str | os.PathLike) -> str:
    """The dataset's content address: the SHA-256 of its manifest (`sha256sum SHA256SUMS` gives the same)."""
    return hashlib.sha256(_manifest(_read_dataset(directory))).hexdigest()


def upload_dataset(directory: str | os.PathLike, config: PipelineConfig | None = None) -> str:
    """Store the four files under s3://<bucket>/<prefix>/datasets/mnist/<sha256>/ and return that URI.

    Skips (and logs so) when the complete dataset is already there. Each object is written once (tasks.s3.put_once:
    with its SHA-256 and MD5, which S3 checks, and only where nothing is) and checked as stored. The manifest goes
    last, so an interrupted upload never looks complete; the files it left are reused by the next attempt. A key of
    the dataset that holds another body is an error naming it: nothing there is deleted or replaced.
    """

    config = config or load_config()
    objects = _read_dataset(directory)
    objects[MANIFEST] = _manifest(objects)  # last: it marks the dataset complete
    key_prefix = f"{config.prefix.strip('/')}/datasets/mnist/{hashlib.sha256(objects[MANIFEST]).hexdigest()}/"
    uri = f"s3://{config.bucket}/{key_prefix}"
    hook = s3_hook(config)
    _ensure_bucket(hook, config)
    client, bucket = hook.conn, config.bucket

    intact = {name for name, body in objects.items() if not stored_difference(client, bucket, key_prefix + name, body)}
    if len(intact) == len(objects):
        log.info("%s already holds this dataset with matching checksums: skipping the upload", uri)
        return uri
    if intact:
        log.info("%s: reusing %s, stored intact by an earlier attempt", uri, ", ".join(sorted(intact)))
    written = [
        name
        for name, body in objects.items()
        if name not in intact and put_once(client, bucket, key_prefix + name, body)
    ]
    log.info("%s: uploaded and verified %s", uri, ", ".join(written))
    return uri


def _ensure_bucket(hook, config: PipelineConfig) -> None:
    """UploadError naming the bucket unless the pipeline may use its prefix there. The bucket is the deployment's
    (on a laptop, `mnist-pipeline up` makes it): a run never creates one. Asked by listing the prefix, not with
    HeadBucket: S3 authorizes that as s3:ListBucket on the whole bucket, which the pipeline's policy does not grant."""
    from botocore.exceptions import ClientError

    prefix = f"{config.prefix.strip('/')}/"
    try:
        hook.conn.list_objects_v2(Bucket=config.bucket, Prefix=prefix, MaxKeys=1)
    except ClientError as error:
        code = error.response["Error"]["Code"]
        if code == "NoSuchBucket":
            raise UploadError(
                f"S3 bucket {config.bucket!r} does not exist: create it, or set `bucket` in the "
                "mnist_pipeline configuration"
            ) from None
        raise UploadError(
            f"connection {config.aws_conn_id!r} may not list s3://{config.bucket}/{prefix} "
            f"({code}: {error.response['Error']['Message']})"
        ) from None
