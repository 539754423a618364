"""Downloading MNIST from mirrors: a real HTTP server on 127.0.0.1 serves generated files, intact and broken."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import pty
import re
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import pytest

from cli.main import main
from tasks.mnist_data import OFFICIAL_MD5, DownloadError, download_mnist, resolve_mirrors
from training.mnist_idx import MNIST_FILES

ROOT = Path(__file__).resolve().parents[1]
TRAIN_IMAGES = MNIST_FILES["train_images"]


class MirrorHandler(BaseHTTPRequestHandler):
    """GET /<mode>/<file name>: `good` serves the file; `truncated` and `corrupt` serve a damaged train-images
    file (with a correct Content-Length); `flaky` answers 503 to the first request for each file; `cut` promises
    the whole file and closes the connection halfway; `redirect` sends it on to `good`. Anything else is a 404."""

    files: ClassVar[dict[str, bytes]] = {}
    requests: ClassVar[list[str]] = []
    seen: ClassVar[set[str]] = set()

    def do_GET(self):
        self.requests.append(self.path)
        mode, _, name = self.path.strip("/").partition("/")
        body = self.files.get(name)
        if body is None or mode not in ("good", "truncated", "corrupt", "flaky", "cut", "redirect"):
            return self.send_error(404)
        if mode == "redirect":
            self.send_response(302)
            self.send_header("Location", f"/good/{name}")
            self.send_header("Content-Length", "0")
            return self.end_headers()
        if mode == "flaky" and self.path not in self.seen:
            self.seen.add(self.path)
            return self.send_error(503)
        if name == TRAIN_IMAGES and mode == "truncated":
            body = body[: len(body) // 2]
        elif name == TRAIN_IMAGES and mode == "corrupt":
            body = body[:100] + bytes([body[100] ^ 0xFF]) + body[101:]
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[: len(body) // 2] if mode == "cut" else body)

    def log_message(self, *args):  # keep the test output clean
        pass


@pytest.fixture(scope="module")
def mirror(small_mnist):
    """Base URL of the mirror server, for the whole module (each test starts with an empty request log)."""
    MirrorHandler.files = {name: (small_mnist / name).read_bytes() for name in MNIST_FILES.values()}
    server = ThreadingHTTPServer(("127.0.0.1", 0), MirrorHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


@pytest.fixture(autouse=True)
def small_md5sums(small_mnist, tmp_path, monkeypatch):
    """The small set's sums in md5sum format, named by the configuration as a private dataset's would be."""
    sums = tmp_path / "small.md5"
    sums.write_text("".join(f"{hashlib.md5((small_mnist / n).read_bytes()).hexdigest()}  {n}\n" for n in OFFICIAL_MD5))
    monkeypatch.setenv("MNIST_PIPELINE_MNIST_MD5SUMS", str(sums))
    monkeypatch.delenv("MNIST_MIRROR", raising=False)
    MirrorHandler.requests.clear()
    MirrorHandler.seen.clear()


@pytest.fixture
def hanging_mirror():
    """A server that accepts connections (the kernel does) and never answers."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        yield f"http://127.0.0.1:{listener.getsockname()[1]}/mnist/"


def assert_verified_copy(dest: Path, source: Path):
    for name in MNIST_FILES.values():
        assert (dest / name).read_bytes() == (source / name).read_bytes(), name
    assert sorted(p.name for p in dest.iterdir()) == sorted([*MNIST_FILES.values(), ".lock"]), "no partial file"


def test_downloads_and_verifies_over_http(mirror, small_mnist, tmp_path):
    assert download_mnist(tmp_path / "cache", mirrors=f"{mirror}/good", backoff=0) == tmp_path / "cache"
    assert_verified_copy(tmp_path / "cache", small_mnist)
    assert len(MirrorHandler.requests) == 4


def test_cache_is_reused_and_a_damaged_copy_replaced(mirror, small_mnist, tmp_path, caplog):
    cache = tmp_path / "cache"
    download_mnist(cache, mirrors=f"{mirror}/good", backoff=0)
    MirrorHandler.requests.clear()
    caplog.set_level(logging.INFO, logger="tasks.mnist_data")
    download_mnist(cache, mirrors=f"{mirror}/nowhere", backoff=0)  # a dead mirror is never asked
    assert MirrorHandler.requests == []
    assert caplog.text.count("cached copy") == 4

    (cache / TRAIN_IMAGES).write_bytes(b"damaged")
    download_mnist(cache, mirrors=f"{mirror}/good", backoff=0)
    assert MirrorHandler.requests == [f"/good/{TRAIN_IMAGES}"]
    assert "does not match md5" in caplog.text
    assert_verified_copy(cache, small_mnist)


@pytest.mark.parametrize("mode", ["truncated", "corrupt"])
def test_bad_copy_falls_back_to_the_next_mirror(mirror, small_mnist, tmp_path, caplog, mode):
    download_mnist(tmp_path / "cache", mirrors=[f"{mirror}/{mode}", f"{mirror}/good"], backoff=0)
    assert_verified_copy(tmp_path / "cache", small_mnist)
    assert f"/{mode}/{TRAIN_IMAGES}: checksum mismatch" in caplog.text
    # A copy with the wrong sum is not asked for again: one request per mirror for that file.
    assert MirrorHandler.requests.count(f"/{mode}/{TRAIN_IMAGES}") == 1


def test_checksum_mismatch_names_file_and_sums_and_leaves_nothing(mirror, small_mnist, tmp_path, monkeypatch):
    monkeypatch.delenv("MNIST_PIPELINE_MNIST_MD5SUMS")  # the official sums: the small files cannot match
    actual = hashlib.md5((small_mnist / TRAIN_IMAGES).read_bytes()).hexdigest()
    with pytest.raises(DownloadError) as caught:
        download_mnist(tmp_path / "cache", mirrors=f"{mirror}/good", backoff=0)
    message = str(caught.value)
    assert message.startswith(f"{TRAIN_IMAGES}: no mirror served a verified copy")
    assert f"expected md5 {OFFICIAL_MD5[TRAIN_IMAGES]}, got {actual}" in message
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [".lock"], "nothing partial or unverified is kept"


def test_404_moves_on_and_is_not_retried(mirror, small_mnist, tmp_path):
    download_mnist(tmp_path / "cache", mirrors=[f"{mirror}/missing", f"{mirror}/good"], backoff=0)
    assert_verified_copy(tmp_path / "cache", small_mnist)
    # The mirror that answered goes first for the next files: the 404 mirror was asked once in all.
    assert [r for r in MirrorHandler.requests if r.startswith("/missing/")] == [f"/missing/{TRAIN_IMAGES}"]


def test_transient_errors_are_retried_on_the_same_mirror(mirror, small_mnist, tmp_path):
    download_mnist(tmp_path / "cache", mirrors=f"{mirror}/flaky", backoff=0.01)
    assert_verified_copy(tmp_path / "cache", small_mnist)
    assert len(MirrorHandler.requests) == 8, "each file: a 503, then the retry"


def test_a_connection_cut_mid_file_leaves_nothing_partial(mirror, tmp_path):
    with pytest.raises(DownloadError, match=r"connection closed after \d+ of \d+ bytes") as caught:
        download_mnist(tmp_path / "cache", mirrors=f"{mirror}/cut", rounds=2, backoff=0)
    assert len(re.findall(r"^  http.*/cut/.*connection closed", str(caught.value), re.M)) == 2, "retried, given up"
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [".lock"]


def test_a_hanging_mirror_times_out_and_the_next_one_serves(mirror, hanging_mirror, small_mnist, tmp_path, caplog):
    started = time.monotonic()
    download_mnist(tmp_path / "cache", mirrors=[hanging_mirror, f"{mirror}/good"], timeout=0.5, backoff=0)
    assert_verified_copy(tmp_path / "cache", small_mnist)
    assert "timed out" in caplog.text
    # One timeout in all: after it, the mirror that answered is asked first.
    assert caplog.text.count("timed out") == 1
    assert time.monotonic() - started < 10


@pytest.mark.parametrize("mirror", [str, Path.as_uri], ids=["directory", "file-url"])
def test_directory_and_file_url_mirrors(small_mnist, tmp_path, mirror):
    download_mnist(tmp_path / "copy", mirrors=mirror(small_mnist))
    assert_verified_copy(tmp_path / "copy", small_mnist)


def test_leftovers_of_a_killed_download_are_removed(small_mnist, tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / f".{TRAIN_IMAGES}.abc123.part").write_bytes(b"half a file")
    download_mnist(cache, mirrors=str(small_mnist))
    assert_verified_copy(cache, small_mnist)


def test_mirror_list_defaults():
    assert resolve_mirrors()[0] == "https://ossci-datasets.s3.amazonaws.com/mnist/"


def test_mirror_list_from_the_environment(small_mnist, monkeypatch):
    monkeypatch.setenv("MNIST_MIRROR", f"http://127.0.0.1:1/a, {small_mnist}")
    assert resolve_mirrors() == ["http://127.0.0.1:1/a/", small_mnist.as_uri() + "/"]
    assert resolve_mirrors("") == resolve_mirrors(None), "an empty DAG param means the configured mirrors"


def test_mirror_list_from_the_argument():
    assert resolve_mirrors(["file:///x/", "http://h/y"]) == ["file:///x/", "http://h/y/"]
    with pytest.raises(ValueError, match="'no/such/dir' is neither a URL nor an existing directory"):
        resolve_mirrors("no/such/dir")
    with pytest.raises(ValueError, match="only http"):
        resolve_mirrors("ftp://example.com/mnist")


def test_cli_download(mirror, small_mnist, tmp_path, capsys):
    dest = tmp_path / "cli"
    mirrors = ["--mirror", f"{mirror}/missing", "--mirror", f"{mirror}/good"]
    assert main(["data", "download", *mirrors, "--dest", str(dest)]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == str(dest)
    assert f"{TRAIN_IMAGES}: downloaded from {mirror}/good/" in err and "━" not in err, "logs, no bar, off a terminal"
    assert_verified_copy(dest, small_mnist)
    assert main(["data", "download", "--mirror", f"{mirror}/missing", "--dest", str(tmp_path / "none")]) == 1
    assert f"error: {TRAIN_IMAGES}: no mirror served a verified copy" in capsys.readouterr().err


def test_progress_bar_on_a_terminal(small_mnist, tmp_path):
    controller, terminal = pty.openpty()
    command = [sys.executable, "-m", "cli.main", "data", "download", "--mirror", str(small_mnist)]
    process = subprocess.Popen([*command, "--dest", str(tmp_path)], cwd=ROOT, stderr=terminal)
    os.close(terminal)
    shown = b""
    with contextlib.suppress(OSError):  # EIO once the child has exited and everything was read
        while chunk := os.read(controller, 65536):
            shown += chunk
    os.close(controller)
    assert process.wait(timeout=60) == 0
    assert TRAIN_IMAGES.encode() in shown and "━".encode() in shown


@pytest.mark.real_data
def test_official_files_verify_against_the_official_md5(real_mnist, tmp_path, monkeypatch):
    monkeypatch.delenv("MNIST_PIPELINE_MNIST_MD5SUMS")
    monkeypatch.setenv("MNIST_MIRROR", str(real_mnist))
    cache = download_mnist(tmp_path / "cache")
    for name, md5 in OFFICIAL_MD5.items():
        assert hashlib.md5((cache / name).read_bytes()).hexdigest() == md5


def test_the_trigger_forms_mirror_is_held_to_the_allow_list(mirror, small_mnist, tmp_path, monkeypatch):
    """Only allowed URL prefixes and directories under allowed roots; never a link-local or metadata address; a
    redirect out of the allow-list is refused; a file over the size cap is refused and nothing partial is kept."""
    from tasks.config import load_config
    from tasks.mnist_data import MirrorPolicy, MirrorRefused, allowed_mirrors

    monkeypatch.delenv("MNIST_MIRROR", raising=False)
    config = load_config(mnist_mirrors_allowed=f"{mirror}/good", mnist_mirror_roots=str(small_mnist))
    assert allowed_mirrors(f"{mirror}/good", config) == [f"{mirror}/good/"]
    assert allowed_mirrors(str(small_mnist), config) == [small_mnist.resolve().as_uri() + "/"]
    assert allowed_mirrors("", config) is None  # empty: $MNIST_MIRROR or the defaults
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    for entry, message in (
        (f"{mirror}/missing", f"MNIST mirror {mirror}/missing/ is not allowed: use one of {mirror}/good/"),
        ("http://169.254.169.254/latest/meta-data/", "is not allowed"),
        (str(outside), f"MNIST mirror {outside} is not under an allowed directory: {small_mnist.resolve()}"),
        (f"{small_mnist}/../../..", "is not under an allowed directory"),
    ):
        with pytest.raises(MirrorRefused, match=re.escape(message)):
            allowed_mirrors(entry, config)
    metadata = load_config(mnist_mirrors_allowed="http://169.254.169.254/")
    with pytest.raises(
        MirrorRefused, match=re.escape("169.254.169.254 is 169.254.169.254, a link-local or metadata address")
    ):
        allowed_mirrors("http://169.254.169.254/latest/", metadata)  # even when allow-listed
    # The administrator's own $MNIST_MIRROR is allowed as it is.
    monkeypatch.setenv("MNIST_MIRROR", str(outside))
    assert allowed_mirrors(str(outside), load_config()) == [outside.resolve().as_uri() + "/"]

    # A redirect leaves the allow-list: refused, and nothing is downloaded from where it points.
    policy = MirrorPolicy(load_config(mnist_mirrors_allowed=f"{mirror}/redirect"))
    with pytest.raises(DownloadError, match=r"redirected to .* refused"):
        download_mnist(tmp_path / "redirected", mirrors=f"{mirror}/redirect", backoff=0, rounds=1, policy=policy)
    # A file over the cap: refused, and the cache keeps nothing of it.
    small = load_config(mnist_max_file_bytes=100)
    with pytest.raises(DownloadError, match=r"over the 100 bytes a file may have|bytes, over the 100 a file may have"):
        download_mnist(tmp_path / "capped", mirrors=f"{mirror}/good", backoff=0, rounds=1, config=small)
    assert not [p for p in (tmp_path / "capped").iterdir() if p.name != ".lock"]
