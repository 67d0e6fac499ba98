"""Fetch the raw data sets into a TFDS manual-download folder: ``python -m roc_jax.data.download``.

    python -m roc_jax.data.download mnre --dir ~/tensorflow_datasets/downloads/manual/mnre
    python -m roc_jax.data.download mnre --dir DIR --images-archive ~/Downloads/ARCHIVE  # offline
    python -m roc_jax.data.download more --dir ...   # prints the manual steps (Baidu Netdisk)

MNRE's text files come from the MNRE repository (thecharm/MNRE, folder ``mnre_txt/``, pinned to a
commit; upstream ``mnre_val .txt`` has a space in its name and is stored as ``mnre_val.txt``) and
its label file ``ours_rel2id.json`` (distributed with the HVPNeT/MKGformer data archive) from a
public repository that carries it (ChocoWu/MRE-ISE, pinned). They are fetched by TFDS's download
manager and checked against ``tfds/mnre/checksums.tsv`` (URL, size, sha256; the test split is
not pinned there: its digest is printed). A broken text transfer is retried from the start (the
files are 4 MB in all).

The images (9,201 JPEGs, one archive of about 1.2 GB) are one Google Drive file behind a
confirmation page: ``gdown`` fetches it, resuming a broken transfer (HTTP ``Range``) within a run
(``--retries``) and across runs (its ``.part`` file), then the archive (zip or tar) is unpacked
into ``img_org/{train,val,test}/``, the layout the readers expect, and its sha256 is printed
(compared when ``--images-sha256`` is given). Without network, ``--images-archive PATH`` unpacks
an archive downloaded by hand.

``--base-url URL`` (or ``$ROC_DOWNLOAD_BASE_URL``) fetches every text file as
``URL/<upstream name>`` instead (mirrors, tests; the checksums stay the same), ``--images-url``
the image archive.

Exit status: 0 when everything is in place, 2 when only manual steps remain, 1 on an error
(offline, checksum mismatch, ...).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import socket
import sys
import tarfile
import tempfile
import urllib.parse
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path

CHECKSUMS = Path(__file__).parent / "tfds" / "mnre" / "checksums.tsv"
_GH = "https://raw.githubusercontent.com"
MNRE_COMMIT = "1693df4fc27db86a4cb4b5acf2906c5227085cc4"
MRE_ISE_COMMIT = "ca5c72e0c4ddcb0bc4c29f7dd4e92b7d8c1e101f"
# Stored name -> upstream URL (the digests are in CHECKSUMS, keyed by these URLs).
MNRE_FILES = {
    "mnre_train.txt": f"{_GH}/thecharm/MNRE/{MNRE_COMMIT}/mnre_txt/mnre_train.txt",
    "mnre_val.txt": f"{_GH}/thecharm/MNRE/{MNRE_COMMIT}/mnre_txt/mnre_val%20.txt",
    "mnre_test.txt": f"{_GH}/thecharm/MNRE/{MNRE_COMMIT}/mnre_txt/mnre_test.txt",
    "ours_rel2id.json": f"{_GH}/ChocoWu/MRE-ISE/{MRE_ISE_COMMIT}/data/ours_rel2id.json",
}
MNRE_IMAGES_ID = "1FYiJFtRayWY32nRH0rdycYzIdDcMmDFR"
MNRE_IMAGES_URL = f"https://drive.google.com/file/d/{MNRE_IMAGES_ID}/view"
MNRE_SPLITS = ("train", "val", "test")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
MORE_DATA_URL = "https://pan.baidu.com/s/1PA6raw1rbQKhPEL1FEEuAw?pwd=taft"
# The archive's name in the manual folder while it is fetched (gdown keeps ``<name>XXXXXXXX.part``
# next to it until the transfer completes).
ARCHIVE_NAME = "mnre_images.archive"

MORE_MANUAL = f"""MANUAL STEP (MORE): the data set is on Baidu Netdisk, which needs a browser.
  1. open {MORE_DATA_URL} (the link of https://github.com/NJUNLP/MORE's README);
  2. unpack it so that {{dir}} holds txt/train.txt, txt/valid.txt, txt/test.txt, rel2id.json,
     ent_train_dict.pth, ent_valid_dict.pth, ent_test_dict.pth and
     img_org/{{{{train,valid,test}}}}/."""

Log = Callable[[str], None]


class DownloadError(RuntimeError):
    """A download that cannot complete: offline, HTTP error, checksum mismatch."""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _manual_steps(directory: Path, names: Sequence[str]) -> str:
    """What to fetch by hand and where to put it (the offline message)."""
    lines = [f"  {MNRE_FILES[n]} -> {directory / n}" for n in names]
    return ("Fetch by hand, on a machine with network:\n" + "\n".join(lines) +
            f"\n  images: open {MNRE_IMAGES_URL} in a browser, download the archive, then run\n"
            f"    python -m roc_jax.data.download mnre --dir {directory} --images-archive "
            "<the archive>\n  (it unpacks into img_org/{train,val,test}/ and checks the files)")


def _check_reachable(url: str, timeout: float) -> None:
    """Raises ``OSError`` quickly when ``url``'s host cannot be reached (the download tools'
    own retries would take minutes to give up)."""
    parts = urllib.parse.urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    with socket.create_connection((parts.hostname, port), timeout=timeout):
        pass


# ------------------------------------------------------------------------------ text files


def download_text_files(directory: str | Path, base_url: str | None = None, *,
                        timeout: float = 30.0, attempts: int = 3, log: Log = print) -> list[Path]:
    """MNRE's text and label files into ``directory`` through TFDS's download manager.

    Files already there with their pinned sha256 are kept. Raises ``DownloadError``.
    """
    import requests
    import tensorflow_datasets as tfds
    from tensorflow_datasets.core.download import checksums

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    pinned = checksums.load_url_infos(CHECKSUMS)
    urls, infos = {}, {}
    for name, upstream in MNRE_FILES.items():
        url = upstream if not base_url else \
            f"{base_url.rstrip('/')}/{upstream.rsplit('/', 1)[-1]}"
        urls[name] = url
        if upstream in pinned:
            infos[url] = pinned[upstream]
    todo = {}
    for name, url in urls.items():
        target = directory / name
        if target.exists() and url in infos and sha256_of(target) == infos[url].checksum:
            log(f"ok       {target} (already there)")
        else:
            todo[name] = url
    if not todo:
        return [directory / n for n in urls]
    try:
        _check_reachable(next(iter(todo.values())), timeout)
    except OSError as e:
        raise DownloadError(f"cannot reach {next(iter(todo.values()))} ({e}): offline or the "
                            f"source is down.\n{_manual_steps(directory, list(todo))}") from None
    scratch = Path(tempfile.mkdtemp(prefix=".downloads-", dir=directory))
    try:
        for attempt in range(1, attempts + 1):
            # A new manager per attempt: one remembers a URL's failed download.
            manager = tfds.download.DownloadManager(download_dir=scratch, url_infos=infos)
            try:
                # One at a time: after a failure no other transfer is still writing.
                paths = {name: manager.download(url) for name, url in todo.items()}
                break
            except (requests.exceptions.ChunkedEncodingError,
                    requests.exceptions.ConnectionError) as e:
                log(f"retry    text files: transfer broken ({type(e).__name__}); attempt "
                    f"{attempt}/{attempts}")
                if attempt == attempts:
                    raise DownloadError(f"text files: transfer broken {attempts} times "
                                        f"({e}); run again") from None
            except tfds.download.util.DownloadError as e:  # an HTTP error status
                raise DownloadError(str(e)) from None
            except Exception as e:
                if type(e).__name__ != "NonMatchingChecksumError":
                    raise
                raise DownloadError(f"checksum mismatch: {' '.join(str(e).split())}; nothing "
                                    "was stored") from None
        for name, path in paths.items():
            target = directory / name
            shutil.move(str(path), target)
            digest = sha256_of(target)
            pinned_here = "verified" if urls[name] in infos else "NOT PINNED"
            log(f"fetched  {target} sha256={digest} ({pinned_here})")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return [directory / n for n in urls]


# ------------------------------------------------------------------------------------ images


def count_images(directory: str | Path) -> dict[str, int]:
    """Image files per MNRE split folder under ``directory/img_org``."""
    root = Path(directory) / "img_org"
    return {split: sum(1 for p in (root / split).iterdir()
                       if p.suffix.lower() in IMAGE_SUFFIXES) if (root / split).is_dir() else 0
            for split in MNRE_SPLITS}


def download_images(directory: str | Path, *, url: str | None = None,
                    sha256: str | None = None, retries: int = 5, timeout: float = 60.0,
                    log: Log = print) -> Path:
    """Fetches the image archive from Google Drive (``gdown``) into ``directory``; resumable.

    ``url``: another location of the archive (default: the authors' Drive file). Returns the
    archive's path. Raises ``DownloadError``.
    """
    import gdown
    import requests

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    output = directory / ARCHIVE_NAME
    try:
        _check_reachable(url or "https://drive.google.com/", timeout)
    except OSError as e:
        raise DownloadError(f"cannot reach Google Drive ({e}): offline, or Drive is blocked "
                            f"here.\n{_manual_steps(directory, [])}") from None
    hasher = hashlib.sha256()
    source = {"url": url} if url else {"id": MNRE_IMAGES_ID}
    try:
        gdown.download(**source, output=str(output), quiet=False, resume=True, retries=retries,
                       timeout=timeout, hasher=hasher, use_cookies=False)
    except gdown.exceptions.FileURLRetrievalError as e:
        raise DownloadError(f"Google Drive did not hand out the image archive ({e}).\n"
                            f"{_manual_steps(directory, [])}") from None
    except (gdown.exceptions.DownloadError, requests.exceptions.RequestException, OSError) as e:
        raise DownloadError(f"image archive: transfer failed ({e}); run the same command again "
                            f"to resume from the partial file in {directory}") from None
    digest = hasher.hexdigest()
    if sha256 is not None and digest != sha256:
        output.unlink()
        raise DownloadError(f"checksum mismatch for the image archive: expected sha256 {sha256}, "
                            f"got {digest}; the file was removed")
    log(f"fetched  {output} sha256={digest} ({'verified' if sha256 else 'NOT PINNED'})")
    return output


def unpack_images(archive: str | Path, directory: str | Path, *, log: Log = print
                  ) -> dict[str, int]:
    """Unpacks a zip or tar archive of MNRE's images into ``directory/img_org/<split>/``.

    The archive may hold the split folders at any depth (``img_org/train/...``,
    ``mnre_image/train/...``). Every image must decode (``reading.check_image``). Returns the
    image count per split; raises ``DownloadError`` for an archive without split folders.
    """
    from roc_jax.data.reading import check_image

    archive, directory = Path(archive), Path(directory)
    scratch = Path(tempfile.mkdtemp(prefix=".unpack-", dir=directory))
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as z:
                z.extractall(scratch)
        elif tarfile.is_tarfile(archive):
            with tarfile.open(archive) as t:
                t.extractall(scratch, filter="data")  # no links or paths out of the folder
        else:
            raise DownloadError(f"{archive} is neither a zip nor a tar archive")
        parent = _split_parent(scratch)
        if parent is None:
            raise DownloadError(f"{archive} holds no train/, val/ or test/ folder of images")
        bad = []
        for split in MNRE_SPLITS:
            source = parent / split
            if not source.is_dir():
                continue
            target = directory / "img_org" / split
            target.mkdir(parents=True, exist_ok=True)
            for path in source.iterdir():
                if path.suffix.lower() not in IMAGE_SUFFIXES:
                    continue
                if check_image(path) is not None:
                    bad.append(f"{split}/{path.name}")
                os.replace(path, target / path.name)
        if bad:
            # Kept in place: the readers mask them (counted as unreadable_image).
            log(f"warning  {len(bad)} images do not decode (their samples get no image): "
                f"{bad[:5]}")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    counts = count_images(directory)
    log(f"unpacked {archive} into {directory / 'img_org'}: " +
        ", ".join(f"{split} {n}" for split, n in counts.items()) + " images")
    return counts


def _split_parent(root: Path) -> Path | None:
    """The shallowest folder under ``root`` with a ``train``, ``val`` or ``test`` subfolder."""
    for folder in sorted((p for p in [root, *root.rglob("*")] if p.is_dir()),
                         key=lambda p: len(p.parts)):
        if any((folder / split).is_dir() for split in MNRE_SPLITS):
            return folder
    return None


# -------------------------------------------------------------------------------------- CLI


def download_mnre(directory: str | Path, base_url: str | None = None, *, images: bool = True,
                  images_url: str | None = None, images_archive: str | Path | None = None,
                  images_sha256: str | None = None, timeout: float = 30.0, retries: int = 5,
                  log: Log = print) -> int:
    """MNRE's text files, then its images; returns the exit status (0, or 2 when the images
    were not asked for). Raises ``DownloadError``."""
    directory = Path(directory)
    download_text_files(directory, base_url, timeout=timeout, log=log)
    if images_archive is not None:
        unpack_images(images_archive, directory, log=log)
        return 0
    counts = count_images(directory)
    if sum(counts.values()):
        log(f"ok       images in {directory / 'img_org'} ({counts}); delete img_org/ to fetch "
            "them again")
        return 0
    if not images:
        log(f"skipped  images (--no-images): samples get no image until {directory}/img_org/ "
            "holds them")
        return 2
    archive = download_images(directory, url=images_url, sha256=images_sha256, retries=retries,
                              timeout=max(timeout, 60.0), log=log)
    unpack_images(archive, directory, log=log)
    archive.unlink()
    return 0


def download_more(directory: str | Path, base_url: str | None = None, **kwargs) -> int:
    """MORE has no automatic source: prints the manual steps (status 2) unless already there."""
    log = kwargs.get("log", print)
    directory = Path(directory)
    if (directory / "txt" / "train.txt").exists() and (directory / "rel2id.json").exists():
        log(f"ok       MORE files in {directory}")
        return 0
    log(MORE_MANUAL.format(dir=directory))
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m roc_jax.data.download",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("dataset", choices=("mnre", "more"))
    parser.add_argument("--dir", required=True, help="the manual-download folder to fill")
    parser.add_argument("--base-url", default=os.environ.get("ROC_DOWNLOAD_BASE_URL"),
                        help="fetch every text file as BASE_URL/<upstream name> (mirrors, tests)")
    parser.add_argument("--no-images", action="store_true", help="MNRE: text files only")
    parser.add_argument("--images-url", default=None,
                        help="MNRE: the image archive from this URL instead of Google Drive")
    parser.add_argument("--images-archive", default=None,
                        help="MNRE: unpack this archive (downloaded by hand) instead of fetching")
    parser.add_argument("--images-sha256", default=None,
                        help="MNRE: the archive's expected sha256 (checked when given)")
    parser.add_argument("--timeout", type=float, default=30.0)
    parser.add_argument("--retries", type=int, default=5,
                        help="resumed attempts of a broken image transfer within one run")
    args = parser.parse_args(argv)
    try:
        if args.dataset == "more":
            return download_more(args.dir)
        return download_mnre(args.dir, args.base_url, images=not args.no_images,
                             images_url=args.images_url, images_archive=args.images_archive,
                             images_sha256=args.images_sha256, timeout=args.timeout,
                             retries=args.retries)
    except DownloadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
