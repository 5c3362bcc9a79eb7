"""Hostile completions through the real code-grading path (``graders.grade("code", ...)``), checked from outside.

Each attack runs on bwrap and on unshare (on os.unshare too with the slow tests) where the mechanism works here
(where not, it is skipped with the reason), and a few also unsandboxed (evalplus's guard only) to show that the
checks see an attack that gets through. Targets live in a directory the test owns under the repository
(visible, read-only, inside the sandbox).
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import textwrap
import threading
import time
import uuid
from pathlib import Path

import pytest

from megatron_sft.evaluation import sandbox
from megatron_sft.evaluation.graders import grade, is_grader_failure

pytest.importorskip("evalplus")

REPO = Path(__file__).resolve().parents[1]
PROBLEM = {"task_id": "Sandbox/0", "entry_point": "f", "atol": 0, "base_input": [[1]], "plus_input": []}
EXPECTED = {"base": [1], "plus": [], "base_time": [0.001], "plus_time": []}


ALL = [pytest.param(m, id=m) for m in sandbox.MECHANISMS]
# the attacks run on the last-resort mechanism (os.unshare: the same inside setup as unshare's, namespaces made
# by Python) with the slow tests only, to keep the default run short; bwrap and unshare get them all
HOSTILE = [pytest.param(m, id=m, marks=[pytest.mark.slow] if m == "os-unshare" else []) for m in sandbox.MECHANISMS]


@pytest.fixture
def mechanism(request) -> str:
    why = sandbox.probe(request.param)
    if why is not None:
        pytest.skip(f"{request.param} does not work here: {why}")
    return request.param


def run(mechanism: str, body: str, **paths: object) -> dict:
    """Grade ``def f(x): <body>; return x`` as a model's answer, through the real grader."""
    code = textwrap.indent(textwrap.dedent(body).format(**{k: repr(str(v)) for k, v in paths.items()}), "    ")
    completion = f"Here it is:\n```python\ndef f(x):\n{code}\n    return x\n```"
    meta = {"dataset": "humaneval", "problem": PROBLEM, "expected": EXPECTED, "sandbox": mechanism}
    return grade("code", completion, "Sandbox/0", meta)


@pytest.fixture
def owned():
    """A directory of the test's, outside /tmp (so the sandbox sees it, read-only), with a file in it."""
    path = Path(tempfile.mkdtemp(prefix=".sandbox-test-", dir=REPO))
    (path / "target.txt").write_text("original")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_a_sandbox_works_here():
    """At least one mechanism must really run (the CI installs bubblewrap; util-linux unshare is a fallback)."""
    assert sandbox.choose_sandbox() in sandbox.MECHANISMS


@pytest.mark.parametrize("mechanism", ALL, indirect=True)
def test_a_right_answer_passes_and_a_wrong_one_fails(mechanism):
    assert run(mechanism, "pass")["outcome"] == "passed"
    assert run(mechanism, "return x + 1")["outcome"] == "failed"


@pytest.mark.parametrize("mechanism", ALL, indirect=True)
def test_inside_it_is_unprivileged_alone_and_offline(mechanism):
    """Seen from inside (a failed assert fails the answer): not root, no capabilities, own PID namespace,
    hidden /root and /run, no network interface but its own loopback, a writable temp dir."""
    body = """
    import os
    assert os.getuid() != 0 and os.geteuid() != 0
    status = dict(l.split(':', 1) for l in open('/proc/self/status').read().splitlines())
    assert int(status['CapEff'], 16) == 0 and status['NoNewPrivs'].strip() == '1'
    assert len([p for p in os.listdir('/proc') if p.isdigit()]) < 10
    assert not os.path.exists('/root/.ssh') and os.listdir('/run') == []
    assert [l.split(':')[0].strip() for l in open('/proc/net/dev').read().splitlines()[2:]] == ['lo']
    import tempfile
    scratch = tempfile.mkdtemp()  # its own temp dir is writable
    open(scratch + '/x', 'w').write('ok')
    assert open(scratch + '/x').read() == 'ok'
    """.replace("open(", "__import__('io').open(")
    assert run(mechanism, body)["outcome"] == "passed"


def _quietly(code: str) -> str:
    """``code`` whose failure (the sandbox refusing it) is swallowed, so that only its effects are checked."""
    return "try:\n" + textwrap.indent(code, "    ") + "\nexcept Exception:\n    pass"


WRITES = {
    "open": "open({target}, 'w').write('pwned')",
    "io.open": "import io\nio.open({target}, 'w').write('pwned')",
    "os.open": "import os\nos.write(os.open({target}, os.O_WRONLY | os.O_TRUNC), b'pwned')",
    "posix": "import posix\nposix.write(posix.open({target}, posix.O_WRONLY | posix.O_TRUNC), b'pwned')",
    "posix-create": "import posix\nposix.write(posix.open({new}, posix.O_WRONLY | posix.O_CREAT), b'pwned')",
}


@pytest.mark.parametrize("how", list(WRITES))
@pytest.mark.parametrize("mechanism", HOSTILE, indirect=True)
def test_writes_outside_the_temp_dir_change_nothing(mechanism, how, owned):
    result = run(mechanism, _quietly(WRITES[how]),
                 target=owned / "target.txt", new=owned / "new.txt")
    assert result["outcome"] == "passed"  # the attempt failed quietly; the answer itself is right
    assert (owned / "target.txt").read_text() == "original" and not (owned / "new.txt").exists()


DELETES = {
    "posix.unlink": "import posix\nposix.unlink({target})",
    "shutil.rmtree": "import importlib, os, shutil\nimportlib.reload(os)\nimportlib.reload(shutil)\n"
                     "shutil.rmtree({folder})",
}


@pytest.mark.parametrize("how", list(DELETES))
@pytest.mark.parametrize("mechanism", HOSTILE, indirect=True)
def test_deletions_delete_nothing(mechanism, how, owned):
    run(mechanism, _quietly(DELETES[how]),
        target=owned / "target.txt", folder=owned)
    assert (owned / "target.txt").read_text() == "original"


SHELLS = {
    "posix.system": "import posix\nposix.system('touch ' + {marker})",
    "os.posix_spawn": "import os\nos.waitpid(os.posix_spawn('/bin/sh', ['sh', '-c', 'touch ' + {marker}], {{}}), 0)",
    "os.execv": "import os\nos.execv('/bin/sh', ['sh', '-c', 'touch ' + {marker}])",
    "ctypes": "import ctypes\nctypes.CDLL(None).system(('touch ' + {marker}).encode())",
}


@pytest.mark.parametrize("how", list(SHELLS))
@pytest.mark.parametrize("mechanism", HOSTILE, indirect=True)
def test_shells_leave_no_marker(mechanism, how, owned, tmp_path):
    for folder in (owned, tmp_path):  # visible read-only, and hidden
        run(mechanism, _quietly(SHELLS[how]),
            marker=folder / "marker")
        assert not (folder / "marker").exists()


def survivors(token: str) -> list[int]:
    """PIDs whose name (prctl PR_SET_NAME) is ``token``."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if Path(f"/proc/{pid}/comm").read_text().strip() == token:
                found.append(int(pid))
        except OSError:
            pass
    return found


FORK_LOOP = """
import ctypes, posix, time
for _ in range(20):
    if posix.fork() == 0:
        posix.setsid()
        ctypes.CDLL(None).prctl(15, {token}.encode(), 0, 0, 0)
        time.sleep(5)
        for m in ({marker}, {hidden}):
            try:
                posix.close(posix.open(m, posix.O_WRONLY | posix.O_CREAT))
            except OSError:
                pass
        posix._exit(0)
"""


@pytest.mark.parametrize("mechanism", HOSTILE, indirect=True)
def test_a_setsid_fork_loop_leaves_nothing_running(mechanism, owned, tmp_path):
    token = f"sbx{uuid.uuid4().hex[:10]}"
    result = run(mechanism, FORK_LOOP, token=token, marker=owned / "marker", hidden=tmp_path / "marker")
    assert result["outcome"] == "passed" and survivors(token) == []
    time.sleep(5.5)  # the children, had they survived, were made before grading returned: 5 s later they write
    assert not (owned / "marker").exists() and not (tmp_path / "marker").exists() and survivors(token) == []


HANG = FORK_LOOP.replace("range(20)", "range(5)").replace("time.sleep(5)", "time.sleep(60)") + "while True:\n    pass\n"


@pytest.mark.parametrize("mechanism", HOSTILE, indirect=True)
def test_a_killed_grading_worker_takes_its_sandbox_along(mechanism, tmp_path):
    """The worker running a sandbox is killed at its deadline (as `eval` does with a hung grader): the program's
    children, seen running before, are gone after."""
    from megatron_sft.evaluation.workers import grade_in_workers

    token = f"sbx{uuid.uuid4().hex[:10]}"
    body = textwrap.indent(textwrap.dedent(HANG).format(token=repr(token), marker="''", hidden="''"), "    ")
    completion = f"```python\ndef f(x):\n{body}\n    return x\n```"
    meta = {"dataset": "humaneval", "problem": PROBLEM, "expected": {**EXPECTED, "base_time": [5.0]},
            "sandbox": mechanism}  # evalplus would stop it after 20 s; the worker is killed after 6
    results: list = []
    grading = threading.Thread(target=lambda: results.extend(
        grade_in_workers(grade, [("code", completion, "Sandbox/0", meta)], 1, 6.0)))
    grading.start()
    deadline = time.monotonic() + 6
    while len(survivors(token)) < 5 and time.monotonic() < deadline:
        time.sleep(0.05)
    seen = len(survivors(token))
    grading.join()
    assert seen == 5 and "timed out" in results[0]["error"]
    deadline = time.monotonic() + 2  # the kernel tears the namespace down right after its PID 1 ends
    while survivors(token) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert survivors(token) == []


class Listener:
    """A TCP listener on 127.0.0.1 that records whatever reaches it."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.server.settimeout(0.2)
        self.port, self.received, self.stop = self.server.getsockname()[1], [], False
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self) -> None:
        while not self.stop:
            try:
                conn, _ = self.server.accept()
            except OSError:
                continue
            with conn:
                conn.settimeout(2)
                self.received.append(conn.recv(4096) or b"(connected)")

    def close(self) -> list[bytes]:
        self.stop = True
        self.thread.join()
        self.server.close()
        return self.received


CONNECT = """
import io, socket
try:
    s = socket.create_connection(('127.0.0.1', {port}), timeout=2)
    s.sendall(io.open('/etc/hostname', 'rb').read() or b'x')
    s.close()
except OSError:
    pass
"""


@pytest.mark.parametrize("mechanism", HOSTILE, indirect=True)
def test_no_connection_reaches_the_host(mechanism):
    listener = Listener()
    result = run(mechanism, CONNECT, port=listener.port)
    assert listener.close() == [] and result["outcome"] == "passed"


RLIMITS = """
import ctypes, sys
sys.modules.pop('resource', None)
import resource
for limit in (resource.RLIMIT_AS, resource.RLIMIT_DATA, resource.RLIMIT_CPU):
    try:
        resource.setrlimit(limit, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    except (ValueError, OSError):
        pass
block = b'x' * (8 << 30)
"""


@pytest.mark.parametrize("mechanism", HOSTILE, indirect=True)
def test_raising_its_limits_then_allocating_is_stopped(mechanism):
    started = time.monotonic()
    result = run(mechanism, RLIMITS)
    assert result["outcome"] in ("failed", "timeout") and time.monotonic() - started < 30
    assert run(mechanism, "pass")["outcome"] == "passed"  # and the host still grades


SIGNALS = """
import signal
signal.signal(signal.SIGALRM, signal.SIG_IGN)
signal.signal(signal.SIGTERM, signal.SIG_IGN)
signal.setitimer(signal.ITIMER_REAL, 0)
while True:
    signal.signal(signal.SIGALRM, signal.SIG_IGN)
"""


@pytest.mark.parametrize("mechanism", HOSTILE, indirect=True)
def test_ignoring_alarm_and_term_is_killed_at_the_time_limit(mechanism):
    started = time.monotonic()
    result = run(mechanism, SIGNALS)
    limit = sandbox.split_timeout(EXPECTED["base_time"])
    assert result["outcome"] == "timeout" and time.monotonic() - started < limit + 8  # the sandbox's own: 26 s


# ---- the checks above can see an attack succeed: the same attacks with evalplus's guard only ----------------------

def test_without_the_sandbox_the_attacks_get_through(owned, tmp_path):
    none = sandbox.UNSANDBOXED
    run(none, _quietly(WRITES["io.open"]),
        target=owned / "target.txt")
    assert (owned / "target.txt").read_text() == "pwned"
    run(none, "import posix\nposix.system('touch ' + {marker})", marker=owned / "marker")
    assert (owned / "marker").exists()
    run(none, _quietly(DELETES["posix.unlink"]),
        target=owned / "target.txt")
    assert not (owned / "target.txt").exists()
    listener = Listener()
    run(none, CONNECT, port=listener.port)
    assert listener.close() != []
    token = f"sbx{uuid.uuid4().hex[:10]}"
    run(none, FORK_LOOP, token=token, marker=tmp_path / "marker", hidden=tmp_path / "marker")
    assert len(survivors(token)) == 20
    for pid in survivors(token):  # the test's own leftovers
        os.kill(pid, 9)


# ---- sandbox errors are reported apart, and nothing runs without a sandbox unless allowed -------------------------

def test_a_broken_sandbox_is_a_sandbox_error_not_a_failure(monkeypatch, owned):
    monkeypatch.setattr(sandbox, "launcher", lambda mechanism, config: ["/bin/false"])
    result = run("bwrap", "import posix\nposix.system('touch ' + {marker})", marker=owned / "marker")
    assert result["outcome"] == sandbox.SANDBOX_ERROR and result["score"] == 0.0
    assert result["error"].startswith("sandbox error") and is_grader_failure(result)


def test_missing_layers_are_caught_before_the_program_runs(monkeypatch, owned):
    """The inside program started with no namespaces at all (bwrap's setup skipped) refuses to run the code."""
    monkeypatch.setattr(sandbox, "launcher", lambda mechanism, config: [])
    result = run("bwrap", "import posix\nposix.system('touch ' + {marker})", marker=owned / "marker")
    assert result["outcome"] == sandbox.SANDBOX_ERROR and "namespace not new" in result["error"]
    assert not (owned / "marker").exists()


def test_no_mechanism_refuses_naming_what_was_tried(monkeypatch):
    from megatron_sft.evaluation.benchmarks import BenchmarkError
    from megatron_sft.evaluation.runner import code_sandbox

    monkeypatch.setattr(sandbox, "probe", lambda mechanism: f"{mechanism} broken here")
    with pytest.raises(sandbox.SandboxUnavailable) as refused:
        sandbox.choose_sandbox()
    message = str(refused.value)
    assert all(f"{m}: {m} broken here" in message for m in sandbox.MECHANISMS)
    assert "apt-get install bubblewrap" in message and "--allow-unsandboxed-code" in message
    with pytest.raises(BenchmarkError, match="code benchmarks refused"):
        code_sandbox("auto", False)
    assert code_sandbox("auto", True) == sandbox.UNSANDBOXED
    with pytest.raises(sandbox.SandboxUnavailable):
        sandbox.choose_sandbox("none")


def test_outcomes_are_counted_apart_and_sandbox_errors_fail_the_run(tmp_path):
    from megatron_sft.evaluation.records import append_records
    from megatron_sft.evaluation.runner import GradingIncomplete, raise_on_grader_failures

    samples = [{"outcome": o, "score": float(o == "passed"), "error": "sandbox error: x" if o == "sandbox_error"
                else None} for o in ("passed", "failed", "timeout", "sandbox_error", "sandbox_error")]
    counts = sandbox.outcome_counts(samples)
    assert counts == {"code_passed": 1, "code_failed": 1, "code_timeout": 1, "sandbox_errors": 2}
    append_records(tmp_path / "humaneval_plus" / "generations.jsonl", [{"id": "a", "samples": samples}])
    results = {"benchmarks": {"humaneval_plus": {"grader_failures": 2, **counts}}}
    with pytest.raises(GradingIncomplete, match="2 sandbox errors"):
        raise_on_grader_failures(results, tmp_path)
