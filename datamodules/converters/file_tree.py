"""The files of a folder or a tar archive (plain or compressed), by relative POSIX path, read in any order."""

from __future__ import annotations

import os
import tarfile
from collections.abc import Callable
from pathlib import Path, PurePosixPath

# Archives that cannot be read in random order (.tar.gz, ...) are held in memory to be sorted; beyond this,
# unpacking them first is the better plan and the converter says so.
DEFAULT_MAX_ARCHIVE_BYTES = 8 * 1024**3


class FileTree:
    """The regular files of a folder or a tar archive, by POSIX path relative to its root, read in any order.

    Plain ``.tar`` files are read in place by seeking; compressed archives (``.tar.gz``...) are read once,
    sequentially, into memory (nothing is unpacked to disk), so that their files can be taken in sorted order.
    """

    def __init__(self, src: str | os.PathLike, *, max_archive_bytes: int = DEFAULT_MAX_ARCHIVE_BYTES):
        self.src = Path(src)
        self._files: dict[str, Callable[[], bytes]] = {}
        self._dirs: set[str] = set()
        self._tar: tarfile.TarFile | None = None
        if not self.src.exists():
            raise FileNotFoundError(f"source does not exist: {self.src}")
        if self.src.is_dir():
            self.kind = "folder"
            self._scan_folder()
        elif tarfile.is_tarfile(self.src):
            self.kind = "archive"
            self._scan_archive(max_archive_bytes)
        else:
            raise ValueError(f"source {self.src} is neither a folder nor a tar archive (.tar, .tar.gz, .tgz)")

    def _scan_folder(self) -> None:
        for dirpath, dirnames, filenames in os.walk(self.src, followlinks=True):  # class folders may be links
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))  # .git, .ipynb_checkpoints, ...
            rel_dir = Path(dirpath).relative_to(self.src).as_posix()
            if rel_dir != ".":
                self._dirs.add(rel_dir)
            for name in filenames:
                rel = name if rel_dir == "." else f"{rel_dir}/{name}"
                full = Path(dirpath) / name
                if full.is_file():
                    self._files[rel] = full.read_bytes

    def _scan_archive(self, max_bytes: int) -> None:
        try:
            if _is_uncompressed_tar(self.src):
                tar = self._tar = tarfile.open(self.src, mode="r:")
                for info in tar.getmembers():
                    self._add_member(info, _member_reader(tar, info) if info.isreg() else None)
                return
            held = 0
            with tarfile.open(self.src, mode="r|*") as stream:
                for info in stream:
                    if not info.isreg():
                        self._add_member(info, None)
                        continue
                    held += info.size
                    if held > max_bytes:
                        raise ValueError(
                            f"archive {self.src} holds more than {max_bytes / 1024**3:.1f} GiB of files; compressed "
                            "archives are read into memory to be sorted: unpack it and pass the folder instead"
                        )
                    reader = stream.extractfile(info)
                    data = reader.read() if reader is not None else b""
                    self._add_member(info, _constant(data))
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise ValueError(f"archive {self.src} cannot be read: {exc}") from None

    def _add_member(self, info: tarfile.TarInfo, reader: Callable[[], bytes] | None) -> None:
        name = clean_member_name(info.name)
        if not name:
            return
        parts = name.split("/")
        self._dirs.update("/".join(parts[:i]) for i in range(1, len(parts)))
        if info.isdir():
            self._dirs.add(name)
        elif reader is not None:
            self._files[name] = reader

    def files(self) -> list[str]:
        return sorted(self._files)

    def dirs(self) -> list[str]:
        """Every folder, including empty ones and those only implied by a file's path."""
        return sorted(self._dirs)

    def read(self, rel: str) -> bytes:
        return self._files[rel]()

    def close(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tar = None

    def __enter__(self) -> FileTree:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _is_uncompressed_tar(path: Path) -> bool:
    try:
        with tarfile.open(path, mode="r:"):
            return True
    except tarfile.TarError:
        return False


def clean_member_name(name: str) -> str:
    parts = [p for p in PurePosixPath(name).parts if p not in ("", ".", "/")]
    return "/".join(parts)


def _member_reader(tar: tarfile.TarFile, info: tarfile.TarInfo) -> Callable[[], bytes]:
    def read() -> bytes:
        handle = tar.extractfile(info)
        return handle.read() if handle is not None else b""

    return read


def _constant(data: bytes) -> Callable[[], bytes]:
    return lambda: data
