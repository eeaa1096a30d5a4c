"""A real S3-compatible server for the tests: OpenStack Swift (Debian's `swift-proxy`, `swift-account`,
`swift-container`, `swift-object`) as a single-node "all in one" on directories of a temporary folder,
with its s3api middleware (the S3 protocol, SigV2/SigV4, multipart uploads, presigned URLs) in front
of tempauth. Four server processes on free loopback ports, started and stopped by the caller:

    with SwiftS3(tmp_path) as s3:        # or s3 = SwiftS3(tmp_path).start() ... s3.stop()
        s3.endpoint, s3.access_key, s3.secret_key, s3.region

`SwiftS3.unavailable()` says why it cannot start here (then the tests skip with that reason), e.g.
"OpenStack Swift is not installed: apt-get install swift-proxy swift-account swift-container swift-object".
Swift runs under the system's Python (/usr/bin/python3, where Debian installs it), not the test's.
"""

import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

SERVERS = ("account", "container", "object")
SWIFT_BINS = {name: f"/usr/bin/swift-{name}-server" for name in (*SERVERS, "proxy")}
RING_BUILDER = "/usr/bin/swift-ring-builder"
INSTALL = "apt-get install swift swift-proxy swift-account swift-container swift-object"
ACCESS_KEY, SECRET_KEY = "test:tester", "testing"  # tempauth's user "tester" of account "test"

_PROXY_PIPELINE = ("catch_errors gatekeeper healthcheck proxy-logging cache listing_formats bulk s3api tempauth "
                   "copy slo dlo proxy-logging proxy-server")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SwiftS3:
    region = "us-east-1"

    def __init__(self, root: Path, *, log_level: str = "WARNING"):
        self.root = Path(root)
        self.etc, self.devices, self.logs = self.root / "etc", self.root / "srv", self.root / "log"
        self.log_level = log_level
        self.ports = {name: free_port() for name in (*SERVERS, "proxy")}
        self.procs: dict[str, subprocess.Popen] = {}
        self.access_key, self.secret_key = ACCESS_KEY, SECRET_KEY

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['proxy']}"

    @staticmethod
    def unavailable() -> str | None:
        """Why the server cannot run here, or None."""
        missing = [p for p in (*SWIFT_BINS.values(), RING_BUILDER) if not os.path.exists(p)]
        if missing:
            return f"OpenStack Swift is not installed ({', '.join(missing)} missing): {INSTALL}"
        return None

    # -- configuration -------------------------------------------------------------------------
    def _common(self, name: str) -> str:
        return (f"[DEFAULT]\nbind_ip = 127.0.0.1\nbind_port = {self.ports[name]}\nswift_dir = {self.etc}\n"
                f"devices = {self.devices}\nmount_check = false\nworkers = 0\nlog_level = {self.log_level}\n"
                f"log_name = swift-{name}\n")

    def _write_config(self) -> None:
        self.etc.mkdir(parents=True, exist_ok=True)
        (self.devices / "d1").mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(parents=True, exist_ok=True)
        (self.etc / "swift.conf").write_text(
            "[swift-hash]\nswift_hash_path_suffix = consa-tests\nswift_hash_path_prefix = consa\n\n"
            "[storage-policy:0]\nname = gold\ndefault = yes\n")
        for name in SERVERS:
            (self.etc / f"{name}-server.conf").write_text(
                self._common(name) + f"\n[pipeline:main]\npipeline = {name}-server\n\n"
                f"[app:{name}-server]\nuse = egg:swift#{name}\n"
                + ("\n[object-updater]\n[object-auditor]\n" if name == "object" else "")
                + ("\n[container-updater]\n[container-auditor]\n[container-sync]\n" if name == "container" else "")
                + ("\n[account-auditor]\n[account-reaper]\n" if name == "account" else ""))
        (self.etc / "proxy-server.conf").write_text(
            self._common("proxy") + f"\n[pipeline:main]\npipeline = {_PROXY_PIPELINE}\n\n"
            "[app:proxy-server]\nuse = egg:swift#proxy\naccount_autocreate = true\nallow_account_management = true\n\n"
            "[filter:s3api]\nuse = egg:swift#s3api\nlocation = us-east-1\ns3_acl = false\n"
            "allow_multipart_uploads = true\nmax_upload_part_num = 10000\n\n"
            f"[filter:tempauth]\nuse = egg:swift#tempauth\nuser_test_tester = {SECRET_KEY} .admin\n\n"
            "[filter:catch_errors]\nuse = egg:swift#catch_errors\n\n"
            "[filter:gatekeeper]\nuse = egg:swift#gatekeeper\n\n"
            "[filter:healthcheck]\nuse = egg:swift#healthcheck\n\n"
            "[filter:proxy-logging]\nuse = egg:swift#proxy_logging\n\n"
            "[filter:cache]\nuse = egg:swift#memcache\n\n"
            "[filter:listing_formats]\nuse = egg:swift#listing_formats\n\n"
            "[filter:bulk]\nuse = egg:swift#bulk\n\n"
            "[filter:copy]\nuse = egg:swift#copy\n\n"
            "[filter:slo]\nuse = egg:swift#slo\n\n"
            "[filter:dlo]\nuse = egg:swift#dlo\n")
        for name in SERVERS:
            builder = str(self.etc / f"{name}.builder")
            for args in (["create", "6", "1", "1"],
                         ["add", f"r1z1-127.0.0.1:{self.ports[name]}/d1", "1"],
                         ["rebalance"]):
                out = subprocess.run([RING_BUILDER, builder, *args], capture_output=True, text=True, timeout=60)
                # rebalance exits 1 with a warning about a single device/zone: the ring is still written
                if out.returncode not in (0, 1):
                    raise RuntimeError(f"swift-ring-builder {' '.join(args)}: {out.stdout}{out.stderr}")
            if not (self.etc / f"{name}.ring.gz").exists():
                raise RuntimeError(f"swift-ring-builder wrote no {name}.ring.gz")

    # -- processes -----------------------------------------------------------------------------
    def start(self, timeout_s: float = 60.0) -> "SwiftS3":
        self._write_config()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
        env["PATH"] = "/usr/bin:/bin"
        for name in (*SERVERS, "proxy"):
            log = open(self.logs / f"{name}.log", "ab")
            self.procs[name] = subprocess.Popen(
                ["/usr/bin/python3", SWIFT_BINS[name], str(self.etc / f"{name}-server.conf")],
                stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
            log.close()
        deadline = time.monotonic() + timeout_s
        while True:
            dead = {n: p.returncode for n, p in self.procs.items() if p.poll() is not None}
            if dead:
                self.stop()
                raise RuntimeError(f"swift server(s) exited at start {dead}: {self.log_tail()}")
            try:
                if all(self._healthy(port) for port in self.ports.values()):
                    return self
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"swift did not answer within {timeout_s}s: {self.log_tail()}")
            time.sleep(0.2)

    @staticmethod
    def _healthy(port: int) -> bool:
        url = f"http://127.0.0.1:{port}/healthcheck" if port else ""
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                return resp.status == 200
        except urllib.error.HTTPError as e:  # the storage servers answer "/healthcheck" with 400: but they answer
            return e.code in (400, 404)

    def log_tail(self, chars: int = 3000) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-chars:]}" for p in sorted(self.logs.glob("*.log")))

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for proc in self.procs.values():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        self.procs.clear()

    def __enter__(self) -> "SwiftS3":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def env(self, bucket: str) -> dict[str, str]:
        """The settings a consa process needs to use this server as its artifact store."""
        return {"CONSA_ARTIFACT_STORE": "s3", "CONSA_S3_BUCKET": bucket, "CONSA_S3_ENDPOINT_URL": self.endpoint,
                "CONSA_S3_REGION": self.region, "AWS_ACCESS_KEY_ID": self.access_key,
                "AWS_SECRET_ACCESS_KEY": self.secret_key}


def remove(root: Path) -> None:
    shutil.rmtree(root, ignore_errors=True)
