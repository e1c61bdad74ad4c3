"""The one downloader of the project (datasets and model weights): streamed to a temporary file next to
the destination, with a progress bar, retries of transient failures, and checksum verification.

Only the finished, verified file is renamed onto ``dest``; a failure leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
import urllib.error
import urllib.request
from pathlib import Path

from tqdm.auto import tqdm

from medmerge.io import atomic_file

log = logging.getLogger("medmerge.download")

CHUNK_BYTES = 1 << 20
RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})  # HTTP statuses worth another try


class DownloadError(OSError):
    """A download that failed after its retries (unreachable, HTTP error, interrupted)."""


class ChecksumError(ValueError):
    """A downloaded file whose checksum is not the expected one."""


def file_digest(path: str | Path, algorithm: str = "sha256") -> str:
    """Hex digest of a file, read in chunks."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK_BYTES), b""):
            digest.update(block)
    return digest.hexdigest()


def _transient(error: BaseException) -> bool:
    if isinstance(error, urllib.error.HTTPError):
        return error.code in RETRY_STATUS
    return isinstance(error, (urllib.error.URLError, TimeoutError, ConnectionError))


def _stream(url: str, dest: Path, timeout: float, progress: bool, digests: dict[str, hashlib._Hash]) -> None:
    with urllib.request.urlopen(url, timeout=timeout) as response, open(dest, "wb") as f:
        total = int(response.headers.get("Content-Length") or 0) or None
        name = os.path.basename(urllib.request.urlparse(url).path) or url
        with tqdm(total=total, unit="B", unit_scale=True, desc=name, disable=not progress, leave=False) as bar:
            while block := response.read(CHUNK_BYTES):
                f.write(block)
                for digest in digests.values():
                    digest.update(block)
                bar.update(len(block))


def download_file(
    url: str,
    dest: str | Path,
    *,
    sha256: str | None = None,
    md5: str | None = None,
    timeout: float = 60.0,
    retries: int = 3,
    backoff: float = 1.0,
    progress: bool | None = None,
) -> dict[str, str]:
    """Download ``url`` to ``dest``; return ``{"sha256": ..., "md5": ...}`` of the file.

    Transient failures (connection errors, timeouts, HTTP 408/429/5xx) are retried ``retries`` times,
    waiting ``backoff * 2**attempt`` seconds; a wrong ``sha256``/``md5`` raises :class:`ChecksumError`,
    other failures :class:`DownloadError`. ``progress`` None shows a bar when stderr is a terminal.
    """
    dest = Path(dest)
    progress = os.isatty(2) if progress is None else progress
    expected = {name: value.lower() for name, value in (("sha256", sha256), ("md5", md5)) if value}
    for attempt in range(retries + 1):
        digests = {"sha256": hashlib.sha256(), "md5": hashlib.md5()}
        try:
            with atomic_file(dest) as tmp:
                log.info("downloading %s%s", url, f" (attempt {attempt + 1})" if attempt else "")
                _stream(url, tmp, timeout, progress, digests)
                actual = {name: digest.hexdigest() for name, digest in digests.items()}
                for name, value in expected.items():
                    if actual[name] != value:
                        raise ChecksumError(f"{name} mismatch for {url}: expected {value}, got {actual[name]}")
            return actual
        except (urllib.error.URLError, OSError) as error:
            if attempt == retries or not _transient(error):
                raise DownloadError(f"download of {url} failed: {error}") from error
            log.warning("download of %s failed (%s); retrying", url, error)
            time.sleep(backoff * 2**attempt)
    raise AssertionError("unreachable")
