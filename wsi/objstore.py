"""Object storage URLs (``s3://``, ``gs://``, ``memory://`` ...) through fsspec: which paths are URLs, the
file system behind one, and one-line errors for what goes wrong there.

Local paths never come here: :func:`is_url` is False for them (and for ``file://`` URLs, which
:func:`as_location` turns into plain paths, so they keep every guarantee of a local folder:
rename, fsync, flock). Everything that writes or reads object storage goes through
:class:`Remote`, whose calls turn the storage client's exceptions (no credentials, no such
bucket, access denied, an unreachable endpoint, the client package not installed) into
:class:`RemoteError` with one line naming the URL and the fix.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote, urlparse

__all__ = ["RemoteError", "Remote", "is_url", "as_location", "url_join", "url_name"]

_URL = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://")
#: Schemes that name local files: turned into plain paths (every local guarantee holds there).
LOCAL_SCHEMES = ("file", "local")
#: The package each common scheme needs (fsspec implements ``memory://`` itself).
CLIENT_PACKAGES = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs",
                   "abfss": "adlfs"}


class RemoteError(Exception):
    """Object storage cannot be used as asked (one line: the URL, the cause, the fix)."""


def scheme_of(x) -> str | None:
    m = _URL.match(x) if isinstance(x, str) else None
    return m.group("scheme").lower() if m else None


def is_url(x) -> bool:
    """Whether ``x`` names object storage (a ``scheme://`` string that is not a ``file://`` URL)."""
    s = scheme_of(x)
    return s is not None and s not in LOCAL_SCHEMES


def as_location(x: str | Path) -> str | Path:
    """A URL of object storage as a string without a trailing ``/``; anything else (a ``file://``
    URL included) as a :class:`~pathlib.Path`."""
    if isinstance(x, Path):
        return x
    if scheme_of(x) in LOCAL_SCHEMES:
        u = urlparse(x)
        return Path(unquote(u.netloc + u.path) if u.netloc not in ("", "localhost") else unquote(u.path))
    if is_url(x):
        return x.rstrip("/")
    return Path(x)


def url_join(url: str, *parts: str) -> str:
    return "/".join([url.rstrip("/"), *(p.strip("/") for p in parts)])


def url_name(url: str) -> str:
    """The last part of a URL (the file or folder name)."""
    return url.rstrip("/").rsplit("/", 1)[-1]


def describe(exc: BaseException, url: str, doing: str = "reading") -> str:
    """One line for an exception of a storage client, naming the URL and what to do."""
    name = type(exc).__name__
    msg = (str(exc).strip().splitlines() or [""])[0][:200]
    low = msg.lower()
    scheme = scheme_of(url) or ""
    if name in ("NoCredentialsError", "PartialCredentialsError", "DefaultCredentialsError") or (
            "credentials" in low and "locate" in low):
        return (f"{url}: no credentials for {scheme}:// ({msg}); set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                "(or AWS_PROFILE) for S3, or the credentials of your storage service")
    if "bucket" in low and ("not exist" in low or "nosuchbucket" in low.replace(" ", "")):
        return f"{url}: no such bucket; create it or check the URL"
    if isinstance(exc, PermissionError) or "accessdenied" in low.replace(" ", "") or "forbidden" in low:
        return f"{url}: access denied while {doing} ({msg}); check the credentials and the bucket's permissions"
    if name in ("EndpointConnectionError", "ConnectTimeoutError", "ClientConnectorError", "ConnectionError") \
            or isinstance(exc, ConnectionError):
        return f"{url}: cannot reach the storage service ({msg}); check the network and AWS_ENDPOINT_URL"
    if isinstance(exc, FileNotFoundError):
        return f"{url}: not found ({msg or 'no such object'})"
    return f"{url}: {doing} failed ({name}: {msg})"


def filesystem(url: str):
    """``(fsspec file system, path in it)`` for a URL; :class:`RemoteError` when its client is missing."""
    import fsspec

    scheme = scheme_of(url) or ""
    try:
        return fsspec.core.url_to_fs(url)
    except ImportError:
        pkg = CLIENT_PACKAGES.get(scheme, f"the fsspec implementation of {scheme}://")
        extra = " (pip install 'wsi-pipeline[s3]')" if pkg == "s3fs" else ""
        raise RemoteError(f"{url}: {scheme}:// URLs need {pkg}, which is not installed: pip install {pkg}{extra}") \
            from None
    except ValueError as exc:
        raise RemoteError(f"{url}: {scheme}:// is not a storage protocol fsspec knows ({exc})") from None
    except Exception as exc:  # a client that checks its configuration when made
        raise RemoteError(describe(exc, url, "connecting")) from None


class Remote:
    """One folder (prefix) of object storage: its file system and calls with one-line errors.

    ``Remote("s3://bucket/stores").cat("a.zarr/zarr.json")`` reads ``s3://bucket/stores/a.zarr/zarr.json``.
    """

    def __init__(self, url: str):
        self.url = str(url).rstrip("/")
        self.fs, self.root = filesystem(self.url)
        self.root = self.root.rstrip("/")

    def path(self, *parts: str) -> str:
        """The file system path of ``parts`` under this folder."""
        return "/".join([self.root, *(p.strip("/") for p in parts if p)])

    def url_of(self, *parts: str) -> str:
        return url_join(self.url, *parts) if parts else self.url

    def call(self, doing: str, fn, *args, **kwargs):
        """``fn(*args, **kwargs)``, its client's exceptions turned into :class:`RemoteError`."""
        try:
            return fn(*args, **kwargs)
        except RemoteError:
            raise
        except Exception as exc:
            where = args[0] if args and isinstance(args[0], str) else self.root
            raise RemoteError(describe(exc, self._as_url(where), doing)) from None

    def _as_url(self, path: str) -> str:
        return self.url + path[len(self.root):] if path.startswith(self.root) else path

    # -- reading -------------------------------------------------------------
    def exists(self, *parts: str) -> bool:
        return bool(self.call("checking", self.fs.exists, self.path(*parts)))

    def isdir(self, *parts: str) -> bool:
        return bool(self.call("checking", self.fs.isdir, self.path(*parts)))

    def info(self, *parts: str) -> dict:
        return self.call("reading", self.fs.info, self.path(*parts))

    def cat(self, *parts: str) -> bytes:
        return self.call("reading", self.fs.cat_file, self.path(*parts))

    def cat_or_none(self, *parts: str) -> bytes | None:
        """The object's bytes, or None when there is no such object."""
        path = self.path(*parts)
        try:
            return self.fs.cat_file(path)
        except FileNotFoundError:
            return None
        except Exception as exc:
            raise RemoteError(describe(exc, self._as_url(path), "reading")) from None

    def files(self, *parts: str) -> dict[str, int]:
        """``{path relative to parts: size}`` of every object under ``parts`` (fresh, not a cached listing)."""
        base = self.path(*parts)
        self.fs.invalidate_cache()
        found = self.call("listing", self.fs.find, base, detail=True)
        n = len(base) + 1
        return {p[n:]: int(d.get("size") or 0) for p, d in found.items() if d.get("type", "file") == "file"
                and p.startswith(base + "/")}

    def children(self, *parts: str) -> list[str]:
        """Names directly under ``parts`` (objects and prefixes)."""
        base = self.path(*parts)
        self.fs.invalidate_cache()
        try:
            listed = self.fs.ls(base, detail=False)
        except FileNotFoundError:
            return []
        except Exception as exc:
            raise RemoteError(describe(exc, self._as_url(base), "listing")) from None
        return sorted({p.rstrip("/").rsplit("/", 1)[-1] for p in listed if p.rstrip("/") != base})

    def get(self, rel_or_path: str, local: Path) -> None:
        self.call("downloading", self.fs.get_file, self.path(rel_or_path), str(local))

    # -- writing -------------------------------------------------------------
    def pipe(self, rel: str, data: bytes) -> None:
        self.call("writing", self.fs.pipe_file, self.path(rel), data)

    def put(self, pairs: list[tuple[Path, str]]) -> None:
        """Upload local files to paths relative to this folder (the client runs them concurrently)."""
        if pairs:
            self.call("uploading", self.fs.put, [str(p) for p, _ in pairs], [self.path(r) for _, r in pairs])

    def rm(self, rels: list[str]) -> None:
        if rels:
            self.call("deleting", self.fs.rm, [self.path(r) for r in rels])

    def check_writable(self, option: str = "--out") -> None:
        """Write and delete a probe object: no credentials, no bucket or no permission is one line now,
        before any work."""
        import uuid

        probe = f".wsi-pipeline-write-test-{uuid.uuid4().hex[:8]}"
        try:
            self.fs.pipe_file(self.path(probe), b"")
            self.fs.rm(self.path(probe))
        except Exception as exc:
            raise RemoteError(f"{describe(exc, self.url, 'writing')} (the {option} folder)") from None


def remote_identity(url: str) -> dict:
    """Size, ETag and modification time of one remote object (what a staged copy is checked against)."""
    r = Remote(url)
    info = r.info()
    if info.get("type") == "directory":
        raise RemoteError(f"{url}: a folder, not a slide file")
    etag = info.get("ETag") or info.get("etag") or info.get("md5Hash") or info.get("md5") or ""
    mtime = info.get("LastModified") or info.get("mtime") or info.get("updated") or info.get("created") or ""
    return {"url": r.url, "size": int(info.get("size") or 0), "etag": str(etag).strip('"'), "mtime": str(mtime)}
