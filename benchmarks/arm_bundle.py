"""The experiment arms a GPU call brings back, as one file: ``arms.tar`` holds one ``arm-<id>.tar.gz`` per finished
arm (its exported folder, no checkpoint), appended as each arm ends.

One file, because the device tool brings back at most 8 files from a call's output (a call of four arms as separate
archives, beside its log, summary and measurements, would lose some). Archives inside it, so that a call cut off
while appending loses only the arm being appended: ``arms_in`` returns the complete ones and says which it left out.
"""

from __future__ import annotations

import io
import sys
import tarfile
import time
from pathlib import Path, PurePosixPath

BUNDLE = "arms.tar"


def member_name(arm_id: str) -> str:
    return f"arm-{arm_id.replace('/', '_')}.tar.gz"


def append_arm(bundle: Path, folder: Path, arm_id: str) -> None:
    """``folder`` (an exported arm) as ``arm-<id>.tar.gz`` at the end of ``bundle`` (made if absent)."""
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w:gz") as arm:
        arm.add(folder, arcname=arm_id)
    info = tarfile.TarInfo(member_name(arm_id))
    info.size, info.mtime = data.tell(), int(time.time())
    data.seek(0)
    with tarfile.open(bundle, "a") as tar:
        tar.addfile(info, data)


def arms_in(bundle: Path) -> list[tuple[str, bytes]]:
    """(``arm-<id>.tar.gz``, its bytes) for every complete arm archive in ``bundle``, in the order they were added;
    an archive cut short (the call stopped while appending it) is left out, and said on stderr."""
    if not bundle.exists():
        return []
    arms: list[tuple[str, bytes]] = []
    try:
        with tarfile.open(bundle, "r:") as tar:
            for member in iter(tar.next, None):
                file = tar.extractfile(member) if member.isfile() else None
                data = file.read() if file is not None else b""
                if len(data) != member.size or not member.isfile():
                    raise EOFError(f"{member.name}: {len(data)} of {member.size} bytes")
                with open_arm(data) as arm:
                    arm.getmembers()  # reads the whole archive: a cut gzip stream fails here
                arms.append((member.name, data))
    except (tarfile.TarError, EOFError, OSError) as error:
        print(f"{bundle}: left out what follows its {len(arms)} complete arm(s), cut short ({error})", file=sys.stderr)
    return arms


def arm_ids(members: list[tarfile.TarInfo]) -> set[str]:
    """The arm folders (``seed0/simclr-na``) an arm archive's members lie in: one for an archive ``append_arm``
    made (its file name flattens the id, so the id is read from here)."""
    return {"/".join(PurePosixPath(m.name).parts[:2]) for m in members if len(PurePosixPath(m.name).parts) >= 2}


def open_arm(data: bytes) -> tarfile.TarFile:
    return tarfile.open(fileobj=io.BytesIO(data), mode="r:gz")
