"""Pack a bundle directory into an uncompressed tar and unpack one safely.

The registry serves bundles as ``.tar`` files and devices unpack what they
download, so unpacking treats the archive as hostile: absolute paths, ``..``,
links, devices and oversized contents are refused before anything is written,
and the result appears at its destination in one rename. Re-exported by
``fedge.shared.bundle``; verification is a separate step (``verify_bundle``).
"""

import io
import os
import shutil
import tarfile
import tempfile
from pathlib import Path, PurePosixPath

from fedge.shared.atomic import atomic_path
from fedge.shared.errors import BundleError

MANIFEST_NAME = "manifest.json"
MAX_UNPACKED_BYTES = 4 << 30  # 4 GiB: larger than any edge model, smaller than a full disk


def _bundle_files(bundle_dir: Path) -> list[str]:
    """Relative POSIX names of every file, manifest first (streaming readers see it early)."""
    names: list[str] = []
    for root, dirs, files in os.walk(bundle_dir):
        dirs.sort()
        for name in sorted(dirs + files):
            path = Path(root) / name
            if path.is_symlink():
                raise BundleError(
                    f"bundle {bundle_dir}: {path.name} is a symbolic link; not packing it"
                )
        names.extend((Path(root) / f).relative_to(bundle_dir).as_posix() for f in sorted(files))
    return sorted(names, key=lambda n: (n != MANIFEST_NAME, n))


def pack_bundle(bundle_dir: Path | str, tar_path: Path | str) -> Path:
    """Write ``bundle_dir`` as an uncompressed, reproducible tar (members relative to it).

    Owners, times and modes are normalised so the same bundle always gives the
    same bytes. The tar is written atomically.

    Raises
    ------
    BundleError
        If ``bundle_dir`` is not a bundle (no ``manifest.json``) or holds a link.
    """
    bundle_dir, tar_path = Path(bundle_dir), Path(tar_path)
    if not (bundle_dir / MANIFEST_NAME).is_file():
        raise BundleError(f"{bundle_dir} is not a bundle ({MANIFEST_NAME} is missing)")
    names = _bundle_files(bundle_dir)
    with atomic_path(tar_path) as tmp, tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
        for name in names:
            path = bundle_dir / name
            info = tarfile.TarInfo(name)
            info.size = path.stat().st_size
            info.mode = 0o644
            info.mtime = 0
            with open(path, "rb") as handle:
                tar.addfile(info, handle)
    return tar_path


def _member_parts(tar_path: Path, member: tarfile.TarInfo) -> tuple[str, ...]:
    """The member's path parts, refusing anything that could land outside the destination."""
    name = member.name
    pure = PurePosixPath(name)
    if name.startswith(("/", "\\")) or pure.is_absolute() or (len(name) > 1 and name[1] == ":"):
        raise BundleError(f"{tar_path}: member {name!r} has an absolute path; refusing the archive")
    parts = tuple(p for p in pure.parts if p not in ("", "."))
    if ".." in parts or "\\" in name:
        raise BundleError(f"{tar_path}: member {name!r} points outside the bundle; refusing it")
    if not (member.isfile() or member.isdir()):
        kind = "link" if member.issym() or member.islnk() else "special file"
        raise BundleError(f"{tar_path}: member {name!r} is a {kind}; refusing the archive")
    return parts


def _plan(
    tar_path: Path, members: list[tarfile.TarInfo], max_bytes: int
) -> list[tuple[tarfile.TarInfo, tuple[str, ...]]]:
    """Check every member, then strip one wrapping folder (``tar cf b.tar bundle/``)."""
    planned = [(m, _member_parts(tar_path, m)) for m in members]
    total = sum(m.size for m, _ in planned if m.isfile())
    if total > max_bytes:
        raise BundleError(f"{tar_path}: unpacks to {total} bytes, over the {max_bytes} limit")
    files = [(m, p) for m, p in planned if m.isfile() and p]
    tops = {p[0] for _, p in files}
    if files and (MANIFEST_NAME,) not in [p for _, p in files] and len(tops) == 1:
        files = [(m, p[1:]) for m, p in files if len(p) > 1]
    seen: set[tuple[str, ...]] = set()
    for _, parts in files:
        if parts in seen:
            raise BundleError(f"{tar_path}: {'/'.join(parts)} appears twice; refusing the archive")
        seen.add(parts)
    if (MANIFEST_NAME,) not in seen:
        raise BundleError(f"{tar_path} does not contain a bundle ({MANIFEST_NAME} is missing)")
    return files


def _open_tar(tar_path: Path) -> tarfile.TarFile:
    try:
        return tarfile.open(tar_path, "r:*")
    except FileNotFoundError as e:
        raise BundleError(f"bundle archive {tar_path} does not exist") from e
    except (tarfile.TarError, OSError) as e:
        raise BundleError(f"{tar_path} is not a readable tar archive: {e}") from e


def unpack_bundle(
    tar_path: Path | str, dest_dir: Path | str, max_bytes: int = MAX_UNPACKED_BYTES
) -> Path:
    """Unpack a bundle tar into ``dest_dir`` (which must not exist or be empty).

    Does NOT verify the bundle: call ``verify_bundle`` on the result before use.

    Raises
    ------
    BundleError
        For an unreadable archive, unsafe members (absolute paths, ``..``,
        links, devices), contents over ``max_bytes``, no ``manifest.json``, or
        a non-empty destination.
    """
    tar_path, dest_dir = Path(tar_path), Path(dest_dir)
    if dest_dir.exists() and (not dest_dir.is_dir() or any(dest_dir.iterdir())):
        raise BundleError(f"{dest_dir} already exists and is not empty; unpack somewhere new")
    dest_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest_dir.name}.", dir=dest_dir.parent))
    staging.chmod(0o755)
    try:
        with _open_tar(tar_path) as tar:
            for member, parts in _plan(tar_path, tar.getmembers(), max_bytes):
                target = staging.joinpath(*parts)
                target.parent.mkdir(parents=True, exist_ok=True)
                source = tar.extractfile(member) or io.BytesIO()
                with source, open(target, "wb") as out:
                    shutil.copyfileobj(source, out, 1 << 20)
        if dest_dir.exists():
            dest_dir.rmdir()
        os.replace(staging, dest_dir)
    except (tarfile.TarError, EOFError) as e:
        raise BundleError(f"{tar_path} is truncated or corrupt: {e}") from e
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return dest_dir
