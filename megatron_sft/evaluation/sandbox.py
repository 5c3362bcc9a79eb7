"""Model-written code runs here, in a sandbox, because evalplus's guard is not one.

evalplus disables some dangerous functions before it runs a completion, and says in its own docstring that this
is not a security sandbox: ``io.open``, ``posix.system``, ``posix.unlink``, sockets and children started with
``setsid`` all get past it. So every program under test (one sampled answer: its base and plus tests) runs in a
fresh sandbox, layered:

- namespaces: a new network namespace (no network; bubblewrap brings up the namespace's own loopback, which
  reaches nothing but the program), a PID namespace (everything the program starts dies with it), a mount
  namespace in which the whole filesystem is read-only, /root, /home and /run are hidden, and /tmp, /var/tmp
  and /dev/shm are small private tmpfs (the program's own temp dir); built by bubblewrap (``bwrap``) when
  installed, else util-linux ``unshare``, else ``unshare(2)`` from Python (``os.unshare``); user namespaces
  when not root; started as root, the program runs as uid/gid 65534 with no capabilities and no_new_privs;
- resource limits: CPU seconds, address space, file size, processes, open files;
- evalplus's guard, innermost, as before.

Each sandbox checks itself (new namespaces, uid, capabilities, read-only root, limits) before it runs the
program; anything amiss is a *sandbox error*, reported apart from the model's failures. This module is also the
program that runs inside (``python -m megatron_sft.evaluation.sandbox CONFIG``): it reads the task on stdin,
finishes the setup, prints ``READY``, runs evalplus's check and prints the statuses as one JSON line.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import selectors
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Any, Optional

MECHANISMS = ("bwrap", "unshare", "os-unshare")  # the order ``auto`` tries them in
UNSANDBOXED = "none"  # --allow-unsandboxed-code: evalplus's guard only, in the grading process (as before)
SANDBOX_ERROR = "sandbox_error"
NOBODY = 65534
HIDDEN = ("/root", "/home", "/run")  # empty, read-only tmpfs (what the interpreter needs is bound back)
PRIVATE = ("/tmp", "/var/tmp", "/dev/shm")  # writable, size-limited tmpfs: the program's own temp dirs
STARTUP_S = 20.0  # start-up allowance of one sandbox (interpreter, numpy import) on a busy node
ENABLE_HINT = ("install bubblewrap (apt-get install bubblewrap, dnf install bubblewrap) or allow user namespaces "
               "(sysctl user.max_user_namespaces=15000; kernel.unprivileged_userns_clone=1 on Debian/Ubuntu; "
               "kernel.apparmor_restrict_unprivileged_userns=0 on Ubuntu 24.04), or pass --allow-unsandboxed-code "
               "to run model-written code with evalplus's guard only (recorded in the results)")


class SandboxUnavailable(RuntimeError):
    """No isolation mechanism works here and running unsandboxed was not allowed."""


@dataclass(frozen=True)
class Limits:
    """Per-program resource limits (the address space matches evalplus's own 4 GiB cap)."""

    memory_bytes: int = 4 << 30
    file_bytes: int = 64 << 20
    open_files: int = 256
    processes: int = 256  # more than the sandbox's uid already runs (RLIMIT_NPROC counts per uid)
    tmp_bytes: int = 256 << 20


# ---- outside: choosing a mechanism ---------------------------------------------------------------------------------

def choose_sandbox(requested: str = "auto", allow_unsandboxed: bool = False) -> str:
    """The mechanism to grade code with: ``requested`` if it works, or with ``auto`` the first that works;
    ``none`` only when allowed. Raises SandboxUnavailable naming what was tried and why it failed."""
    if requested == UNSANDBOXED:
        if not allow_unsandboxed:
            raise SandboxUnavailable("--sandbox none runs model-written code unsandboxed: pass "
                                     "--allow-unsandboxed-code to do so")
        return UNSANDBOXED
    if requested != "auto" and requested not in MECHANISMS:
        raise ValueError(f"--sandbox must be auto, {', '.join(MECHANISMS)} or none; got {requested!r}")
    tried = []
    for mechanism in MECHANISMS if requested == "auto" else (requested,):
        why = probe(mechanism)
        if why is None:
            return mechanism
        tried.append(f"{mechanism}: {why}")
    if allow_unsandboxed:
        print(f"warning: no sandbox works here ({'; '.join(tried)}); model-written code runs unsandboxed "
              "(--allow-unsandboxed-code)", file=sys.stderr)
        return UNSANDBOXED
    raise SandboxUnavailable(f"no sandbox for model-written code works on this machine ({'; '.join(tried)}); "
                             + ENABLE_HINT)


PROBE_TASK = {"dataset": "humaneval", "entry_point": "f", "atol": 0, "solution": "def f(x):\n    return x\n",
              "inputs": {"base": [[1]], "plus": [[2]]}, "expected": {"base": [1], "plus": [2]},
              "ref_time": {"base": [0.001], "plus": [0.001]}}


@lru_cache(maxsize=None)
def probe(mechanism: str) -> Optional[str]:
    """None if ``mechanism`` runs a trivial program correctly here, else why not (one line)."""
    if mechanism == "bwrap" and shutil.which("bwrap") is None:
        return "bwrap not installed"
    if mechanism == "unshare" and shutil.which("unshare") is None:
        return "unshare (util-linux) not installed"
    result = run_task(mechanism, PROBE_TASK)
    if result.get("base") == result.get("plus") == "pass":
        return None
    return str(result.get("error", "")).removeprefix("sandbox error: ") or f"a trivial program did not pass ({result})"


# ---- outside: running one program ---------------------------------------------------------------------------------

def check_code(mechanism: str, dataset: str, problem: dict, solution: str, expected: dict,
               limits: Limits = Limits()) -> dict:
    """evalplus's base and plus checks of ``solution`` (stopping at the first failing input) in ``mechanism``:
    {"base": status, "plus": status} with statuses pass / fail / timeout / sandbox_error, and "error" (why)."""
    if mechanism == UNSANDBOXED:
        from evalplus.evaluate import check_correctness

        result = check_correctness(dataset, 0, problem, solution, expected, fast_check=True)
        return {"base": result["base"][0], "plus": result["plus"][0]}
    task = {"dataset": dataset, "entry_point": problem["entry_point"], "atol": problem["atol"],
            "solution": solution, "inputs": {s: problem[f"{s}_input"] for s in ("base", "plus")},
            "expected": {s: expected[s] for s in ("base", "plus")},
            "ref_time": {s: expected[f"{s}_time"] for s in ("base", "plus")}}
    return run_task(mechanism, task, limits)


def outcome(result: dict) -> str:
    """passed / failed / timeout / sandbox_error of one check (a sandbox error wins: the grade means nothing)."""
    statuses = (result["base"], result["plus"])
    if SANDBOX_ERROR in statuses:
        return SANDBOX_ERROR
    if statuses == ("pass", "pass"):
        return "passed"
    return "timeout" if "timeout" in statuses else "failed"


def outcome_counts(samples: list[dict]) -> dict[str, float]:
    """Samples of a code benchmark by outcome (one without code found counts as failed)."""
    counts = dict.fromkeys(("passed", "failed", "timeout", SANDBOX_ERROR), 0)
    for sample in samples:
        counts[sample.get("outcome", "failed")] += 1
    return {"code_passed": float(counts["passed"]), "code_failed": float(counts["failed"]),
            "code_timeout": float(counts["timeout"]), "sandbox_errors": float(counts[SANDBOX_ERROR])}


def split_timeout(ref_time: list[float]) -> float:
    """evalplus's wall-clock limit of one split (its per-input limits, capped by EVALPLUS_TIMEOUT_PER_TASK)."""
    from evalplus.config import DEFAULT_GT_TIME_LIMIT_FACTOR as factor, DEFAULT_MIN_TIME_LIMIT as least

    limits = sum(max(least, factor * t) for t in ref_time)
    return min(float(os.getenv("EVALPLUS_TIMEOUT_PER_TASK", "60")), limits) + 2.5  # + its join and kill waits


def run_task(mechanism: str, task: dict, limits: Limits = Limits()) -> dict:
    """Run one task in a fresh sandbox; never raises for what happens inside."""
    wall = STARTUP_S + sum(split_timeout(task["ref_time"][s]) for s in ("base", "plus"))
    drop_to = NOBODY if os.geteuid() == 0 else None
    config = {"mechanism": mechanism, "limits": asdict(limits), "cpu_s": math.ceil(wall) + 1, "drop_to": drop_to,
              "rebind": rebind_paths(), "host_ns": host_namespaces(),
              "nproc": limits.processes + tasks_of(os.geteuid() if drop_to is None else drop_to)}
    python = [sys.executable, "-s", "-B", *(["-P"] if sys.version_info >= (3, 11) else [])]
    # the sandbox's PID 1 ends (and the kernel kills everything in it) once this pipe's write end closes: when
    # we are done with it, or when this process dies (a parent-death signal alone does not reach a PID 1 that
    # runs as uid 65534 under bwrap, whose outer process holds no CAP_KILL)
    config["watch_fd"], watch_w = os.pipe()
    try:
        command = launcher(mechanism, config) + python + ["-m", __name__, json.dumps(config)]
        proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                cwd="/", env=sandbox_env(), pass_fds=(config["watch_fd"],))
    except OSError as err:
        return _sandbox_error(f"cannot start the {mechanism} sandbox: {err}")
    finally:
        os.close(config["watch_fd"])
    try:
        out, err, timed_out = exchange(proc, pickle.dumps(task), wall)
    finally:
        os.close(watch_w)
    return interpret(out, err, proc.returncode, timed_out, wall)


def interpret(out: bytes, err: bytes, returncode: int, timed_out: bool, wall: float) -> dict:
    """Statuses from what the sandbox printed: no READY is the sandbox's fault, no result after READY the
    program's (it killed its grader), a wall-clock overrun a timeout."""
    lines = out.split(b"\n")
    if lines[0] != b"READY":
        why = err.decode(errors="replace").strip().splitlines()[-1:] or [f"exit code {returncode}"]
        if timed_out:
            why = [f"the sandbox did not start within {wall:.0f} s"]
        return _sandbox_error(why[0][-300:])
    try:
        result = json.loads(lines[1])
        if "error" in result:
            return _sandbox_error(str(result["error"])[:300])
        return {"base": str(result["base"]), "plus": str(result["plus"])}
    except (IndexError, ValueError, KeyError, TypeError):
        status, why = ("timeout", f"killed at the {wall:.0f} s limit") if timed_out else \
            ("fail", f"the program ended its grader (exit code {returncode})")
        return {"base": status, "plus": status, "error": why}


def _sandbox_error(why: str) -> dict:
    return {"base": SANDBOX_ERROR, "plus": SANDBOX_ERROR, "error": f"sandbox error: {why}"}


def exchange(proc: subprocess.Popen, payload: bytes, wall: float, cap: int = 1 << 20) -> tuple[bytes, bytes, bool]:
    """Send ``payload`` on stdin and read stdout / stderr (at most ``cap`` bytes each) until the sandbox exits
    or ``wall`` seconds pass; then it is killed (its PID namespace with it)."""

    def feed() -> None:
        try:
            proc.stdin.write(payload)
            proc.stdin.close()
        except OSError:
            pass

    threading.Thread(target=feed, daemon=True).start()
    out_fd, err_fd = proc.stdout.fileno(), proc.stderr.fileno()
    chunks: dict[int, list[bytes]] = {out_fd: [], err_fd: []}
    sizes = dict.fromkeys(chunks, 0)
    deadline, timed_out = time.monotonic() + wall, False
    with selectors.DefaultSelector() as selector:
        for fd in chunks:
            selector.register(fd, selectors.EVENT_READ)
        while selector.get_map():
            left = deadline - time.monotonic()
            if left <= 0:
                timed_out = True
                break
            for key, _ in selector.select(min(left, 1.0)):
                data = os.read(key.fd, 65536)
                if not data:
                    selector.unregister(key.fd)
                elif sizes[key.fd] < cap:
                    chunks[key.fd].append(data)
                    sizes[key.fd] += len(data)
    if timed_out or proc.poll() is None:
        proc.kill()
    proc.wait()
    out, err = b"".join(chunks[out_fd]), b"".join(chunks[err_fd])
    proc.stdout.close()
    proc.stderr.close()
    return out, err, timed_out


def _die_with_parent() -> None:
    """SIGKILL when the parent dies (a killed grading worker takes its sandbox with it)."""
    _prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def tasks_of(uid: int) -> int:
    """Threads ``uid`` runs machine-wide now: RLIMIT_NPROC counts them all, so the limit is set above them."""
    total = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.stat(f"/proc/{pid}").st_uid == uid:
                with open(f"/proc/{pid}/status") as f:
                    total += next(int(line.split()[1]) for line in f if line.startswith("Threads:"))
        except (OSError, StopIteration, ValueError):
            pass
    return total


def sandbox_env() -> dict[str, str]:
    """A clean environment: no credentials or tokens of the grading process reach the program."""
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/tmp", "TMPDIR": "/tmp", "LANG": "C.UTF-8",
           "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env.update({k: v for k, v in os.environ.items() if k.startswith("EVALPLUS_")})
    extra = [p for p in sys.path if os.path.isabs(p) and os.path.isdir(p) and not _under_prefix(p)]
    if extra:
        env["PYTHONPATH"] = os.pathsep.join(extra)
    return env


def _under_prefix(path: str) -> bool:
    prefixes = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
    return any(path == p or path.startswith(p.rstrip("/") + "/") for p in prefixes)


@lru_cache(maxsize=1)
def rebind_paths() -> list[str]:
    """What the interpreter needs from inside the hidden and private directories (bound back read-only)."""
    import megatron_sft

    needed = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
              os.path.dirname(os.path.realpath(sys.executable)), os.path.dirname(megatron_sft.__path__[0])}
    needed.update(p for p in sys.path if os.path.isabs(p) and os.path.exists(p))
    needed = {os.path.realpath(p) for p in needed} | needed
    hidden = [p for p in sorted(needed) if any(p.startswith(h + "/") for h in HIDDEN + PRIVATE)]
    return [p for p in hidden if not any(p.startswith(q + "/") for q in hidden if q != p)]


@lru_cache(maxsize=1)
def host_namespaces() -> dict[str, str]:
    return {ns: os.readlink(f"/proc/self/ns/{ns}") for ns in ("net", "pid", "mnt", "ipc", "uts")}


def launcher(mechanism: str, config: dict) -> list[str]:
    """The command that creates the namespaces around the inside program (which finishes the setup)."""
    if mechanism == "bwrap":
        return bwrap_command(config)
    if mechanism == "unshare":
        user = [] if os.geteuid() == 0 else ["--user", "--map-root-user"]
        die = ["setpriv", "--pdeathsig", "KILL", "--"] if shutil.which("setpriv") else []  # bwrap does this itself
        return [*die, "unshare", *user, "--mount", "--net", "--pid", "--fork", "--ipc", "--uts", "--kill-child",
                "--propagation", "private", "--"]
    if mechanism == "os-unshare":
        return []  # the inside program calls unshare(2) itself
    raise ValueError(f"unknown sandbox mechanism {mechanism!r}")


def bwrap_command(config: dict) -> list[str]:
    tmp = str(config["limits"]["tmp_bytes"])
    # --as-pid-1: bwrap then returns only once the namespace's PID 1 is reaped, i.e. after the kernel has
    # killed everything left in it (with its reaper, bwrap may return while the leftovers are still dying)
    command = ["bwrap", "--as-pid-1", "--die-with-parent", "--new-session", "--unshare-net", "--unshare-pid",
               "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try", "--ro-bind", "/", "/", "--dev", "/dev",
               "--proc", "/proc"]
    if os.geteuid() != 0:
        command.append("--unshare-user")
    for path in HIDDEN:
        if os.path.isdir(path):
            command += ["--perms", "0755", "--tmpfs", path]
    for path in filter(os.path.isdir, PRIVATE):
        command += ["--perms", "1777", "--size", tmp, "--tmpfs", path]
    for path in config["rebind"]:
        for parent in _ancestors(path):  # bwrap would create them 0700: unreachable for the dropped uid
            command += ["--perms", "0755", "--dir", parent]
        command += ["--ro-bind", path, path]
    for path in HIDDEN:
        if os.path.isdir(path):
            command += ["--remount-ro", path]
    return command + ["--chdir", "/tmp", "--"]


def _ancestors(path: str) -> list[str]:
    """The directories between the hidden or private directory that holds ``path`` and ``path``."""
    top = next(h for h in HIDDEN + PRIVATE if path.startswith(h + "/"))
    parts = path[len(top) + 1:].split("/")[:-1]
    return [os.path.join(top, *parts[:i + 1]) for i in range(len(parts))]


# ---- inside: finishing the setup, checking it, running the program ---------------------------------------------------

def _libc() -> Any:
    import ctypes

    return ctypes.CDLL(None, use_errno=True)


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _prctl(option: int, arg: int) -> int:
    return _libc().prctl(option, arg, 0, 0, 0)


def _check(ret: int, what: str) -> None:
    if ret != 0:
        import ctypes

        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")


def _mount(source: Optional[str], target: str, fstype: Optional[str], flags: int, data: Optional[str] = None) -> None:
    enc = (lambda s: None if s is None else s.encode())
    _check(_libc().mount(enc(source), enc(target), enc(fstype), flags, enc(data)), f"mount {target}")


MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = \
    1, 2, 4, 8, 32, 4096, 16384, 1 << 18


def watch_parent(fd: int) -> None:
    """End this process (PID 1 of the sandbox: everything in it dies too) when the grading process closes the
    other end of ``fd``, or dies."""

    def wait() -> None:
        os.read(fd, 1)
        os._exit(137)

    threading.Thread(target=wait, daemon=True).start()


def unshare_self() -> None:
    """os-unshare: new namespaces from here (a user namespace when not root), then fork: the child is PID 1 of
    the new PID namespace and goes on; this process waits for it and exits with its status."""
    flags = 0x00020000 | 0x04000000 | 0x08000000 | 0x20000000 | 0x40000000  # NEWNS NEWUTS NEWIPC NEWPID NEWNET
    uid, gid = os.geteuid(), os.getegid()
    if uid != 0:
        flags |= 0x10000000  # CLONE_NEWUSER
    if hasattr(os, "unshare"):
        os.unshare(flags)
    else:
        _check(_libc().unshare(flags), "unshare")
    if uid != 0:
        for name, text in (("setgroups", "deny"), ("uid_map", f"0 {uid} 1"), ("gid_map", f"0 {gid} 1")):
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)
    pid = os.fork()
    if pid == 0:
        _die_with_parent()
        return
    _, status = os.waitpid(pid, 0)
    os._exit(os.waitstatus_to_exitcode(status) & 0xFF)


def setup_mounts(rebind: list[str], tmp_bytes: int, host_mnt: str) -> None:
    """unshare / os-unshare: make everything read-only, then new /proc and /dev, hidden and private tmpfs, and
    the interpreter's directories bound back (opened before they are covered)."""
    if os.readlink("/proc/self/ns/mnt") == host_mnt:
        raise RuntimeError("not in a new mount namespace: refusing to touch the host's mounts")
    sources = {path: os.open(path, os.O_PATH) for path in rebind}
    devices = {name: os.open(f"/dev/{name}", os.O_PATH) for name in ("null", "zero", "full", "random", "urandom")}
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    readonly_recursive("/")
    _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    _mount("tmpfs", "/dev", "tmpfs", MS_NOSUID | MS_NOEXEC, "mode=755,size=1m")
    for name, fd in devices.items():
        open(f"/dev/{name}", "w").close()
        _mount(f"/proc/self/fd/{fd}", f"/dev/{name}", None, MS_BIND)
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
                         ("stderr", "/proc/self/fd/2")):
        os.symlink(target, f"/dev/{name}")
    os.mkdir("/dev/shm")
    hidden = [p for p in HIDDEN if os.path.isdir(p)]
    for path in hidden:
        _mount("tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV, "mode=755,size=1m")
    for path in ["/dev/shm"] + [p for p in PRIVATE if p != "/dev/shm" and os.path.isdir(p)]:
        _mount("tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV, f"mode=1777,size={tmp_bytes}")
    for path, fd in sources.items():
        if os.path.isdir(f"/proc/self/fd/{fd}"):
            os.makedirs(path, exist_ok=True)
        else:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            open(path, "a").close()
        _mount(f"/proc/self/fd/{fd}", path, None, MS_BIND | MS_REC)
        _mount(None, path, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID)
    for path in hidden + ["/dev"]:
        _mount(None, path, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | (MS_NODEV if path != "/dev" else 0))
    for fd in list(sources.values()) + list(devices.values()):
        os.close(fd)


def readonly_recursive(path: str) -> None:
    """Every mount under ``path`` read-only and nosuid: mount_setattr(2) with AT_RECURSIVE (Linux 5.12+)."""
    import ctypes

    class MountAttr(ctypes.Structure):
        _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                    ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]

    attr = MountAttr(attr_set=0x1 | 0x2)  # MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID
    libc = _libc()
    libc.syscall.restype = ctypes.c_long
    ret = libc.syscall(442, -100, path.encode(), 0x8000, ctypes.byref(attr), ctypes.sizeof(attr))
    _check(0 if ret == 0 else -1, "mount_setattr (read-only root; needs Linux 5.12+)")


def drop_privileges(drop_to: Optional[int]) -> None:
    """Root: to ``drop_to`` (uid and gid, no groups), which clears every capability. In a user namespace (not
    root outside): all capabilities dropped. Both: no_new_privs, so no setuid binary gives them back."""
    for cap in range(int(_read("/proc/sys/kernel/cap_last_cap")) + 1):
        _prctl(24, cap)  # PR_CAPBSET_DROP (needs CAP_SETPCAP; bwrap's own bounding set is what it is)
    _libc().prctl(47, 4, 0, 0, 0)  # PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL
    if drop_to is not None and os.geteuid() == 0:
        os.setgroups([])
        os.setresgid(drop_to, drop_to, drop_to)
        os.setresuid(drop_to, drop_to, drop_to)
    _clear_capabilities()
    _check(_prctl(38, 1), "PR_SET_NO_NEW_PRIVS")
    _die_with_parent()  # a uid change clears the parent-death signal


def _clear_capabilities() -> None:
    import ctypes

    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]

    _check(_libc().capset(ctypes.byref(Header(0x20080522, 0)), (Data * 2)()), "capset")


def set_limits(limits: dict, cpu_s: int, nproc: int) -> None:
    """The address space allows ``memory_bytes`` beyond what this process already holds (the task's expected
    outputs reach 2 GB on a few MBPP+ tasks); evalplus's guard then caps the program itself at 4 GiB."""
    import resource

    held = int(_read("/proc/self/statm").split()[0]) * os.sysconf("SC_PAGE_SIZE")
    for name, value in (("RLIMIT_CPU", cpu_s), ("RLIMIT_AS", held + limits["memory_bytes"]),
                        ("RLIMIT_FSIZE", limits["file_bytes"]), ("RLIMIT_NOFILE", limits["open_files"]),
                        ("RLIMIT_NPROC", nproc), ("RLIMIT_CORE", 0)):
        resource.setrlimit(getattr(resource, name), (value, value))


def shared_namespaces(host_ns: dict[str, str]) -> list[str]:
    return [f"{ns} namespace not new" for ns, link in host_ns.items() if os.readlink(f"/proc/self/ns/{ns}") == link]


def verify(config: dict) -> list[str]:
    """What is wrong with this sandbox (empty: all layers in place)."""
    import resource

    problems = shared_namespaces(config["host_ns"])
    status = dict(line.split(":", 1) for line in _read("/proc/self/status").splitlines() if ":" in line)
    for field in ("CapEff", "CapPrm", "CapAmb"):
        if int(status[field].strip(), 16):
            problems.append(f"{field} not empty")
    if status["NoNewPrivs"].strip() != "1":
        problems.append("no_new_privs not set")
    if config["drop_to"] is not None and 0 in os.getresuid() + os.getresgid():
        problems.append("still root")
    if not os.statvfs("/").f_flag & os.ST_RDONLY or not os.statvfs(sys.prefix).f_flag & os.ST_RDONLY:
        problems.append("the filesystem is writable")
    if os.statvfs("/tmp").f_flag & os.ST_RDONLY:
        problems.append("/tmp is not writable")
    interfaces = [line.split(":")[0].strip() for line in _read("/proc/net/dev").splitlines()[2:]]
    if interfaces != ["lo"]:
        problems.append(f"network interfaces {interfaces}")
    if resource.getrlimit(resource.RLIMIT_AS)[1] == resource.RLIM_INFINITY:
        problems.append("no address-space limit")
    return problems


def run_inside(task: dict, result_fd: int) -> dict:
    """evalplus's check (its guard innermost) of both splits; a harness failure is reported as an error."""
    from evalplus.eval import untrusted_check

    os.write(result_fd, b"READY\n")
    try:
        return {split: untrusted_check(task["dataset"], task["solution"], task["inputs"][split], task["entry_point"],
                                       task["expected"][split], task["atol"], task["ref_time"][split],
                                       fast_check=True)[0]
                for split in ("base", "plus")}
    except Exception as err:  # raised by evalplus's side (the program runs in its child process)
        return {"error": f"grader inside the sandbox raised {type(err).__name__}: {err}"}


def main(argv: list[str]) -> int:
    """Inside the sandbox: set up, verify, run; stdout carries READY and one JSON line, nothing else."""
    config = json.loads(argv[0])
    _die_with_parent()
    task = pickle.loads(sys.stdin.buffer.read())  # from the grading process (trusted); nothing is unpickled outside
    try:
        if config["mechanism"] == "os-unshare":
            unshare_self()
        watch_parent(config["watch_fd"])
        if shared_namespaces(config["host_ns"]):  # nothing is set up outside the new namespaces
            raise RuntimeError("; ".join(shared_namespaces(config["host_ns"])))
        if config["mechanism"] in ("unshare", "os-unshare"):
            setup_mounts(config["rebind"], config["limits"]["tmp_bytes"], config["host_ns"]["mnt"])
        os.chdir("/tmp")
        drop_privileges(config["drop_to"])
        set_limits(config["limits"], config["cpu_s"], config["nproc"])
        problems = verify(config)
        import evalplus.eval  # noqa: F401  (as the sandbox's uid: the interpreter must be readable by it)
    except Exception as err:
        print(f"{config['mechanism']}: {type(err).__name__}: {err}", file=sys.stderr)
        return 3
    if problems:
        print(f"{config['mechanism']}: {'; '.join(problems)}", file=sys.stderr)
        return 3
    result_fd = os.dup(1)
    devnull = os.open("/dev/null", os.O_RDWR)
    for fd in (0, 1, 2):  # the program's prints go nowhere (evalplus swallows them too)
        os.dup2(devnull, fd)
    result = run_inside(task, result_fd)
    os.write(result_fd, json.dumps(result).encode() + b"\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
