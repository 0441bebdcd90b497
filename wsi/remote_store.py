"""Tile stores on object storage: publishing a finished local store, listing, opening and checking them.

Object storage has no rename and no ``flock``, so a store is never built there. ``tile`` builds it
in a local folder exactly as for a local ``--out`` (:func:`wsi.store.finalize_store`), then
:func:`publish_store` uploads it and writes its root ``zarr.json`` -- the one object that says
``complete: true`` and holds the integrity manifest -- last. A single object's PUT is atomic, so a
reader sees the old root object or the new one; readers (:class:`wsi.store.TileStore`) refuse a store
whose root does not say complete, and check every recorded object's size against the manifest, so a
half-uploaded store is refused, never read. Replacing a store first rewrites its root with
``complete: false``: during the upload the store reads as incomplete, not as a mix of old and new.
"""

from __future__ import annotations

import json
from pathlib import Path

from wsi.objstore import Remote, RemoteError, url_join, url_name

__all__ = ["publish_store", "read_store_attrs", "verify_store", "list_stores", "open_group", "store_exists"]

ROOT = "zarr.json"


def _split(url: str) -> tuple[Remote, str]:
    """The store's parent folder and the store's name in it."""
    url = url.rstrip("/")
    parent, _, name = url.rpartition("/")
    return Remote(parent), name


def store_exists(url: str) -> bool:
    return Remote(url).exists(ROOT)


def read_root(url: str) -> dict | None:
    """The store's root ``zarr.json`` as a dict, or None when there is none (or it is not JSON)."""
    raw = Remote(url).cat_or_none(ROOT)
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return None


def read_store_attrs(url: str) -> dict | None:
    root = read_root(url)
    if not isinstance(root, dict) or root.get("node_type") != "group":
        return None
    return dict(root.get("attributes") or {})


def open_group(url: str):
    """The store as a read-only zarr group through zarr's ``FsspecStore``."""
    import zarr
    from zarr.storage import FsspecStore

    try:
        store = FsspecStore.from_url(url, read_only=True)
    except ImportError as exc:
        raise RemoteError(f"{url}: {exc}") from None
    return zarr.open_group(store=store, mode="r")


def verify_store(url: str, attrs: dict, *, checksums: bool = False) -> list[str]:
    """:func:`wsi.store.verify_store` for a store on object storage: every object of the manifest is
    there with its size (and, with ``checksums``, its crc32c)."""
    from wsi.store import NO_RECORD

    record = (attrs.get("integrity") or {}).get("files")
    if not isinstance(record, dict):
        return [NO_RECORD]
    r = Remote(url)
    have = r.files()
    problems = []
    for rel, (size, crc) in record.items():
        got = have.get(rel)
        if got is None:
            problems.append(f"{rel} is missing")
        elif got != int(size):
            problems.append(f"{rel} is {got} bytes, {int(size)} when it was written")
        elif checksums and _crc(r.cat(rel)) != crc:
            problems.append(f"{rel} does not match its checksum")
    return problems


def _crc(data: bytes) -> str:
    import google_crc32c

    return f"{int(google_crc32c.value(data)):08x}"


def list_stores(url: str) -> list[str]:
    """URLs of the stores (``*.zarr``, hidden names excluded) directly under ``url``, sorted."""
    from wsi.store import STORE_SUFFIX

    r = Remote(url)
    return [r.url_of(n) for n in r.children() if n.endswith(STORE_SUFFIX) and not n.startswith(".")]


def publish_store(local: str | Path, url: str, pictures: dict | None = None) -> int:
    """Upload a finished local store to ``url`` and publish it; returns the bytes uploaded.

    Order: (1) an existing store there gets ``complete: false`` in its root object; (2) every other
    object and the pictures (``{local file: name beside the store}``) are uploaded; (3) objects there the
    new store does not have (of the old store, or of a killed upload) are deleted; (4) the root object, complete with its integrity
    manifest, is written last. A run stopped anywhere before (4) leaves a store readers refuse as
    incomplete, which the next ``tile`` replaces.
    """
    from wsi.store import _store_files

    local = Path(local)
    parent, name = _split(url)
    new = _store_files(local)
    old_root = read_root(url)
    if old_root is not None:
        old_root.setdefault("attributes", {})["complete"] = False
        parent.pipe(f"{name}/{ROOT}", json.dumps(old_root, indent=2).encode())
    pairs = [(local / rel, f"{name}/{rel}") for rel in sorted(new)]
    pairs += [(Path(src), dest) for src, dest in (pictures or {}).items() if Path(src).is_file()]
    parent.put(pairs)
    stale = sorted(set(parent.files(name)) - set(new) - {ROOT})  # also what a killed earlier upload left
    parent.rm([f"{name}/{rel}" for rel in stale])
    parent.pipe(f"{name}/{ROOT}", (local / ROOT).read_bytes())
    return sum(new.values()) + (local / ROOT).stat().st_size


def store_url(store_dir: str, slide_id: str) -> str:
    from wsi.store import STORE_SUFFIX

    return url_join(store_dir, f"{slide_id}{STORE_SUFFIX}")


def slide_id_of(url: str) -> str:
    from wsi.store import STORE_SUFFIX

    name = url_name(url)
    return name[: -len(STORE_SUFFIX)] if name.endswith(STORE_SUFFIX) else name
