#!/usr/bin/env bash
# docker/smoke.sh: the Compose stack end to end on one machine, no GPU and no Docker Hub needed.
#
#   bash docker/smoke.sh            # needs: a running Docker engine, a Compose implementation
#                                   # (`docker compose` v2, or docker-compose 1.29), curl, python3;
#                                   # debootstrap only when the local Debian base must be made
#   bash docker/smoke.sh --rmi      # ...and remove the images it built when it ends
#   bash docker/smoke.sh --s3       # the same through docker/compose.s3.yaml: artifacts in an object
#                                   # store (Swift's S3 API, docker/local/swift.Dockerfile), and the API
#                                   # and the worker share NO artifact volume, as on two hosts
#
# It builds the images from docker/compose.yaml + docker/compose.local.yaml (+ compose.smoke.yaml:
# the worker saves its search state every 5 steps), all on a local Debian base (LOCAL_BASE, made
# with debootstrap when missing): the API, the CPU worker, PostgreSQL and Redis from Debian's packages.
# Then: up, wait for health, `exec api consa keys create`, a job over HTTP for a tiny random Qwen3
# (made inside the worker image) followed to the end, every artifact downloaded and its sha256
# checked; `restart` and `down` + `up` keep the job, its events and artifacts; the worker killed
# mid-job -> the job is queued again and resumes from its saved step; the worker stopped mid-job
# (SIGTERM) -> it hands the job back within seconds and the job resumes from the step it stopped at;
# the API stopped mid-job -> the job still finishes. It ends by removing what it started: the containers, network and volumes of
# its Compose project, its temporary folder, the wheel it put in docker/wheels/ (and with --rmi the
# images it built). Timings go to stdout as "TIMING name seconds" lines; the log to SMOKE_LOG if set.
#
# With --s3 it also checks: the API's and the worker's containers share no volume; the job's objects
# are in the bucket and none of its files in the API's own folder; a download interrupted halfway
# resumes with Range and its sha256 matches; the worker killed mid-job is replaced by a NEW container
# with a new, empty scratch volume (another host, in effect), and the job resumes from the state saved
# in the bucket, not from step 0; a deleted job's objects are gone from the bucket.
#
# Settings (environment): SMOKE_PROJECT (Compose project name, consa-smoke), SMOKE_PORT (host port,
# a free one), LOCAL_BASE (consa-local/debian:bookworm), DEBIAN_MIRROR (for debootstrap),
# PIP_INDEX_URL, TORCH_INDEX_URL, SMOKE_TORCH_WHEEL (a CPU torch wheel for the worker image),
# SMOKE_STEPS (steps of the kill/stop jobs, 150).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

RMI=0
S3=0
for arg in "$@"; do
    case $arg in
        --rmi) RMI=1 ;;
        --s3) S3=1 ;;
        -h|--help) sed -n '2,34p' "$0"; exit 0 ;;
        *) echo "smoke.sh: unknown argument $arg" >&2; exit 2 ;;
    esac
done

log() { printf '%s smoke: %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "FAIL: $*"; exit 1; }
timing() { printf 'TIMING %s %s\n' "$1" "$2"; log "timing $1 = $2 s"; }
now() { date +%s.%N; }
since() { python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" "$1" "$(now)"; }

# -- preflight ----------------------------------------------------------------------------------
command -v docker >/dev/null || die "no docker client"
docker info >/dev/null 2>&1 || die "no Docker engine answers (start dockerd)"
command -v curl >/dev/null || die "curl is needed"
command -v python3 >/dev/null || die "python3 is needed"
if docker compose version >/dev/null 2>&1; then COMPOSE_BIN=(docker compose)
elif command -v docker-compose >/dev/null; then COMPOSE_BIN=(docker-compose)
elif command -v podman-compose >/dev/null; then COMPOSE_BIN=(podman-compose)
else die "no Compose implementation: install the compose plugin, or Debian's docker-compose"
fi
# Without the buildx plugin the docker CLI cannot use BuildKit: use the classic builder (which reads
# the root .dockerignore), for docker build and for Compose alike.
if ! docker buildx version >/dev/null 2>&1; then export DOCKER_BUILDKIT=0 COMPOSE_DOCKER_CLI_BUILD=1; fi

export COMPOSE_PROJECT_NAME=${SMOKE_PROJECT:-consa-smoke}
export LOCAL_BASE=${LOCAL_BASE:-consa-local/debian:bookworm}
export POSTGRES_PASSWORD=${POSTGRES_PASSWORD:-smoke-$RANDOM$RANDOM}
export CONSA_PORT=${SMOKE_PORT:-$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
STEPS=${SMOKE_STEPS:-150}
API=http://127.0.0.1:$CONSA_PORT
COMPOSE=("${COMPOSE_BIN[@]}" -f docker/compose.yaml -f docker/compose.local.yaml -f docker/compose.smoke.yaml)
IMAGES=(consa-api:latest consa-worker:cpu consa-local/redis:7 consa-local/postgres:15)
SERVICES=(api worker-cpu postgres redis)
if [ $S3 = 1 ]; then
    COMPOSE+=(-f docker/compose.s3.yaml -f docker/compose.s3.local.yaml)
    IMAGES+=(consa-local/swift:2.30)
    SERVICES+=(s3)
    export S3_SECRET_KEY=${S3_SECRET_KEY:-smoke-$RANDOM$RANDOM}
fi
log "compose: $("${COMPOSE_BIN[@]}" version 2>/dev/null | head -n 1); project $COMPOSE_PROJECT_NAME; API on $API"

if [ -n "$("${COMPOSE[@]}" ps -q 2>/dev/null)" ]; then
    die "Compose project $COMPOSE_PROJECT_NAME already has containers; set SMOKE_PROJECT to another name"
fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/consa-smoke.XXXXXX")
export CONSA_MODELS_DIR=$WORK/models CONSA_DATASETS_DIR=$WORK/datasets
mkdir -p "$CONSA_MODELS_DIR" "$CONSA_DATASETS_DIR" "$WORK/download"
PLACED_WHEEL=""
BUILT_IMAGES=()
MADE_BASE=0

teardown() {
    local code=$?
    set +e
    if [ $code -ne 0 ]; then
        log "failed; the stack's last log lines:"
        "${COMPOSE[@]}" ps >&2
        "${COMPOSE[@]}" logs --no-color --tail 60 >&2
    fi
    log "teardown: down -v (containers, network, volumes of $COMPOSE_PROJECT_NAME)"
    "${COMPOSE[@]}" --profile gpu down -v --remove-orphans >/dev/null 2>&1 \
        || "${COMPOSE[@]}" down -v --remove-orphans >/dev/null 2>&1
    docker rm -f "$COMPOSE_PROJECT_NAME-mkmodel" >/dev/null 2>&1
    rm -rf "$WORK"
    [ -n "$PLACED_WHEEL" ] && rm -f "$PLACED_WHEEL"
    if [ $RMI = 1 ]; then
        for image in "${BUILT_IMAGES[@]}"; do docker rmi "$image" >/dev/null 2>&1; done
        [ $MADE_BASE = 1 ] && docker rmi "$LOCAL_BASE" >/dev/null 2>&1
        log "removed the images it built"
    fi
    if [ $code -eq 0 ]; then log "PASS"; else log "FAIL (exit $code)"; fi
    exit $code
}
trap teardown EXIT
trap 'exit 130' INT TERM

# -- the local Debian base ------------------------------------------------------------------------
# Debian's minimal system, imported as an image. It trusts what this machine trusts: the host's CA
# bundle goes in as /etc/ssl/certs/host-ca-bundle.crt (pip, requests and Python read it through
# PIP_CERT / REQUESTS_CA_BUNDLE / SSL_CERT_FILE), for networks whose HTTPS goes through a proxy.
T0=$(now)
if ! docker image inspect "$LOCAL_BASE" >/dev/null 2>&1; then
    [ "$LOCAL_BASE" = consa-local/debian:bookworm ] || die "LOCAL_BASE $LOCAL_BASE is not an image here"
    command -v debootstrap >/dev/null || die "the local base needs debootstrap (apt-get install debootstrap)"
    log "making $LOCAL_BASE with debootstrap (a few minutes)"
    rootfs=$WORK/rootfs
    debootstrap --variant=minbase bookworm "$rootfs" "${DEBIAN_MIRROR:-http://deb.debian.org/debian}" >"$WORK/debootstrap.log" 2>&1 \
        || { tail -n 20 "$WORK/debootstrap.log" >&2; die "debootstrap failed"; }
    mkdir -p "$rootfs/etc/ssl/certs"
    bundle=/etc/ssl/certs/ca-certificates.crt
    [ -f "$bundle" ] && cp "$bundle" "$rootfs/etc/ssl/certs/host-ca-bundle.crt"
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/lib/apt/lists/*
    ca=/etc/ssl/certs/host-ca-bundle.crt
    tar -C "$rootfs" -c . | docker import -c "ENV PIP_CERT=$ca REQUESTS_CA_BUNDLE=$ca SSL_CERT_FILE=$ca" \
        -c 'CMD ["bash"]' - "$LOCAL_BASE" >/dev/null
    rm -rf "$rootfs"
    MADE_BASE=1
fi
timing base_image "$(since "$T0")"

# -- CPU torch for the worker image ------------------------------------------------------------------
# A torch wheel in docker/wheels/ wins over the CPU index. Where this machine's pip has the CPU wheel
# of the base's Python (3.11 on bookworm), put it there for the build; remove it at the end.
if [ -n "${SMOKE_TORCH_WHEEL:-}" ]; then
    cp "$SMOKE_TORCH_WHEEL" docker/wheels/ && PLACED_WHEEL=docker/wheels/$(basename "$SMOKE_TORCH_WHEEL")
elif ! ls docker/wheels/torch-*.whl >/dev/null 2>&1; then
    version=$(python3 -c 'import torch; print(torch.__version__)' 2>/dev/null || true)
    if [[ $version == *+cpu ]]; then
        python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.11 --implementation cp \
            --platform manylinux_2_28_x86_64 "torch==$version" -d "$WORK/wheel" >/dev/null 2>&1 || true
        wheel=$(ls "$WORK"/wheel/torch-*+cpu-cp311-*.whl 2>/dev/null | head -n 1 || true)
        if [ -n "$wheel" ]; then cp "$wheel" docker/wheels/ && PLACED_WHEEL=docker/wheels/$(basename "$wheel"); fi
    fi
fi
log "worker torch: ${PLACED_WHEEL:-$(ls docker/wheels/torch-*.whl 2>/dev/null || echo "from ${TORCH_INDEX_URL:-the CPU index}")}"

# -- build ------------------------------------------------------------------------------------------------
T0=$(now)
for image in "${IMAGES[@]}"; do
    docker image inspect "$image" >/dev/null 2>&1 || BUILT_IMAGES+=("$image")
done
log "building the images"
"${COMPOSE[@]}" build >"$WORK/build.log" 2>&1 || { tail -n 40 "$WORK/build.log" >&2; die "build failed"; }
timing build "$(since "$T0")"
for image in "${IMAGES[@]}"; do
    printf 'SIZE %s %s\n' "$image" "$(docker image inspect -f '{{.Size}}' "$image")"
done
docker run --rm --entrypoint python consa-api:latest -c 'import importlib.util as u; assert u.find_spec("torch") is None' \
    || die "the API image has torch"

# -- a tiny model and a text folder, made inside the worker image ----------------------------------------
# As tests/tiny.py: a random Qwen3 (transformers' config) and a byte-level BPE tokenizer trained on the
# Python standard library, whose files are also the job's dataset.
docker run --rm -i --name "$COMPOSE_PROJECT_NAME-mkmodel" --user "$(id -u):$(id -g)" --entrypoint python \
    -v "$CONSA_MODELS_DIR:/models" -v "$CONSA_DATASETS_DIR:/datasets" consa-worker:cpu - <<'PY' >&2
import os, shutil
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

stdlib = Path(os.path.dirname(os.__file__))
text = Path("/datasets/text")
text.mkdir()
for name in ["argparse.py", "textwrap.py", "string.py", "bisect.py", "heapq.py", "shlex.py", "fnmatch.py", "glob.py"]:
    shutil.copy(stdlib / name, text / name)
tok = Tokenizer(models.BPE())
tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
tok.decoder = decoders.ByteLevel()
tok.train_from_iterator([p.read_text() for p in sorted(text.iterdir())],
                        trainer=trainers.BpeTrainer(vocab_size=512, special_tokens=["<|endoftext|>"],
                                                    initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
config = AutoConfig.for_model("qwen3", vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=2048,
                              eos_token_id=0, bos_token_id=0, pad_token_id=0, tie_word_embeddings=True)
torch.manual_seed(0)
AutoModelForCausalLM.from_config(config).save_pretrained("/models/tiny-qwen3")
PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>").save_pretrained("/models/tiny-qwen3")
print("tiny model:", sorted(os.listdir("/models/tiny-qwen3")))
PY
[ -f "$CONSA_MODELS_DIR/tiny-qwen3/config.json" ] || die "the tiny model was not made"
chmod -R a+rX "$WORK"

# -- helpers over HTTP ------------------------------------------------------------------------------------
api() {  # api METHOD PATH [JSON]: the body on stdout; fails on HTTP >= 400
    local method=$1 path=$2 body=${3:-}
    curl -fsS -X "$method" "$API$path" -H "Authorization: Bearer $KEY" \
        ${body:+-H 'Content-Type: application/json' -d "$body"}
}
field() { python3 -c "import json, sys; d = json.load(sys.stdin); print(eval(sys.argv[1], {}, {'d': d}))" "$1"; }
container() { "${COMPOSE[@]}" ps -q "$1"; }

wait_healthy() {  # wait_healthy SERVICE TIMEOUT_S
    local deadline=$((SECONDS + $2)) status
    while :; do
        status=$(docker inspect -f '{{if .State.Health}}{{.State.Health.Status}}{{else}}{{.State.Status}}{{end}}' \
                 "$(container "$1")" 2>/dev/null || echo missing)
        [ "$status" = healthy ] && return 0
        [ $SECONDS -ge $deadline ] && die "$1 is not healthy after $2 s (it is $status)"
        sleep 1
    done
}
wait_ready() {  # /readyz: database, broker and a live worker
    local deadline=$((SECONDS + $1))
    until curl -fsS "$API/readyz" >/dev/null 2>&1; do
        [ $SECONDS -ge $deadline ] && die "/readyz is not 200 after $1 s: $(curl -sS "$API/readyz")"
        sleep 1
    done
}
wait_job() {  # wait_job JOB TIMEOUT_S [STEP]: until the job ended (or its search reached STEP); prints its status
    local deadline=$((SECONDS + $2)) until_step=${3:-} job status step
    while :; do
        job=$(api GET "/v1/jobs/$1")
        status=$(field 'd["status"]' <<<"$job")
        step=$(field '(d["progress"] or {}).get("step", 0)' <<<"$job")
        case $status in succeeded|failed|cancelled) echo "$status"; return 0 ;; esac
        if [ -n "$until_step" ] && [ "$step" -ge "$until_step" ]; then echo "$status"; return 0; fi
        [ $SECONDS -ge $deadline ] && die "job $1 still $status (step $step) after $2 s"
        sleep 0.5
    done
}
submit() {  # submit STEPS EVALUATE: prints the job id
    api POST /v1/jobs "{\"model\": \"/models/tiny-qwen3\", \"dataset\": \"/datasets/text\", \"sparsity\": 0.5,
        \"granularity\": \"kv_head\", \"window\": 32, \"seq_len\": 128, \"steps\": $1, \"evaluate\": $2}" | field 'd["id"]'
}
check_artifacts() {  # check_artifacts JOB: every listed artifact downloads with its sha256; prints the count
    local list names name sha got n=0
    list=$(api GET "/v1/jobs/$1/artifacts")
    names=$(field '" ".join(a["name"] for a in d["data"])' <<<"$list")
    [ -n "$names" ] || die "job $1 lists no artifacts"
    for name in $names; do
        sha=$(field "next(a['sha256'] for a in d['data'] if a['name'] == '$name')" <<<"$list")
        curl -fsS -o "$WORK/download/$name" "$API/v1/jobs/$1/artifacts/$name" -H "Authorization: Bearer $KEY"
        got=$(sha256sum "$WORK/download/$name" | cut -d' ' -f1)
        [ "$got" = "$sha" ] || die "$1/$name: sha256 $got, the API lists $sha"
        n=$((n + 1))
    done
    rm -f "$WORK"/download/*
    echo "$n"
}
events_of() { api GET "/v1/jobs/$1/events?limit=1000" | field 'json.dumps(d["data"], sort_keys=True)' 2>/dev/null \
              || api GET "/v1/jobs/$1/events?limit=1000" | python3 -c 'import json, sys; print(json.dumps(json.load(sys.stdin)["data"], sort_keys=True))'; }
snapshot() {  # what must survive a restart: the job's status, its events and its artifact list
    printf '%s\n%s\n%s\n' "$(api GET "/v1/jobs/$1" | field 'd["status"]')" "$(events_of "$1" | sha256sum)" \
        "$(api GET "/v1/jobs/$1/artifacts" | python3 -c 'import json, sys; print(sorted((a["name"], a["sha256"]) for a in json.load(sys.stdin)["data"]))')"
}

# -- with --s3: what only a store that shares no folder can show ------------------------------------------
rw_mounts() {  # the writable mounts (volume names, or host paths) of a service's container, one a line
    docker inspect -f '{{range .Mounts}}{{if .RW}}{{if .Name}}{{.Name}}{{else}}{{.Source}}{{end}}{{"\n"}}{{end}}{{end}}' \
        "$(container "$1")" | sed '/^$/d' | sort
}
scratch_volume() {  # the volume a service's container has at /data/artifacts
    docker inspect -f '{{range .Mounts}}{{if eq .Destination "/data/artifacts"}}{{.Name}}{{end}}{{end}}' "$(container "$1")"
}
bucket_objects() {  # bucket_objects JOB: how many objects of the job the bucket holds (boto3 itself, not consa)
    "${COMPOSE[@]}" exec -T api python - "$1" <<'PY'
import os, sys, boto3
s3 = boto3.client("s3", endpoint_url=os.environ["CONSA_S3_ENDPOINT_URL"], region_name=os.environ["CONSA_S3_REGION"])
pages = s3.get_paginator("list_objects_v2").paginate(Bucket=os.environ["CONSA_S3_BUCKET"])
print(sum(1 for page in pages for o in page.get("Contents", []) if sys.argv[1] in o["Key"]))
PY
}
check_no_shared_folder() {  # check_no_shared_folder JOB: the API and the worker write to no common volume;
    # the job's objects are in the bucket, none in the API's folder
    local shared objects local_files
    shared=$(comm -12 <(rw_mounts api) <(rw_mounts worker-cpu))
    [ -z "$shared" ] || die "the API and the worker share writable mounts: $shared"
    objects=$(bucket_objects "$1")
    [ "${objects:-0}" -ge "$2" ] || die "the bucket holds ${objects:-0} objects of job $1, the API lists $2 artifacts"
    local_files=$("${COMPOSE[@]}" exec -T api find /data/artifacts -path "*$1*" -type f | wc -l)
    [ "$local_files" -eq 0 ] || die "the API's own folder holds $local_files files of job $1"
    log "no shared folder: the API and the worker share no writable volume; job $1: $objects objects in the bucket, none in the API's folder"
    printf 'S3_OBJECTS %s\n' "$objects"
}
check_range_resume() {  # check_range_resume JOB: the largest artifact, downloaded halfway, then resumed with
    # Range + If-Range (curl -C -) to the end: its sha256 is the listed one
    local list name size sha half got
    list=$(api GET "/v1/jobs/$1/artifacts")
    read -r name size sha < <(field '" ".join(str(a[k]) for a in [max(d["data"], key=lambda a: a["size"])] for k in ("name", "size", "sha256"))' <<<"$list")
    half=$((size / 2))
    curl -fsS -r "0-$((half - 1))" -o "$WORK/download/$name" "$API/v1/jobs/$1/artifacts/$name" -H "Authorization: Bearer $KEY"
    [ "$(stat -c %s "$WORK/download/$name")" -eq "$half" ] || die "$name: the first half is not $half bytes"
    curl -fsS -C - -H "If-Range: \"$sha\"" -o "$WORK/download/$name" "$API/v1/jobs/$1/artifacts/$name" -H "Authorization: Bearer $KEY"
    got=$(sha256sum "$WORK/download/$name" | cut -d' ' -f1)
    rm -f "$WORK/download/$name"
    [ "$got" = "$sha" ] || die "$name resumed at byte $half: sha256 $got, the API lists $sha"
    log "$name ($size bytes): downloaded to byte $half, resumed with Range + If-Range, sha256 as listed"
    printf 'RANGE_RESUMED %s %s\n' "$name" "$half"
}

# -- up -------------------------------------------------------------------------------------------------------
T0=$(now)
"${COMPOSE[@]}" up -d --no-build >"$WORK/up.log" 2>&1 || { cat "$WORK/up.log" >&2; die "up failed"; }
wait_healthy api 180
timing up_to_api_healthy "$(since "$T0")"
wait_ready 180
timing up_to_ready "$(since "$T0")"

KEY=$("${COMPOSE[@]}" exec -T api consa keys create smoke | tail -n 1)
[[ $KEY == consa_* ]] || die "consa keys create printed no key: $KEY"
log "key created through 'exec api consa keys create'"

# -- a job, followed to the end -----------------------------------------------------------------------------------
T0=$(now)
JOB=$(submit 40 true)
log "job $JOB submitted"
status=$(wait_job "$JOB" 600)
[ "$status" = succeeded ] || die "job $JOB ended $status: $(api GET "/v1/jobs/$JOB")"
timing job_wall "$(since "$T0")"
n=$(check_artifacts "$JOB")
log "job $JOB succeeded; $n artifacts downloaded, sha256 as listed"
if [ $S3 = 1 ]; then
    check_no_shared_folder "$JOB" "$n"
    check_range_resume "$JOB"
fi
before=$(snapshot "$JOB")

# -- restart, and down + up: the job, its events and artifacts are still there --------------------------------------
T0=$(now)
"${COMPOSE[@]}" restart >/dev/null 2>&1
wait_healthy api 180
timing restart_to_healthy "$(since "$T0")"
[ "$(snapshot "$JOB")" = "$before" ] || die "after restart the job, its events or its artifacts changed"
check_artifacts "$JOB" >/dev/null
log "restart: job, events and artifacts kept"

T0=$(now)
"${COMPOSE[@]}" down >/dev/null 2>&1
"${COMPOSE[@]}" up -d --no-build >/dev/null 2>&1
wait_healthy api 180
timing down_up_to_healthy "$(since "$T0")"
[ "$(snapshot "$JOB")" = "$before" ] || die "after down + up the job, its events or its artifacts changed"
check_artifacts "$JOB" >/dev/null
log "down + up: job, events and artifacts kept"
wait_ready 180

# -- the worker killed mid-job: queued again, resumed from its saved state --------------------------------------------
resumed_step() {  # the step the job's last attempt resumed from (0: none)
    events_of "$1" | python3 -c '
import json, sys
steps = [e["data"]["resumed_from_step"] for e in json.load(sys.stdin) if (e.get("data") or {}).get("resumed_from_step")]
print(steps[-1] if steps else 0)'
}
wait_resumed() {  # wait_resumed JOB TIMEOUT_S: until an attempt announced its resume point
    local deadline=$((SECONDS + $2))
    until [ "$(resumed_step "$1")" -gt 0 ]; do
        [ $SECONDS -ge $deadline ] && die "job $1 did not resume within $2 s: $(api GET "/v1/jobs/$1")"
        sleep 0.5
    done
}
started_job() {  # a job of STEPS steps, submitted and past step 20; prints its id
    local job
    job=$(submit "$STEPS" false)
    wait_job "$job" 300 20 >/dev/null
    echo "$job"
}
ends_resumed() {  # ends_resumed JOB HOW MARK: the job (its worker HOW) resumed and succeeded, artifacts intact
    local status
    status=$(wait_job "$1" 900)
    [ "$status" = succeeded ] || die "job $1 ended $status after the worker was $2: $(api GET "/v1/jobs/$1")"
    check_artifacts "$1" >/dev/null
    log "worker $2: job $1 queued again, resumed from step $(resumed_step "$1"), succeeded"
    printf '%s %s\n' "$3" "$(resumed_step "$1")"
}
JOB2=$(started_job)
worker=$(container worker-cpu)
log "job $JOB2 at step $(api GET "/v1/jobs/$JOB2" | field 'd["progress"]["step"]'); docker kill the worker"
T0=$(now)
docker kill "$worker" >/dev/null
sleep 2
if [ $S3 = 1 ]; then
    # Another host, in effect: the killed container and its scratch volume are removed, and a new
    # container with a new, empty volume takes the job (its search state can only come from the bucket).
    scratch=$(scratch_volume worker-cpu)
    "${COMPOSE[@]}" rm -fs worker-cpu >/dev/null 2>&1
    docker volume rm "$scratch" >/dev/null || die "could not remove the worker's scratch volume $scratch"
    "${COMPOSE[@]}" up -d --no-build --no-deps worker-cpu >/dev/null 2>&1
    [ "$(container worker-cpu)" != "$worker" ] || die "the worker container was not replaced"
    log "worker replaced: container $(container worker-cpu | cut -c1-12), new scratch volume (was $scratch)"
    printf 'WORKER_REPLACED %s\n' "$scratch"
elif [ "$(docker inspect -f '{{.State.Running}}' "$worker")" != true ]; then
    # Docker counts a kill as a manual stop, so the restart policy leaves it down: start it, as an operator would.
    "${COMPOSE[@]}" start worker-cpu >/dev/null 2>&1
fi
wait_resumed "$JOB2" 300
timing kill_to_resumed "$(since "$T0")"
ends_resumed "$JOB2" killed RESUMED_AFTER_KILL

# -- the worker stopped mid-job (SIGTERM, warm shutdown): the job goes back to the queue at once ---------------------------
JOB3=$(started_job)
log "job $JOB3 at step $(api GET "/v1/jobs/$JOB3" | field 'd["progress"]["step"]'); compose stop the worker"
T0=$(now)
"${COMPOSE[@]}" stop worker-cpu >/dev/null 2>&1
timing worker_stop "$(since "$T0")"
status=$(api GET "/v1/jobs/$JOB3" | field 'd["status"]')
[ "$status" = queued ] || die "job $JOB3 is $status after its worker stopped, not queued again"
"${COMPOSE[@]}" start worker-cpu >/dev/null 2>&1
wait_resumed "$JOB3" 300
ends_resumed "$JOB3" stopped RESUMED_AFTER_STOP

# -- the API stopped mid-job: the job still finishes ---------------------------------------------------------------------
JOB4=$(submit "$STEPS" false)
wait_job "$JOB4" 300 5 >/dev/null
"${COMPOSE[@]}" stop api >/dev/null 2>&1
log "API stopped while $JOB4 runs"
deadline=$((SECONDS + 900))
until [ "$("${COMPOSE[@]}" exec -T postgres psql -U consa -d consa -tAc "SELECT status FROM jobs WHERE id = '$JOB4'")" = succeeded ]; do
    [ $SECONDS -ge $deadline ] && die "job $JOB4 did not finish while the API was stopped"
    sleep 2
done
"${COMPOSE[@]}" start api >/dev/null 2>&1
wait_healthy api 180
[ "$(api GET "/v1/jobs/$JOB4" | field 'd["status"]')" = succeeded ] || die "job $JOB4 is not succeeded"
check_artifacts "$JOB4" >/dev/null
log "API stopped: job $JOB4 finished without it"

# -- with --s3: deleting a job deletes its objects from the bucket -----------------------------------------------------------
if [ $S3 = 1 ]; then
    before_delete=$(bucket_objects "$JOB4")
    [ "$before_delete" -gt 0 ] || die "the bucket holds no object of job $JOB4 before its delete"
    api DELETE "/v1/jobs/$JOB4" >/dev/null
    left=$(bucket_objects "$JOB4")
    [ "$left" -eq 0 ] || die "job $JOB4 deleted, yet the bucket holds $left of its objects"
    log "job $JOB4 deleted: its $before_delete objects are gone from the bucket"
    printf 'S3_DELETED %s\n' "$before_delete"
fi

# -- logs: every service wrote some ---------------------------------------------------------------------------------------
for service in "${SERVICES[@]}"; do
    [ -n "$("${COMPOSE[@]}" logs --no-color "$service" 2>&1 | tail -n 1)" ] || die "$service wrote no log"
done
log "all checks passed"
