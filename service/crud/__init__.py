"""Data access, one module per idea; every function takes the session first and keywords after:

    api_keys          the keys: create (hashed), look up, list, revoke
    job_records       job rows: create, read, list, count, delete
    job_states        the job state machine: claim, cancel, finish, settle a lost job; status reads
    job_events        a job's event log
    artifact_records  the rows that list a job's published files (the files: service/artifacts.py)
    outbox            which queued jobs still need their id published to the broker
    heartbeats        signs of life: a job's progress per step, a worker's beat, which workers are alive

Status changes are conditional UPDATEs (`WHERE status IN ...`), so the API cancelling a job and the
worker claiming or finishing it can race without either overwriting the other.
"""

# Status and heartbeat updates run as plain SQL (no in-session sync): callers refresh the rows they go on using.
PLAIN = {"synchronize_session": False}
