"""Fetch the raw data sets into a TFDS manual-download folder: ``python -m roc_jax.data.download``.

    python -m roc_jax.data.download mnre --dir ~/tensorflow_datasets/downloads/manual/mnre
    python -m roc_jax.data.download more --dir ...   # prints the manual steps (Baidu Netdisk)

MNRE's text files come from the MNRE repository (thecharm/MNRE, folder ``mnre_txt/``, pinned to a
commit; upstream ``mnre_val .txt`` has a space in its name and is stored as ``mnre_val.txt``) and
its label file ``ours_rel2id.json`` (distributed with the HVPNeT/MKGformer data archive) from a
public repository that carries it (ChocoWu/MRE-ISE, pinned). Each file is checked against its
sha256; a download resumes where it stopped (HTTP ``Range``) within a run (retries) and across runs
(``<name>.part`` files). The images are on Google Drive behind a confirmation page: a manual step,
printed with where to unpack them.

``--base-url URL`` (or ``$ROC_DOWNLOAD_BASE_URL``) fetches every file as ``URL/<upstream name>``
instead, for mirrors and tests.

Exit status: 0 when everything is in place, 2 when only manual steps remain, 1 on an error
(offline, checksum mismatch, ...).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import http.client
import os
import socket
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from pathlib import Path

CHUNK = 1 << 20
MNRE_COMMIT = "1693df4fc27db86a4cb4b5acf2906c5227085cc4"
MRE_ISE_COMMIT = "ca5c72e0c4ddcb0bc4c29f7dd4e92b7d8c1e101f"
MNRE_IMAGES_URL = "https://drive.google.com/file/d/1FYiJFtRayWY32nRH0rdycYzIdDcMmDFR/view"
MORE_DATA_URL = "https://pan.baidu.com/s/1PA6raw1rbQKhPEL1FEEuAw?pwd=taft"


@dataclasses.dataclass(frozen=True)
class RemoteFile:
    """One file to fetch: ``url`` is stored as ``name``; ``sha256=None`` means not pinned."""

    name: str
    url: str
    sha256: str | None

    @property
    def upstream_name(self) -> str:
        return urllib.parse.unquote(self.url.rsplit("/", 1)[-1])

    def with_base(self, base_url: str | None) -> RemoteFile:
        if not base_url:
            return self
        url = f"{base_url.rstrip('/')}/{urllib.parse.quote(self.upstream_name)}"
        return dataclasses.replace(self, url=url)


_GH = "https://raw.githubusercontent.com"
# The train/val digests are those of the files as they are used here (identical to upstream's
# text); the test split is not available here, so its digest is not pinned: the tool prints it.
MNRE_FILES = (
    RemoteFile("mnre_train.txt", f"{_GH}/thecharm/MNRE/{MNRE_COMMIT}/mnre_txt/mnre_train.txt",
               "1cc34438a00e2a2db73e4eba297820f926f62abd1fddc693caa13c58b62428b7"),
    RemoteFile("mnre_val.txt", f"{_GH}/thecharm/MNRE/{MNRE_COMMIT}/mnre_txt/mnre_val%20.txt",
               "c76865179b5678167b164c21fd25ed31f9a1416da393ac93ce70f32b00352b75"),
    RemoteFile("mnre_test.txt", f"{_GH}/thecharm/MNRE/{MNRE_COMMIT}/mnre_txt/mnre_test.txt",
               None),
    RemoteFile("ours_rel2id.json",
               f"{_GH}/ChocoWu/MRE-ISE/{MRE_ISE_COMMIT}/data/ours_rel2id.json",
               "f09c6c2773fd9078e1b46dd632cba2e0d4b0448d9695d00297e72d4e1f50fd15"),
)

MNRE_MANUAL = f"""MANUAL STEP (MNRE images): the images are on Google Drive, which needs a browser.
  1. open {MNRE_IMAGES_URL} and download the archive (about 1.2 GB, 9,201 images);
  2. unpack it so that these folders hold the JPEGs named by img_id:
       {{dir}}/img_org/train/  {{dir}}/img_org/val/  {{dir}}/img_org/test/
Samples whose image is missing are still built (black image, has_image=False) and counted."""

MORE_MANUAL = f"""MANUAL STEP (MORE): the data set is on Baidu Netdisk, which needs a browser.
  1. open {MORE_DATA_URL} (the link of https://github.com/NJUNLP/MORE's README);
  2. unpack it so that {{dir}} holds txt/train.txt, txt/valid.txt, txt/test.txt, rel2id.json,
     ent_train_dict.pth, ent_valid_dict.pth, ent_test_dict.pth and
     img_org/{{{{train,valid,test}}}}/."""


class DownloadError(RuntimeError):
    """A download that cannot complete: offline, HTTP error, checksum mismatch."""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def _is_offline(error: BaseException) -> bool:
    reason = getattr(error, "reason", error)
    return isinstance(reason, (ConnectionError, socket.gaierror, socket.timeout, TimeoutError,
                               OSError)) and not isinstance(error, urllib.error.HTTPError)


def _fetch_once(url: str, part: Path, timeout: float) -> None:
    """Appends the rest of ``url`` to ``part`` (a ``Range`` request when it is non-empty)."""
    offset = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"User-Agent": "roc_jax-download"})
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and offset:
            return  # The part file already holds everything; the checksum decides.
        raise
    with response:
        if offset and response.status != 206:
            offset = 0  # The server ignored the range: start over.
        with open(part, "ab" if offset else "wb") as f:
            while block := response.read(CHUNK):
                f.write(block)
        length = response.headers.get("Content-Length")
        if length is not None and part.stat().st_size < offset + int(length):
            raise http.client.IncompleteRead(b"", offset + int(length) - part.stat().st_size)


def download_file(remote: RemoteFile, directory: str | Path, *, retries: int = 3,
                  timeout: float = 30.0, log=print) -> Path:
    """Fetches ``remote`` into ``directory/remote.name`` (resuming, checked); returns the path.

    An existing file with the right checksum is kept as is. Raises ``DownloadError``.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / remote.name
    if target.exists() and (remote.sha256 is None or sha256_of(target) == remote.sha256):
        log(f"ok       {target} (already there)")
        return target
    part = target.with_name(target.name + ".part")
    for attempt in range(1, retries + 1):
        try:
            _fetch_once(remote.url, part, timeout)
            break
        except urllib.error.HTTPError as e:
            raise DownloadError(f"{remote.url}: HTTP {e.code} {e.reason}") from None
        except (TimeoutError, http.client.IncompleteRead, ConnectionResetError) as e:
            have = part.stat().st_size if part.exists() else 0
            log(f"resume   {remote.name}: interrupted after {have} bytes ({type(e).__name__}); "
                f"attempt {attempt}/{retries}")
            if attempt == retries:
                raise DownloadError(f"{remote.url}: interrupted {retries} times; run again to "
                                    f"resume from {part} ({have} bytes)") from None
            time.sleep(min(2.0 ** attempt, 10.0) * 0.1)
        except (urllib.error.URLError, OSError) as e:
            if _is_offline(e):
                raise DownloadError(
                    f"cannot reach {remote.url} ({getattr(e, 'reason', e)}): offline or the "
                    f"source is down. Fetch it by hand into {target}, or pass --base-url "
                    "for a mirror") from None
            raise
    digest = sha256_of(part)
    if remote.sha256 is not None and digest != remote.sha256:
        part.unlink()
        raise DownloadError(f"checksum mismatch for {remote.name} from {remote.url}: expected "
                            f"sha256 {remote.sha256}, got {digest}; the file was removed")
    os.replace(part, target)
    pinned = "verified" if remote.sha256 else "NOT PINNED"
    log(f"fetched  {target} sha256={digest} ({pinned})")
    return target


def download_mnre(directory: str | Path, base_url: str | None = None, *, log=print,
                  **kwargs) -> int:
    """MNRE's text files, then the image step; returns the exit status (0, 2; raises on error)."""
    directory = Path(directory)
    for remote in MNRE_FILES:
        download_file(remote.with_base(base_url), directory, log=log, **kwargs)
    images = directory / "img_org"
    if images.is_dir() and any(images.glob("*/*.jpg")):
        log(f"ok       images in {images}")
        return 0
    log(MNRE_MANUAL.format(dir=directory))
    return 2


def download_more(directory: str | Path, base_url: str | None = None, *, log=print,
                  **kwargs) -> int:
    """MORE has no automatic source: prints the manual steps (status 2) unless already there."""
    directory = Path(directory)
    if (directory / "txt" / "train.txt").exists() and (directory / "rel2id.json").exists():
        log(f"ok       MORE files in {directory}")
        return 0
    log(MORE_MANUAL.format(dir=directory))
    return 2


DATASETS = {"mnre": download_mnre, "more": download_more}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m roc_jax.data.download",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("dataset", choices=sorted(DATASETS))
    parser.add_argument("--dir", required=True, help="the manual-download folder to fill")
    parser.add_argument("--base-url", default=os.environ.get("ROC_DOWNLOAD_BASE_URL"),
                        help="fetch every file as BASE_URL/<upstream name> (mirrors, tests)")
    parser.add_argument("--timeout", type=float, default=30.0)
    args = parser.parse_args(argv)
    try:
        return DATASETS[args.dataset](args.dir, args.base_url, timeout=args.timeout)
    except DownloadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
