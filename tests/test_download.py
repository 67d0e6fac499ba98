"""The download tool against an HTTP server on 127.0.0.1 that the test starts."""

import hashlib
import http.server
import socket

import pytest
from local_http import LocalHTTPServer

from roc_jax.data import download


class _Server:
    """Serves ``files`` ({url path: bytes}) with Range support; can cut the first response."""

    def __init__(self, files):
        self.files = files
        self.cut_first = set()  # paths whose first response stops halfway
        self.requests = []  # (path, Range header or None)
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                path = self.path
                outer.requests.append((path, self.headers.get("Range")))
                if path not in outer.files:
                    self.send_error(404)
                    return
                data = outer.files[path]
                start = 0
                if self.headers.get("Range"):
                    start = int(self.headers["Range"].split("=")[1].rstrip("-"))
                    if start >= len(data):
                        self.send_error(416)
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if path in outer.cut_first:
                    outer.cut_first.discard(path)
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self.wfile.write(body)

        self._http = LocalHTTPServer(Handler)
        self.url = self._http.url

    def close(self):
        self._http.close()


@pytest.fixture
def server():
    s = _Server({})
    yield s
    s.close()


def _remote(name, data, upstream=None):
    upstream = upstream or name
    return download.RemoteFile(name, f"https://example.invalid/x/{upstream}",
                               hashlib.sha256(data).hexdigest())


def test_fetches_verifies_and_renames(server, tmp_path):
    data = b"{'token': ['a']}\n" * 1000
    server.files["/mnre_val%20.txt"] = data
    remote = _remote("mnre_val.txt", data, upstream="mnre_val%20.txt").with_base(server.url)
    assert remote.url == f"{server.url}/mnre_val%20.txt"
    path = download.download_file(remote, tmp_path, log=lambda m: None)
    assert path == tmp_path / "mnre_val.txt" and path.read_bytes() == data
    assert not (tmp_path / "mnre_val.txt.part").exists()
    # A second run keeps the verified file and asks nothing.
    server.requests.clear()
    download.download_file(remote, tmp_path, log=lambda m: None)
    assert server.requests == []


def test_interrupted_download_resumes_with_range(server, tmp_path):
    data = bytes(range(256)) * 4000
    server.files["/big.bin"] = data
    server.cut_first.add("/big.bin")
    messages = []
    remote = _remote("big.bin", data).with_base(server.url)
    path = download.download_file(remote, tmp_path, log=messages.append)
    assert path.read_bytes() == data
    half = len(data) // 2
    assert server.requests == [("/big.bin", None), ("/big.bin", f"bytes={half}-")]
    assert any(m.startswith("resume   big.bin: interrupted after 512000 bytes") for m in messages)


def test_part_file_from_an_earlier_run_is_resumed(server, tmp_path):
    data = b"0123456789" * 100
    server.files["/f.txt"] = data
    (tmp_path / "f.txt.part").write_bytes(data[:300])
    download.download_file(_remote("f.txt", data).with_base(server.url), tmp_path,
                           log=lambda m: None)
    assert (tmp_path / "f.txt").read_bytes() == data
    assert server.requests == [("/f.txt", "bytes=300-")]


def test_checksum_mismatch_is_an_error_and_leaves_nothing(server, tmp_path):
    server.files["/f.txt"] = b"tampered"
    remote = _remote("f.txt", b"original").with_base(server.url)
    with pytest.raises(download.DownloadError,
                       match=r"checksum mismatch for f.txt .* expected sha256 "
                             + remote.sha256 + ", got "
                             + hashlib.sha256(b"tampered").hexdigest()):
        download.download_file(remote, tmp_path, log=lambda m: None)
    assert list(tmp_path.iterdir()) == []


def test_http_error_is_reported(server, tmp_path):
    with pytest.raises(download.DownloadError, match=r"/nothing.txt: HTTP 404"):
        download.download_file(_remote("nothing.txt", b"").with_base(server.url), tmp_path,
                               log=lambda m: None)


def _closed_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_closed_port_gives_offline_message(tmp_path, capsys):
    base = f"http://127.0.0.1:{_closed_port()}"
    status = download.main(["mnre", "--dir", str(tmp_path), "--base-url", base])
    assert status == 1
    err = capsys.readouterr().err
    assert f"error: cannot reach {base}/mnre_train.txt" in err
    assert "offline or the source is down" in err


def test_mnre_cli_end_to_end(server, tmp_path, capsys, monkeypatch):
    files = {"mnre_train.txt": b"train\n", "mnre_val .txt": b"val\n", "mnre_test.txt": b"test\n",
             "ours_rel2id.json": b'{"None": 0}'}
    for upstream, data in files.items():
        server.files["/" + upstream.replace(" ", "%20")] = data
    # Pin the fixture's digests in place of the real ones.
    monkeypatch.setattr(download, "MNRE_FILES", tuple(
        download.RemoteFile(r.name, r.url, hashlib.sha256(files[r.upstream_name]).hexdigest())
        for r in download.MNRE_FILES))
    monkeypatch.setenv("ROC_DOWNLOAD_BASE_URL", server.url)
    status = download.main(["mnre", "--dir", str(tmp_path / "manual")])
    out = capsys.readouterr().out
    assert status == 2  # the images are a manual step
    assert "MANUAL STEP (MNRE images)" in out and download.MNRE_IMAGES_URL in out
    assert f"{tmp_path / 'manual'}/img_org/train/" in out
    assert sorted(p.name for p in (tmp_path / "manual").iterdir()) == [
        "mnre_test.txt", "mnre_train.txt", "mnre_val.txt", "ours_rel2id.json"]
    assert (tmp_path / "manual" / "mnre_val.txt").read_bytes() == b"val\n"
    (tmp_path / "manual" / "img_org" / "train").mkdir(parents=True)
    (tmp_path / "manual" / "img_org" / "train" / "a.jpg").write_bytes(b"x")
    assert download.main(["mnre", "--dir", str(tmp_path / "manual")]) == 0


def test_more_prints_manual_steps(tmp_path, capsys):
    assert download.main(["more", "--dir", str(tmp_path)]) == 2
    out = capsys.readouterr().out
    assert "MANUAL STEP (MORE)" in out and download.MORE_DATA_URL in out
    assert "img_org/{train,valid,test}/" in out


def test_real_files_match_pinned_checksums(mnre_dir):
    pinned = {r.name: r.sha256 for r in download.MNRE_FILES if r.sha256}
    for name, digest in pinned.items():
        assert download.sha256_of(mnre_dir / name) == digest, name
