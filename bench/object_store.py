"""Issue 22: a multi-GB file through the s3 artifact store, with the peak memory of each side.

    python bench/object_store.py [--gib 2] [--part-mib 16] [--out bench/results/current/object_store.json]

Starts a real S3-compatible server (OpenStack Swift + s3api, tests/s3_server.py) in a temporary folder,
writes a file of --gib GiB, then, each in a process of its own:
- the worker side: `get_store(settings).put(...)` (multipart, sha256 while streaming), as a worker
  publishes checkpoint.tar; its peak RSS (VmHWM) and the same process's RSS before the upload;
- the API side: uvicorn serving the API over the same bucket (a job row listing the artifact); the file
  is downloaded through it (GET, streamed from the store) and a ranged GET of its last 64 MiB; the API
  process's peak RSS (VmHWM) and its RSS before the downloads.
Prints one JSON object (and writes it to --out).
"""

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from s3_server import SwiftS3, free_port

MiB = 1 << 20

# How each uploading process starts: the store from the environment's settings, and its own memory
# read from the kernel (VmRSS now; VmHWM, the high-water mark, after the upload).
UPLOADER = r"""
import json, sys, time
from pathlib import Path
from service.settings import Settings
from service.store import get_store

def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024

store = get_store(Settings())
before = rss("VmRSS:")
t = time.perf_counter()
"""

WORKER = UPLOADER + r"""
size, sha = store.put(sys.argv[1], "checkpoint.tar", Path(sys.argv[2]))
print(json.dumps({"size": size, "sha256": sha, "seconds": time.perf_counter() - t,
                  "rss_before": before, "peak_rss": rss("VmHWM:")}))
"""

# For comparison: boto3's managed transfer (s3transfer: parts in threads), which computes no sha256; a
# sha256 would need a second read of the file.
MANAGED = UPLOADER + r"""
from boto3.s3.transfer import TransferConfig
store.client.upload_file(sys.argv[2], store.bucket, store.key(sys.argv[1], "managed.tar"),
                         Config=TransferConfig(multipart_chunksize=int(sys.argv[3]), max_concurrency=int(sys.argv[4])))
print(json.dumps({"seconds": time.perf_counter() - t, "rss_before": before, "peak_rss": rss("VmHWM:")}))
"""

REGISTER = r"""
import sys
from service.crud import api_keys, job_records
from service.db import sessionmaker_for
from service.serve import prepare
from service.settings import Settings

settings = Settings()
prepare(settings)
with sessionmaker_for(settings.database_url)() as session:
    raw = api_keys.create_api_key(session, name="bench")
    key = api_keys.get_api_key(session, key=raw)
    print(job_records.create_job(session, api_key_id=key.id, model="m", params={}, meta={}).id, raw)
"""

LIST = r"""
import sys
from service.crud import artifact_records, job_records
from service.db import sessionmaker_for
from service.settings import Settings

with sessionmaker_for(Settings().database_url)() as session:
    artifact_records.add_artifact(session, job=job_records.get_job(session, job_id=sys.argv[1]), name="checkpoint.tar",
                                  size=int(sys.argv[2]), sha256=sys.argv[3], content_type="application/x-tar")
"""


def proc_rss(pid: int, field: str) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def write_file(path: Path, size: int) -> float:
    block = os.urandom(MiB)
    t = time.perf_counter()
    with open(path, "wb") as f:
        f.writelines(block[i % 251:] + block[:i % 251] for i in range(size // MiB))  # not one repeated block: no server can dedupe it
        f.write(block[: size % MiB])
    return time.perf_counter() - t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=2.0)
    parser.add_argument("--part-mib", type=int, default=16)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--compare-managed", type=int, default=0, metavar="THREADS",
                        help="also upload with boto3's managed transfer (upload_file) at this concurrency")
    args = parser.parse_args()
    import boto3
    import httpx

    reason = SwiftS3.unavailable()
    if reason:
        sys.exit(reason)
    with tempfile.TemporaryDirectory(prefix="consa-store-bench-") as tmp:
        tmp = Path(tmp)
        result = {"gib": args.gib, "part_mib": args.part_mib, "server": "OpenStack Swift 2.30 s3api (Debian), loopback"}
        with SwiftS3(tmp / "swift") as s3:
            bucket = "bench-" + uuid.uuid4().hex[:8]
            boto3.client("s3", endpoint_url=s3.endpoint, aws_access_key_id=s3.access_key,
                         aws_secret_access_key=s3.secret_key, region_name=s3.region).create_bucket(Bucket=bucket)
            env = {k: v for k, v in os.environ.items() if not k.startswith("CONSA_")} | s3.env(bucket) | {
                "CONSA_S3_PART_SIZE_MB": str(args.part_mib), "PYTHONPATH": str(ROOT), "CONSA_RECONCILE_INTERVAL_S": "0"}
            size = int(args.gib * 1024 * MiB)
            src = tmp / "checkpoint.tar"
            result["write_file_s"] = round(write_file(src, size), 1)

            # The API, another "host" (its own var dir): its database holds the job (as the shared PostgreSQL would).
            api_env = env | {"CONSA_VAR_DIR": str(tmp / "api")}
            job_id, key = subprocess.run([sys.executable, "-c", REGISTER], env=api_env, check=True,
                                         capture_output=True, text=True, cwd=ROOT).stdout.split()[-2:]
            worker_env = env | {"CONSA_VAR_DIR": str(tmp / "worker")}
            out = subprocess.run([sys.executable, "-c", WORKER, job_id, str(src)], env=worker_env,
                                 capture_output=True, text=True, check=True, cwd=ROOT)
            up = json.loads(out.stdout.strip().splitlines()[-1])
            result["upload"] = {"seconds": round(up["seconds"], 1), "MiB_per_s": round(size / MiB / up["seconds"], 1),
                                "worker_rss_before_MiB": round(up["rss_before"] / MiB, 1),
                                "worker_peak_rss_MiB": round(up["peak_rss"] / MiB, 1)}
            sha = up["sha256"]
            if args.compare_managed:
                out = subprocess.run([sys.executable, "-c", MANAGED, job_id, str(src), str(args.part_mib * MiB),
                                      str(args.compare_managed)], env=worker_env, capture_output=True, text=True,
                                     check=True, cwd=ROOT)
                m = json.loads(out.stdout.strip().splitlines()[-1])
                result["managed_upload_file"] = {
                    "threads": args.compare_managed, "seconds": round(m["seconds"], 1),
                    "MiB_per_s": round(size / MiB / m["seconds"], 1), "sha256": "not computed",
                    "rss_before_MiB": round(m["rss_before"] / MiB, 1), "peak_rss_MiB": round(m["peak_rss"] / MiB, 1)}
            src.unlink()  # the download below must come from the store, not from a page cache of this file

            subprocess.run([sys.executable, "-c", LIST, job_id, str(size), sha], env=api_env, check=True, cwd=ROOT)
            port = free_port()
            api = subprocess.Popen([sys.executable, "-m", "uvicorn", "--factory", "service.main:create_app", "--host",
                                    "127.0.0.1", "--port", str(port), "--log-level", "warning"], env=api_env, cwd=ROOT)
            try:
                url = f"http://127.0.0.1:{port}"
                for _ in range(300):
                    try:
                        if httpx.get(url + "/healthz").status_code == 200:
                            break
                    except httpx.TransportError:
                        time.sleep(0.2)
                headers = {"Authorization": f"Bearer {key}"}
                path = f"{url}/v1/jobs/{job_id}/artifacts/checkpoint.tar"
                with httpx.Client(headers=headers, timeout=600) as http:
                    http.get(url + "/v1/jobs", params={"limit": 1}).raise_for_status()  # warm: imports, pool
                    before = proc_rss(api.pid, "VmRSS:")
                    digest, got = hashlib.sha256(), 0
                    t = time.perf_counter()
                    with http.stream("GET", path) as resp:
                        resp.raise_for_status()
                        for chunk in resp.iter_bytes(MiB):
                            digest.update(chunk)
                            got += len(chunk)
                    seconds = time.perf_counter() - t
                    assert got == size and digest.hexdigest() == sha, (got, size)
                    t = time.perf_counter()
                    tail = http.get(path, headers={"Range": f"bytes={size - 64 * MiB}-", "If-Range": f'"{sha}"'})
                    range_s = time.perf_counter() - t
                    assert tail.status_code == 206 and len(tail.content) == 64 * MiB
                    result["download"] = {"seconds": round(seconds, 1), "MiB_per_s": round(size / MiB / seconds, 1),
                                          "sha256_ok": True, "range_last_64MiB_s": round(range_s, 2),
                                          "api_rss_before_MiB": round(before / MiB, 1),
                                          "api_peak_rss_MiB": round(proc_rss(api.pid, "VmHWM:") / MiB, 1)}
            finally:
                api.terminate()
                api.wait(30)
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
