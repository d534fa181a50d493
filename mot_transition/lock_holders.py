"""Who holds a lock of locks.py, in words: every process that holds a `flock` on the lock file, from
/proc/locks (with the kind of lock: READ for a reader, WRITE for a writer), each named by the record
it wrote into the file, else by its command line; without /proc/locks (or for a holder on another
host of a network file system, which /proc/locks does not show), the records of processes alive."""

import json
import os
import socket


def _describe(record: dict) -> str:
    where = f"pid {record['pid']} on {record['host']}"
    job = f", torchrun job {record['job']}" if record.get("job") else ""
    return f"{where}{job}: `{record['command']}` since {record['since']}"


def _records(fd: int) -> dict[int, dict]:
    """The records in the lock file, by pid (a pid's last)."""
    try:
        text = os.pread(fd, 1 << 16, 0).decode(errors="replace")
    except OSError:
        return {}
    found = {}
    for line in text.splitlines():
        try:
            record = json.loads(line)
            found[int(record["pid"])] = record
        except (ValueError, KeyError, TypeError):
            continue
    return found


def _lockers(fd: int) -> list[tuple[int, str]] | None:
    """(pid, READ or WRITE) of every process that holds a flock on the file of `fd`, this one aside,
    from /proc/locks; None where that is not available."""
    st = os.fstat(fd)
    wanted = (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino)
    try:
        with open("/proc/locks") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    found = []
    for line in lines:
        fields = line.split()
        if len(fields) < 6 or "->" in fields or fields[1] != "FLOCK":
            continue
        try:
            major, minor, inode = fields[5].split(":")
            pid = int(fields[4])
            if (int(major, 16), int(minor, 16), int(inode)) == wanted and pid != os.getpid():
                found.append((pid, fields[3]))
        except ValueError:
            continue
    return found


def holders(fd: int) -> tuple[str, str | None]:
    """Who holds the lock of `fd`, in words, and the kind of lock they hold (READ, WRITE, or None
    when unknown)."""
    records, lockers = _records(fd), _lockers(fd)
    if not lockers:  # another host's process (a network file system), or no /proc/locks: its records
        live = [r for r in records.values() if r.get("host") != socket.gethostname() or _alive(int(r["pid"]))]
        if not live:
            return "another process (one that has only just started, or not a mot-transition one)", None
        kind = "READ" if all(r.get("reads") for r in live) else "WRITE"
        lockers = [(int(r["pid"]), kind) for r in live]
    named = []
    for pid, _ in dict(lockers).items():
        record = records.get(pid)
        named.append(_describe(record) if record else f"pid {pid}: `{_cmdline(pid)}`")
    kind = "READ" if all(k == "READ" for _, k in lockers) else "WRITE"
    who = "another process" if len(named) == 1 else f"{len(named)} other processes"
    return f"{who} ({'; '.join(named)})", kind


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except OSError:
        return True


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            text = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        text = ""
    text = text or "not a mot-transition process"
    return text if len(text) <= 300 else text[:297] + "..."


__all__ = ["holders"]
