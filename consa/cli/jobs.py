"""`consa jobs ...`: drive a consa server from the shell, for people who do not want curl.

Exit codes: 0 done; 1 the job waited on failed or was cancelled; 2 bad usage (no key, bad flag);
3 the server refused the request (a problem+json error); 4 the server could not be reached;
130 interrupted.
"""

import argparse
import json
import sys
import time
import uuid

from consa.cli.client import RETRY_STATUS, TERMINAL, ApiError, Client, ConnectionFailed
from consa.cli.settings_args import add_setting_args
from consa.core.config import RunOptions, SearchConfig

EXIT_JOB_FAILED, EXIT_USAGE, EXIT_API, EXIT_UNREACHABLE, EXIT_INTERRUPTED = 1, 2, 3, 4, 130


def add_jobs_commands(subparsers) -> argparse.ArgumentParser:
    """Add `jobs` with its subcommands to an argparse subparsers object; run them with `run(args)`."""
    # --url/--key are accepted after any subcommand, where people type them.
    conn = argparse.ArgumentParser(add_help=False)
    conn.add_argument("--url", default=None, help="server URL (default: $CONSA_URL, else http://127.0.0.1:8000)")
    conn.add_argument("--key", default=None, help="API key (default: $CONSA_API_KEY)")
    conn.add_argument("--json", action="store_true", help="print the server's JSON instead of a summary")
    conn.add_argument("--interval", type=float, default=2.0, help="seconds between polls (--wait, --follow)")
    conn.add_argument("--patience", type=float, default=3600.0,
                      help="seconds to keep retrying while the server is unreachable (a restart): --wait, download")

    jobs = subparsers.add_parser("jobs", help="submit and follow allocation jobs on a consa server")
    jobs.set_defaults(func=run)
    sub = jobs.add_subparsers(dest="jobs_command", required=True)

    p = sub.add_parser("submit", parents=[conn], help="submit a job (202 + the job)")
    # One flag per search setting, as `consa search` has them (consa.core.config), but with no defaults:
    # what is not given is left to the server's defaults.
    add_setting_args(p, SearchConfig, server_defaults=True)
    add_setting_args(p, RunOptions, server_defaults=True)
    p.add_argument("--metadata", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--idempotency-key", default=None,
                   help="resubmitting with the same key returns the same job (default: a fresh one per "
                        "invocation, so retries after a dropped connection never submit twice)")
    p.add_argument("--wait", action="store_true", help="show progress until the job ends; exit 1 if it did not succeed")
    p.set_defaults(jobs_func=cmd_submit)

    p = sub.add_parser("list", parents=[conn], help="list your jobs, newest first")
    p.add_argument("--status", default=None)
    p.add_argument("--model", default=None)
    p.add_argument("--limit", type=int, default=20)
    p.add_argument("--after", default=None, help="job id: list the jobs older than it (the next page)")
    p.set_defaults(jobs_func=cmd_list)

    for name, func, help in (("get", cmd_get, "show one job"),
                             ("cancel", cmd_cancel, "cancel a job (a running one stops at its next step)"),
                             ("delete", cmd_delete, "delete a finished job and its artifacts")):
        p = sub.add_parser(name, parents=[conn], help=help)
        p.add_argument("job")
        p.set_defaults(jobs_func=func)

    p = sub.add_parser("logs", parents=[conn], help="print a job's events")
    p.add_argument("job")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing until the job ends")
    p.set_defaults(jobs_func=cmd_logs)

    p = sub.add_parser("download", parents=[conn], help="download one artifact, or all of them")
    p.add_argument("job")
    p.add_argument("name", nargs="?", default=None, help="artifact name (default: every artifact)")
    p.add_argument("-o", "--output", default=None,
                   help="file or directory to write to (default: ./NAME, or ./JOB/ for all artifacts)")
    p.set_defaults(jobs_func=cmd_download)
    return jobs


def run(args) -> int:
    """Run the parsed `consa jobs ...` command; turn client errors into messages and exit codes."""
    client = Client(args.url, args.key)
    if not client.key:
        print("consa jobs: error: no API key; pass --key or set CONSA_API_KEY "
              "(an admin creates one with `consa keys create NAME`)", file=sys.stderr)
        return EXIT_USAGE
    try:
        return args.jobs_func(client, args)
    except ApiError as e:
        print(f"consa jobs {args.jobs_command}: error: {_describe(e)}", file=sys.stderr)
        return EXIT_API
    except ConnectionFailed as e:
        print(f"consa jobs {args.jobs_command}: error: {e} (is the server running? check --url / CONSA_URL)",
              file=sys.stderr)
        return EXIT_UNREACHABLE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


def _describe(e: ApiError) -> str:
    msg = f"{e.title} ({e.status})"
    if e.detail:
        msg += f": {e.detail}"
    if e.status == 401:
        msg += " — check the API key"
    return msg


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=2))


def phase_of(progress: dict) -> tuple[str, int | None, int | None]:
    """(phase, done, total) of a job's progress: "search" (steps), "evaluation" (allocations scored) or
    "export" (stages); a server that reports no phase is searching."""
    phase = progress.get("phase") or "search"
    if phase == "search":
        return phase, progress.get("phase_done", progress.get("step")), progress.get("phase_total", progress.get("total_steps"))
    return phase, progress.get("phase_done"), progress.get("phase_total")


def _job_line(job: dict) -> str:
    p = job.get("progress") or {}
    parts = [job["id"], job["status"], job["model"]]
    if p:
        parts.append(f"step {p.get('step')}/{p.get('total_steps')}")
        phase, done, total = phase_of(p)
        if phase != "search":
            parts.append(f"{phase} {done}/{total}")
        if p.get("loss") is not None:
            parts.append(f"loss {p['loss']:.4f}")
        if p.get("sparsity") is not None:
            parts.append(f"sparsity {p['sparsity']:.3f}")
    if job.get("error"):
        parts.append(f"error {job['error']['code']}: {job['error']['message']}")
    return "  ".join(parts)


def _print_estimate(client: Client, params: dict) -> None:
    """The server's rough time for the job, on stderr (stdout stays the job); nothing when it has none."""
    try:
        guess = client.estimate(params)
    except Exception:  # an older server, or none for this model: the submit itself went through
        return
    if guess.get("total_s") is not None:
        evaluation = f" + evaluation {guess['evaluation_s']:.0f} s" if guess.get("evaluation_units") else ""
        print(f"estimate: about {_duration(guess['total_s'])} on {guess['device']} (search {guess['search_steps']} "
              f"steps x {guess['step_s']:.3g} s{evaluation}; rough: model loading and export not counted)",
              file=sys.stderr)


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


# -- commands ---------------------------------------------------------------------------------
def cmd_submit(client: Client, args) -> int:
    from consa.core.config import setting_names

    # Search settings and run options alike: what the flags left out (None) the server decides.
    names = setting_names(SearchConfig) + setting_names(RunOptions)
    params = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    if args.metadata:
        bad = [m for m in args.metadata if "=" not in m]
        if bad:
            print(f"consa jobs submit: error: --metadata wants KEY=VALUE, got {bad[0]!r}", file=sys.stderr)
            return EXIT_USAGE
        params["metadata"] = dict(m.split("=", 1) for m in args.metadata)

    job = client.submit(params, idempotency_key=args.idempotency_key or str(uuid.uuid4()))
    _print_estimate(client, params)
    if not args.wait:
        _print_json(job) if args.json else print(_job_line(job))
        return 0
    print(f"submitted {job['id']}", file=sys.stderr)
    try:
        job = wait_with_progress(client, job["id"], args.interval, patience_s=args.patience)
    except KeyboardInterrupt:
        print(f"\nstopped waiting; the job goes on (consa jobs cancel {job['id']} stops it)", file=sys.stderr)
        return EXIT_INTERRUPTED
    _print_json(job) if args.json else print(_job_line(job))
    return 0 if job["status"] == "succeeded" else EXIT_JOB_FAILED


def patiently(call, patience_s: float, what: str, pause_s: float = 2.0):
    """call() until the server answers it. A server that goes away (a restart, a deploy) is waited for
    up to `patience_s` seconds, since a job lives in the server's database and goes on; a refusal
    (4xx) passes through at once."""
    down_since = None
    while True:
        try:
            result = call()
        except (ConnectionFailed, ApiError) as e:
            if isinstance(e, ApiError) and (e.status not in RETRY_STATUS or e.code == "checksum_mismatch"):
                raise  # refused, or the server is up and sent other bytes than it listed
            now = time.monotonic()
            if down_since is None:
                down_since = now
                print(f"\n{what}: server unavailable ({e}); still waiting", file=sys.stderr)
            if now - down_since > patience_s:
                raise
            time.sleep(min(max(pause_s, 1.0) * 2, 30.0))
            continue
        if down_since is not None:
            print(f"{what}: server back", file=sys.stderr)
        return result


def wait_with_progress(client: Client, job_id: str, poll_s: float = 2.0, patience_s: float = 3600.0) -> dict:
    """Poll until the job ends, drawing a tqdm bar per phase (search steps with loss and sparsity,
    evaluation, export) on stderr, through server restarts of up to `patience_s` seconds."""
    from tqdm import tqdm  # comes with transformers; imported here so `consa jobs list` starts fast

    bars = PhaseBars(job_id, tqdm)
    status = None
    try:
        while True:
            job = patiently(lambda: client.get(job_id), patience_s, job_id, poll_s)
            if not bars.show(job) and job["status"] != status:
                print(f"{job_id}: {job['status']}", file=sys.stderr)
            status = job["status"]
            if status in TERMINAL:
                return job
            time.sleep(poll_s)
    finally:
        bars.close()


class PhaseBars:
    """One bar per phase of the job, in order: the search (steps), the evaluation (allocations scored),
    the export (stages). A phase's bar is filled and closed when the next one starts, so a phase that
    ended between two polls still shows as done."""

    UNITS = {"search": "step", "evaluation": "allocation", "export": "stage"}

    def __init__(self, job_id: str, tqdm):
        self.job_id, self.tqdm = job_id, tqdm
        self.phase, self.bar = None, None

    def show(self, job: dict) -> bool:
        """Draw the job's progress; False while it has none to draw (queued, or no total yet)."""
        p = job.get("progress") or {}
        phase, done, total = phase_of(p)
        if not total:
            return self.bar is not None
        if phase != self.phase:
            if self.phase is None and phase != "search" and p.get("total_steps"):
                self._open("search", p["total_steps"])  # the whole search ran between two polls
            self._open(phase, total)
        self.bar.n = done or 0
        post = {"status": job["status"]}
        if p.get("loss") is not None:
            post["loss"] = f"{p['loss']:.4f}"
        if p.get("sparsity") is not None:
            post["sparsity"] = f"{p['sparsity']:.3f}"
        self.bar.set_postfix(post)
        return True

    def _open(self, phase: str, total: int) -> None:
        if self.bar is not None:
            self.bar.n = self.bar.total  # a later phase began: this one is done
            self.close()
        self.phase = phase
        self.bar = self.tqdm(total=total, desc=f"{self.job_id} {phase}", unit=self.UNITS.get(phase, "step"),
                             file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.refresh()
            self.bar.close()
            self.bar = None


def cmd_list(client: Client, args) -> int:
    page = client.list_jobs(status=args.status, model=args.model, limit=args.limit, after=args.after)
    if args.json:
        _print_json(page)
        return 0
    for job in page["data"]:
        print(_job_line(job))
    if page.get("has_more") and page["data"]:
        print(f"(more: consa jobs list --after {page['data'][-1]['id']})", file=sys.stderr)
    return 0


def _one_job_command(call, summary=_job_line):
    """`consa jobs get|cancel|delete JOB`: one call on one job, then its JSON or a one-line summary."""
    def command(client: Client, args) -> int:
        answer = call(client, args.job)
        _print_json(answer) if args.json else print(summary(answer))
        return 0

    return command


cmd_get = _one_job_command(Client.get)
cmd_cancel = _one_job_command(Client.cancel)
cmd_delete = _one_job_command(Client.delete, summary=lambda result: f"{result['id']}  deleted")


def cmd_logs(client: Client, args) -> int:
    for event in client.iter_events(args.job, follow=args.follow, poll_s=args.interval):
        if args.json:
            print(json.dumps(event), flush=True)
        else:
            print(f"{event['created_at']}  {event['type']:<8}  {event['message']}", flush=True)
    return 0


def cmd_download(client: Client, args) -> int:
    from pathlib import Path

    listed = {a["name"]: a for a in patiently(lambda: client.artifacts(args.job), args.patience, args.job)}
    if args.name is not None:
        if args.name not in listed:
            names = ", ".join(listed) or "none yet"
            print(f"consa jobs download: error: job {args.job} has no artifact {args.name!r} (it has: {names})",
                  file=sys.stderr)
            return EXIT_API
        wanted, dest = [listed[args.name]], Path(args.output or args.name)
    else:
        if not listed:
            print(f"consa jobs download: error: job {args.job} has no artifacts yet", file=sys.stderr)
            return EXIT_API
        wanted, dest = list(listed.values()), Path(args.output or args.job)
        dest.mkdir(parents=True, exist_ok=True)  # a directory even if it does not exist yet
    for a in wanted:
        # A part file stays between tries, so each try after a restart asks only for the rest (Range).
        path = patiently(lambda: client.download(args.job, a["name"], dest, sha256=a.get("sha256"), size=a.get("size"),
                                                 progress=not args.json and sys.stderr.isatty()),
                         args.patience, f"{args.job}/{a['name']}", args.interval)
        print(f"{path}  {a['size']} bytes  sha256 {a['sha256']}")
    return 0


def main(argv=None) -> int:
    """Standalone entry (`python -m consa.cli.jobs ...`), the same as `consa jobs ...`."""
    parser = argparse.ArgumentParser(prog="consa")
    add_jobs_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
