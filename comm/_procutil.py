"""Process helpers shared by the communicator process (_server.py) and the backend
processes attached to it (_attach.py): whether a peer process is gone, and the
removal of completion-FIFO directories that dead attachers left behind.

A process killed but not yet reaped by its parent is a zombie: ``os.kill(pid, 0)``
still succeeds on it, though it will never read or write again. On Linux its
state in /proc/<pid>/stat is 'Z', and that counts as gone too; where /proc is
missing, only the signal check is made.
"""

from __future__ import annotations

import os
import shutil
import tempfile

RING_PREFIX = "pagecomm-ring-"  # + pid + "-": a completion FIFO's directory


def process_gone(pid: int, zombies: bool = True) -> bool:
    """True if process ``pid`` no longer runs (no such process, or, with ``zombies``,
    a zombie: that costs a read of /proc, about 14 us against 1). Raises ValueError
    for a pid outside 1..2**31-1 (0 or a negative one names a group)."""
    if not 1 <= pid <= 2**31 - 1:
        raise ValueError(f"pid {pid} is outside 1..{2**31 - 1}")
    other_user = False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        other_user = True  # alive (or a zombie), another user's
    if not zombies:
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except FileNotFoundError:  # reaped since the signal check, or no /proc here, or
        # hidden (hidepid=2 hides other users' processes: alive, as kill said)
        return not other_user and os.path.exists("/proc/self/stat")
    except OSError:
        return False
    # "pid (comm) S ...": comm may hold spaces and parentheses; the state follows the
    # last ')'
    return stat[stat.rfind(b")") + 2:][:1] == b"Z"


def remove_stale_rings() -> None:
    """Remove the FIFO directories of backends that died while attaching (the name
    lives only for the handshake; a SIGTERM then leaves it). Only this user's, and
    only those whose process is gone."""
    tmp = tempfile.gettempdir()
    try:
        names = [n for n in os.listdir(tmp) if n.startswith(RING_PREFIX)]
    except OSError:
        return
    for name in names:
        pid = name[len(RING_PREFIX):].partition("-")[0]
        path = os.path.join(tmp, name)
        try:
            if not pid.isdigit() or os.lstat(path).st_uid != os.getuid():
                continue
            if process_gone(int(pid)):
                shutil.rmtree(path, ignore_errors=True)
        except (OSError, ValueError):  # not ours to judge (gone meanwhile, a huge pid)
            pass
