"""`consa serve`: everything one machine needs in one command.

serve() migrates the database, starts one real Celery worker as a child process (solo pool, queue
from CONSA_QUEUE), keeps it alive (a worker that dies is started again), and serves the API with
uvicorn until stopped. The worker never outlives it: stopped, it stops its worker (SIGTERM: the job
is handed back), and killed (SIGKILL, OOM), its worker gets SIGTERM from the kernel (PR_SET_PDEATHSIG,
Linux) or notices the parent gone (worker/tasks.py), hands its job back, and exits; a restarted
`consa serve` runs the job again from where it stopped. The API's lifespan runs the reconciler (service/reconciler.py), which settles
the job a dead worker left behind. `consa serve` reaches this module through the `consa.commands`
entry point (pyproject.toml), so the library never imports the service.
"""

import logging
import os
import signal
import subprocess
import sys
import threading

from service.migrate import upgrade
from service.settings import Settings, get_settings

log = logging.getLogger("consa.service")

WORKER_NAME = "consa@%h"
PARENT_PID_ENV = "CONSA_SERVE_PID"  # the worker's parent; it stops itself when that process is gone
STOP_GRACE_S = 10.0  # how long a stopping worker may take to hand its job back before it is killed
RESTART_BACKOFF_S = (1, 2, 5, 10, 30)  # a worker that keeps dying is restarted less and less often


def prepare(settings: Settings) -> None:
    """Create the var/artifact folders and create or migrate the database (safe to repeat)."""
    settings.ensure_dirs()
    upgrade(settings.database_url)


def worker_command(settings: Settings, hostname: str = WORKER_NAME) -> list[str]:
    return [sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker", "--pool", "solo",
            "--concurrency", "1", "--prefetch-multiplier", "1", "-Q", settings.queue, "-n", hostname,
            "--loglevel", "INFO", "--without-gossip", "--without-mingle", "--without-heartbeat"]


class WorkerSupervisor:
    """One worker child process, restarted whenever it exits until stop() is called."""

    def __init__(self, command: list[str]):
        self.command = command
        self.proc: subprocess.Popen | None = None
        self.restarts = 0
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="worker-supervisor", daemon=True)

    def start(self) -> "WorkerSupervisor":
        self._spawn()
        self._thread.start()
        return self

    def _spawn(self) -> None:
        # The worker inherits the environment, so it reads the same CONSA_* settings as this process.
        env = os.environ.copy() | {PARENT_PID_ENV: str(os.getpid())}
        self.proc = subprocess.Popen(self.command, env=env, preexec_fn=die_with_parent(os.getpid()))
        log.info("worker pid %d started", self.proc.pid)

    def _watch(self) -> None:
        failures = 0
        while not self._stopping.is_set():
            code = self.proc.wait()
            if self._stopping.is_set():
                return
            delay = RESTART_BACKOFF_S[min(failures, len(RESTART_BACKOFF_S) - 1)]
            log.error("worker pid %d exited with %s; starting a new one in %ds", self.proc.pid, code, delay)
            if self._stopping.wait(delay):
                return
            failures += 1
            self.restarts += 1
            self._spawn()

    def stop(self, grace_s: float = STOP_GRACE_S) -> None:
        # SIGTERM is Celery's warm shutdown, which would wait for a running job to finish (hours).
        # Give it a moment, then stop it; the reconciler settles the job it held.
        self._stopping.set()
        worker = self.proc
        if worker is None or worker.poll() is not None:
            return
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(grace_s)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()


def die_with_parent(parent: int):
    """A preexec_fn: the child gets SIGTERM when this process dies, however it dies (Linux's
    PR_SET_PDEATHSIG; elsewhere None, and the worker's parent watch does it). libc is resolved here,
    before the fork: the child only makes the call."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    PR_SET_PDEATHSIG = 1

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != parent:  # the parent died before the call: no signal will come
            os.kill(os.getpid(), signal.SIGTERM)

    return preexec


def serve(host: str = "127.0.0.1", port: int = 8000) -> None:
    """Migrate, start a supervised Celery worker process, and serve the API until SIGINT/SIGTERM."""
    import uvicorn

    from service.main import create_app

    settings = get_settings()
    prepare(settings)
    supervisor = WorkerSupervisor(worker_command(settings)).start()
    log.info("worker on queue %s; API on http://%s:%d", settings.queue, host, port)
    # uvicorn re-raises the signal it caught after its shutdown; with the default SIGTERM action that
    # kills this process before `finally` stops the worker, so make SIGTERM an exception here.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        uvicorn.run(create_app(settings), host=host, port=port, log_level="info")
    finally:
        supervisor.stop()


def serve_command(args) -> int:
    """The `consa serve` entry point (group `consa.commands`)."""
    serve(args.host, args.port)
    return 0
