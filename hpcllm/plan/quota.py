"""The user's disk quota where the run directory lives, from `lfs quota` (Lustre) or `quota`.

On a shared cluster the filesystem may have petabytes free while the user's quota has a few GB
left: the space a run can use is the smaller of the two. Where neither tool answers, only the
filesystem's free space counts.
"""
from __future__ import annotations

import getpass
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from typing import Optional

KIB = 1024
WARN_FRACTION = 0.85


@dataclass(frozen=True)
class Quota:
    used: int  # bytes
    limit: int  # bytes (the soft quota where set, else the hard limit)
    tool: str

    @property
    def free(self) -> int:
        return max(0, self.limit - self.used)

    @property
    def fraction_used(self) -> float:
        return self.used / self.limit


def mount_point(path: str) -> str:
    path = os.path.abspath(path)
    while not os.path.ismount(path):
        path = os.path.dirname(path)
    return path


def _limit(used_kib: str, soft_kib: str, hard_kib: str, tool: str) -> Optional[Quota]:
    numbers = [int(value.rstrip("*")) for value in (used_kib, soft_kib, hard_kib)]
    used, soft, hard = numbers
    limit = soft or hard
    return Quota(used * KIB, limit * KIB, tool) if limit else None


def parse_lfs_quota(text: str, mount: str) -> Optional[Quota]:
    """`lfs quota -q -u USER MOUNT`: "MOUNT kbytes quota limit grace files quota limit grace"; a long
    mount name is printed on its own line, the numbers on the next."""
    tokens = text.split()
    if mount not in tokens:
        return None
    values = tokens[tokens.index(mount) + 1:]
    return _limit(values[0], values[1], values[2], "lfs quota") if len(values) >= 3 else None


def parse_quota(text: str, filesystems: tuple[str, ...]) -> Optional[Quota]:
    """`quota -w`: a header, then "Filesystem blocks quota limit grace files quota limit grace" rows
    in KiB; the row of the run directory's device or mount point counts."""
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 4 and fields[0] in filesystems and re.fullmatch(r"\d+\*?", fields[1]):
            return _limit(fields[1], fields[2], fields[3], "quota")
    return None


def _answer(*cmd: str) -> Optional[str]:
    if shutil.which(cmd[0]) is None:
        return None
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


def _device(mount: str) -> str:
    with open("/proc/mounts") as mounts:
        for line in mounts:
            fields = line.split()
            if len(fields) > 1 and fields[1] == mount:
                return fields[0]
    return mount


def user_quota(path: str) -> Optional[Quota]:
    """The quota of this user on the filesystem holding ``path``, where a quota tool answers."""
    mount, user = mount_point(path), getpass.getuser()
    text = _answer("lfs", "quota", "-q", "-u", user, mount)
    found = parse_lfs_quota(text, mount) if text else None
    if found is None:
        text = _answer("quota", "-w", "-u", user)
        found = parse_quota(text, (mount, _device(mount))) if text else None
    return found


def quota_warning(found: Optional[Quota], path: str) -> Optional[str]:
    if found is None or found.fraction_used < WARN_FRACTION:
        return None
    return (f"disk quota: {found.fraction_used:.0%} of your {found.limit / 2**30:.0f} GiB quota on "
            f"{mount_point(path)} is used ({found.tool}); checkpoints of a 7B full fine-tune take ~190 GB: "
            "free space, or point the run at a scratch filesystem (HPCLLM_RUNS or cluster.runs_root)")
