"""The download tool against HTTP servers on 127.0.0.1 that the tests start.

Text files: TFDS's download manager, checked against ``tfds/mnre/checksums.tsv`` (the tests pin
their own digests in its place). Images: ``gdown`` against a server that behaves like Google
Drive (a confirmation page whose form leads to the file, which is served with ``Range``
support); requests for ``*.google.com`` are sent to that server instead.
"""

import hashlib
import http.server
import io
import random
import socket
import tarfile
import urllib.parse
import zipfile

import pytest
import requests
from local_http import LocalHTTPServer
from PIL import Image

from roc_jax.data import download

TEXT = {"mnre_train.txt": b"train\n" * 500, "mnre_val%20.txt": b"val\n" * 100,
        "mnre_test.txt": b"test\n" * 50, "ours_rel2id.json": b'{"None": 0}'}


class _Server:
    """Serves ``files`` ({url path: bytes}) with Range support; can cut responses halfway.

    ``/uc?id=ID`` answers with Drive's confirmation page (no Content-Disposition); the page's
    form leads to ``/download?id=ID&export=download&confirm=t&uuid=...``, which serves
    ``drive[ID]`` as an attachment.
    """

    def __init__(self):
        self.files, self.drive = {}, {}
        self.cut = {}  # path -> how many more responses to cut halfway
        self.requests = []  # (path, Range header or None)
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                parts = urllib.parse.urlsplit(self.path)
                query = urllib.parse.parse_qs(parts.query)
                outer.requests.append((self.path, self.headers.get("Range")))
                if parts.path == "/uc":
                    page = _CONFIRMATION.format(id=query["id"][0]).encode()
                    self.send_response(200)
                    self.send_header("Content-Type", "text/html; charset=utf-8")
                    self.send_header("Content-Length", str(len(page)))
                    self.end_headers()
                    self.wfile.write(page)
                    return
                if parts.path == "/download":
                    if query.get("confirm") != ["t"] or query["id"][0] not in outer.drive:
                        self.send_error(403)
                        return
                    self._send(parts.path, outer.drive[query["id"][0]],
                               'attachment; filename="mnre_image.zip"')
                    return
                if self.path not in outer.files:
                    self.send_error(404)
                    return
                self._send(self.path, outer.files[self.path], None)

            def _send(self, path, data, disposition):
                start = 0
                if self.headers.get("Range"):
                    start = int(self.headers["Range"].split("=")[1].split("-")[0])
                    self.send_response(206)
                    self.send_header("Content-Range",
                                     f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("Content-Length", str(len(body)))
                if disposition:
                    self.send_header("Content-Disposition", disposition)
                self.end_headers()
                if outer.cut.get(path, 0) > 0:
                    outer.cut[path] -= 1
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self.wfile.write(body)

        self._http = LocalHTTPServer(Handler)
        self.url = self._http.url
        self.port = self._http.httpd.server_address[1]

    def close(self):
        self._http.close()


# What Drive answers for a file too large to scan for viruses (the form gdown parses).
_CONFIRMATION = """<!DOCTYPE html><html><head><title>Google Drive - Virus scan warning</title>
</head><body><div class="uc-main"><p class="uc-warning-caption">Google Drive can't scan this file
for viruses.</p>
<form id="download-form" action="https://drive.usercontent.google.com/download" method="get"><input type="submit" id="uc-download-link" value="Download anyway"/><input type="hidden" name="id" value="{id}"><input type="hidden" name="export" value="download"><input type="hidden" name="confirm" value="t"><input type="hidden" name="uuid" value="0c5e6b1e-aaaa-bbbb-cccc-1234567890ab"></form>
</div></body></html>
"""


@pytest.fixture
def server(monkeypatch, tmp_path_factory):
    s = _Server()
    s.files.update({"/" + k: v for k, v in TEXT.items()})
    _pin(monkeypatch, tmp_path_factory.mktemp("pins") / "checksums.tsv",
         {k: v for k, v in TEXT.items() if k != "mnre_test.txt"})
    yield s
    s.close()


def _pin(monkeypatch, path, files):
    """A checksums.tsv of ``files`` ({upstream name: bytes}) in place of the real one."""
    upstream = {url.rsplit("/", 1)[-1]: url for url in download.MNRE_FILES.values()}
    with open(path, "w") as f:
        for name, data in files.items():
            f.write(f"{upstream[name]}\t{len(data)}\t{hashlib.sha256(data).hexdigest()}\t"
                    f"{urllib.parse.unquote(name)}\n")
    monkeypatch.setattr(download, "CHECKSUMS", path)


@pytest.fixture
def drive(server, monkeypatch):
    """Sends requests (and the reachability check) for *.google.com to ``server``."""
    real_send = requests.adapters.HTTPAdapter.send

    def send(self, request, **kwargs):
        parts = urllib.parse.urlsplit(request.url)
        if parts.hostname and parts.hostname.endswith("google.com"):
            request.url = urllib.parse.urlunsplit(
                ("http", f"127.0.0.1:{server.port}", parts.path, parts.query, ""))
        return real_send(self, request, **kwargs)

    monkeypatch.setattr(requests.adapters.HTTPAdapter, "send", send)
    real_check = download._check_reachable
    monkeypatch.setattr(download, "_check_reachable", lambda url, timeout: real_check(
        server.url if "google.com" in url else url, timeout))
    return server


def _quiet(_):
    pass


def test_text_files_fetched_verified_and_kept(server, tmp_path, capsys):
    paths = download.download_text_files(tmp_path, server.url, log=print)
    assert [p.name for p in paths] == list(download.MNRE_FILES)
    assert (tmp_path / "mnre_val.txt").read_bytes() == TEXT["mnre_val%20.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(download.MNRE_FILES)
    out = capsys.readouterr().out
    assert "mnre_train.txt sha256=" in out and "(verified)" in out
    assert f"mnre_test.txt sha256={hashlib.sha256(TEXT['mnre_test.txt']).hexdigest()} " \
           "(NOT PINNED)" in out
    # A second run keeps the verified files; only the unpinned one is fetched again.
    server.requests.clear()
    download.download_text_files(tmp_path, server.url, log=_quiet)
    assert [p for p, _ in server.requests] == ["/mnre_test.txt"]


def test_broken_text_transfer_is_retried(server, tmp_path, capsys):
    server.cut["/mnre_train.txt"] = 1
    download.download_text_files(tmp_path, server.url, log=print)
    assert (tmp_path / "mnre_train.txt").read_bytes() == TEXT["mnre_train.txt"]
    assert "retry    text files: transfer broken (ChunkedEncodingError); attempt 1/3" in \
        capsys.readouterr().out


def test_checksum_mismatch_is_an_error_and_stores_nothing(server, tmp_path):
    server.files["/mnre_train.txt"] = b"tampered\n" * 500
    with pytest.raises(download.DownloadError, match=r"checksum mismatch: Artifact .*"
                                                     r"mnre_train.txt.* has wrong checksum"):
        download.download_text_files(tmp_path, server.url, log=_quiet)
    assert not (tmp_path / "mnre_train.txt").exists()
    assert not list(tmp_path.glob(".downloads-*"))


def test_http_error_is_reported(server, tmp_path):
    del server.files["/ours_rel2id.json"]
    with pytest.raises(download.DownloadError, match=r"ours_rel2id.json. HTTP code: 404"):
        download.download_text_files(tmp_path, server.url, log=_quiet)


def _closed_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_offline_is_one_error_naming_what_to_fetch_and_where(tmp_path, capsys):
    base = f"http://127.0.0.1:{_closed_port()}"
    assert download.main(["mnre", "--dir", str(tmp_path), "--base-url", base]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot reach {base}/mnre_train.txt (")
    assert "offline or the source is down" in err
    for name, url in download.MNRE_FILES.items():
        assert f"{url} -> {tmp_path / name}" in err
    assert download.MNRE_IMAGES_URL in err
    assert f"python -m roc_jax.data.download mnre --dir {tmp_path} --images-archive" in err


def _archive(kind="zip", layout="mnre_image/img_org", n=(5, 3, 2), broken=()):
    """An image archive as the authors might pack it: ``{layout}/{split}/<img_id>.jpg``."""
    buffer = io.BytesIO()
    # Over 1 MiB, as a real archive: gdown writes 512 KiB chunks, so a transfer cut halfway has
    # bytes on disk to resume from. Files other than images are left out when unpacking.
    entries = {f"{layout}/README.bin": random.Random(0).randbytes(3 << 19)}
    for split, count in zip(download.MNRE_SPLITS, n, strict=True):
        for i in range(count):
            name = f"{layout}/{split}/twitter_{split}_{i}.jpg"
            image = io.BytesIO()
            Image.new("RGB", (20, 10), (i * 40, 90, 200)).save(image, format="JPEG")
            entries[name] = b"broken" if name in broken else image.getvalue()
    if kind == "zip":
        with zipfile.ZipFile(buffer, "w") as z:
            for name, data in entries.items():
                z.writestr(name, data)
    else:
        with tarfile.open(fileobj=buffer, mode="w:gz") as t:
            for name, data in entries.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def test_images_from_drive_end_to_end_with_a_broken_transfer(drive, tmp_path, capsys):
    archive = _archive(n=(40, 10, 8))
    drive.drive[download.MNRE_IMAGES_ID] = archive
    drive.cut["/download"] = 1  # the first transfer stops halfway
    digest = hashlib.sha256(archive).hexdigest()
    status = download.main(["mnre", "--dir", str(tmp_path / "manual"), "--base-url", drive.url,
                            "--images-sha256", digest])
    out = capsys.readouterr()
    assert status == 0, out.err
    manual = tmp_path / "manual"
    assert download.count_images(manual) == {"train": 40, "val": 10, "test": 8}
    assert (manual / "img_org" / "val" / "twitter_val_3.jpg").is_file()
    drive_requests = [(p, r) for p, r in drive.requests if p.startswith(("/uc", "/download"))]
    # The confirmation page, the file (cut), the rest of the file from where it stopped.
    assert drive_requests[0] == (f"/uc?id={download.MNRE_IMAGES_ID}", None)
    assert drive_requests[1][0].startswith(f"/download?id={download.MNRE_IMAGES_ID}"
                                           "&export=download&confirm=t&uuid=")
    assert drive_requests[1][1] is None
    assert len(drive_requests) == 3
    resumed_at = int(drive_requests[2][1].removeprefix("bytes=").removesuffix("-"))
    assert 0 < resumed_at <= len(archive) // 2
    assert f"sha256={digest} (verified)" in out.out
    assert "unpacked" in out.out and "train 40, val 10, test 8 images" in out.out
    # Only the layout the readers expect is left behind.
    assert sorted(p.name for p in manual.iterdir()) == sorted([*download.MNRE_FILES, "img_org"])


def test_image_transfer_broken_in_one_run_resumes_in_the_next(drive, tmp_path, capsys):
    archive = _archive(kind="tar", layout="img_org")
    drive.drive[download.MNRE_IMAGES_ID] = archive
    drive.cut["/download"] = 1
    manual = tmp_path / "manual"
    args = ["mnre", "--dir", str(manual), "--base-url", drive.url, "--retries", "0"]
    assert download.main(args) == 1
    err = capsys.readouterr().err
    assert "image archive: transfer failed" in err and "run the same command again to resume" \
        in err
    parts = list(manual.glob(f"{download.ARCHIVE_NAME}*.part"))
    assert len(parts) == 1
    kept = parts[0].stat().st_size
    assert 0 < kept <= len(archive) // 2
    drive.requests.clear()
    assert download.main(args) == 0
    # gdown opens the file (no Range) to learn its size, then asks for the rest of it.
    assert [r for p, r in drive.requests if p.startswith("/download")][-1] == f"bytes={kept}-"
    assert download.count_images(manual) == {"train": 5, "val": 3, "test": 2}
    assert not list(manual.glob("*.part")) and not (manual / download.ARCHIVE_NAME).exists()


def test_image_archive_checksum_mismatch(drive, tmp_path):
    drive.drive[download.MNRE_IMAGES_ID] = _archive()
    with pytest.raises(download.DownloadError, match=r"checksum mismatch for the image archive: "
                                                     r"expected sha256 0{64}, got "):
        download.download_images(tmp_path, sha256="0" * 64, log=_quiet)
    assert list(tmp_path.iterdir()) == []


def test_drive_unreachable_names_the_manual_step(tmp_path, monkeypatch):
    def unreachable(url, timeout):
        raise OSError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(download, "_check_reachable", unreachable)
    with pytest.raises(download.DownloadError) as info:
        download.download_images(tmp_path, log=_quiet)
    message = str(info.value)
    assert message.startswith("cannot reach Google Drive ([Errno -3] Temporary failure in name "
                              "resolution): offline, or Drive is blocked here.")
    assert f"open {download.MNRE_IMAGES_URL} in a browser" in message
    assert f"--dir {tmp_path} --images-archive <the archive>" in message


def test_archive_downloaded_by_hand_is_unpacked(server, tmp_path, capsys):
    path = tmp_path / "by_hand.tar.gz"
    path.write_bytes(_archive(kind="tar", layout="data/mnre",
                              broken=("data/mnre/train/twitter_train_1.jpg",)))
    manual = tmp_path / "manual"
    assert download.main(["mnre", "--dir", str(manual), "--base-url", server.url,
                          "--images-archive", str(path)]) == 0
    out = capsys.readouterr().out
    assert download.count_images(manual) == {"train": 5, "val": 3, "test": 2}
    assert "warning  1 images do not decode (their samples get no image): " \
           "['train/twitter_train_1.jpg']" in out
    assert path.exists()  # the user's own file is left alone


def test_no_images_is_a_remaining_manual_step(server, tmp_path, capsys):
    assert download.main(["mnre", "--dir", str(tmp_path), "--base-url", server.url,
                          "--no-images"]) == 2
    assert "skipped  images (--no-images)" in capsys.readouterr().out


def test_more_prints_manual_steps(tmp_path, capsys):
    assert download.main(["more", "--dir", str(tmp_path)]) == 2
    out = capsys.readouterr().out
    assert "MANUAL STEP (MORE)" in out and download.MORE_DATA_URL in out
    assert "img_org/{train,valid,test}/" in out


def test_real_files_match_pinned_checksums(mnre_dir):
    from tensorflow_datasets.core.download import checksums

    pinned = checksums.load_url_infos(download.CHECKSUMS)
    assert len(pinned) == 3  # the test split's digest is not known here
    names = {url: name for name, url in download.MNRE_FILES.items()}
    for url, info in pinned.items():
        path = mnre_dir / names[url]
        assert download.sha256_of(path) == info.checksum, path
        assert path.stat().st_size == int(info.size), path
