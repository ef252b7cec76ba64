"""What /proc says about a tritonserver: its Python backend stubs, their models and shared-memory regions.

A stub's argv is fixed by the Python backend (``StubLauncher::Launch``):
``triton_python_backend_stub <model dir>/<version>/model.py <shm region> <shm size> <growth> <parent pid>
<python lib> <ipc handle> <instance name> <runtime model dir>``. The shm region is a POSIX shared-memory
object, ``/dev/shm/<region>``, that only the server unlinks (when the instance is finalized): a server
killed (or exiting on its exit timeout) leaves it behind, so the launcher records every region it sees
and unlinks the leftovers itself.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

STUB = "triton_python_backend_stub"
SHM_DIR = Path("/dev/shm")


@dataclass(frozen=True)
class Stub:
    """One running Python backend stub process."""

    pid: int
    model: str  # the model's directory name in the repository
    instance: str  # Triton's instance name, e.g. "flux_0"
    shm_region: str  # name of its /dev/shm object


def _stat_fields(pid: int) -> list[str] | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2 :].split()  # state, ppid, pgrp, ...


def pid_alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie."""
    fields = _stat_fields(pid)
    return fields is not None and fields[0] != "Z"


def children(pid: int) -> list[int]:
    """Live child pids of ``pid``."""
    found = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                found += [int(c) for c in (task / "children").read_text().split()]
    return [c for c in found if pid_alive(c)]


def parse_stub(pid: int, argv: list[str]) -> Stub | None:
    if len(argv) < 9 or not argv[0].endswith(STUB):
        return None
    model_dir = Path(argv[1]).parent.parent  # <repo>/<model>/<version>/model.py
    return Stub(pid=pid, model=model_dir.name, instance=argv[8], shm_region=argv[2])


def stubs_of(server_pid: int) -> list[Stub]:
    """The Python backend stubs ``server_pid`` runs now."""
    stubs = []
    for pid in children(server_pid):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if (stub := parse_stub(pid, argv)) is not None:
            stubs.append(stub)
    return stubs


def workers_of(stub_pid: int) -> list[int]:
    """Pids of the parallel worker ranks a stub spawned (multiprocessing's spawn start method).

    Only spawned interpreters count: multiprocessing's resource tracker and any compiler pool run
    other command lines, and come and go on their own.
    """
    workers = []
    for pid in children(stub_pid):
        with contextlib.suppress(OSError):
            if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes():
                workers.append(pid)
    return workers


def group_members(pgid: int) -> list[int]:
    """Pids of the live processes in process group ``pgid``."""
    members = []
    for entry in Path("/proc").iterdir():
        fields = _stat_fields(int(entry.name)) if entry.name.isdigit() else None
        if fields is not None and fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(entry.name))
    return members


def unlink_shm(regions: set[str]) -> list[str]:
    """Remove the named /dev/shm objects that still exist; return those removed."""
    removed = []
    for region in sorted(regions):
        if "/" in region or not region:
            continue  # a region name is a plain file name: never follow anything else
        with contextlib.suppress(FileNotFoundError):
            os.unlink(SHM_DIR / region)
            removed.append(region)
    return removed
