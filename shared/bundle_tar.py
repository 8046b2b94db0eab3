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
# tarfile reads a pax or GNU long-name record whole into memory, whatever size its header
# claims; fedge's own tars need a few hundred bytes of them.
MAX_EXTENDED_HEADER_BYTES = 8 << 10
_EXTENDED_TYPES = (b"x", b"g", b"L", b"K")
_COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ", b"\x28\xb5\x2f\xfd")


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
    # A file `artifacts` beside `artifacts/x` cannot both be written: refuse, don't crash.
    folders = {parts[:i] for parts in seen for i in range(1, len(parts))}
    clash = sorted(folders & seen)
    if clash:
        name = "/".join(clash[0])
        raise BundleError(f"{tar_path}: {name} is both a file and a folder; refusing the archive")
    if (MANIFEST_NAME,) not in seen:
        raise BundleError(f"{tar_path} does not contain a bundle ({MANIFEST_NAME} is missing)")
    return files


def _header_size(field: bytes) -> int | None:
    """The size field of a tar header (octal, or base-256 with the top bit set); None if junk."""
    if field[:1] and field[0] & 0x80:
        return int.from_bytes(field[1:], "big")
    text = field.replace(b"\0", b" ").strip() or b"0"
    try:
        return int(text, 8)
    except ValueError:
        return None  # not a tar header: tarfile will say so


def check_headers(tar_path: Path, max_extended: int = MAX_EXTENDED_HEADER_BYTES) -> None:
    """Walk the raw 512-byte headers and refuse oversized pax/long-name records.

    Raises
    ------
    BundleError
        A compressed archive (fedge's tars never are), or an extended header over
        ``max_extended`` bytes.
    """
    with open(tar_path, "rb") as handle:
        if handle.read(6).startswith(_COMPRESSED_MAGIC):
            raise BundleError(
                f"{tar_path} is compressed; bundle archives are plain tars (`fedge` writes them so)"
            )
        handle.seek(0)
        while len(block := handle.read(512)) == 512 and block.strip(b"\0"):
            size = _header_size(block[124:136])
            if size is None:
                return
            if block[156:157] in _EXTENDED_TYPES and size > max_extended:
                raise BundleError(
                    f"{tar_path}: an extended (pax) header claims {size} bytes, over the "
                    f"{max_extended}-byte limit; refusing the archive"
                )
            handle.seek((size + 511) // 512 * 512, os.SEEK_CUR)


def _open_tar(tar_path: Path) -> tarfile.TarFile:
    try:
        check_headers(tar_path)
        return tarfile.open(tar_path, "r:")
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
    except (NotADirectoryError, IsADirectoryError, FileExistsError) as e:
        raise BundleError(f"{tar_path}: members collide on disk ({e}); refusing it") from e
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return dest_dir
