"""`consa keys create|list|revoke` end to end: the CLI (which reaches the service only through the
`consa.commands` entry point) against the database of a running `consa serve`; a revoked key gets 401
on its very next request, the others keep working."""

import subprocess
import sys

import pytest

from service_fixtures import ROOT, Server, assert_problem, server_env

pytestmark = pytest.mark.slow  # live servers or CLI subprocesses: out of the fast loop (pytest -m 'not slow'); CI runs it


@pytest.fixture(scope="module")
def srv(tmp_path_factory, tiny_model_dir, text_dir):
    var = tmp_path_factory.mktemp("var-keys")
    server = Server(server_env(var, tiny_model_dir, text_dir), var / "serve.log").start()
    try:
        yield server
    finally:
        server.stop()


def consa(srv, *argv) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "consa", *argv], env=srv.env, cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def test_consa_keys_revoke_refuses_the_key_at_once_and_list_shows_it(srv):
    created = consa(srv, "keys", "create", "ci-bot")
    assert created.returncode == 0, created.stderr
    bot = created.stdout.strip().splitlines()[-1]
    other = consa(srv, "keys", "create", "someone-else").stdout.strip().splitlines()[-1]
    with srv.client(bot) as client, srv.client(other) as kept:
        assert client.get("/v1/jobs").status_code == 200

        revoked = consa(srv, "keys", "revoke", "ci-bot")
        assert revoked.returncode == 0 and "revoked 1 key(s) named 'ci-bot'" in revoked.stderr, revoked.stderr
        assert_problem(client.get("/v1/jobs"), 401)  # the same connection, the next request
        assert kept.get("/v1/jobs").status_code == 200

    listed = consa(srv, "keys", "list")
    assert listed.returncode == 0, listed.stderr
    lines = {line.split()[0]: line for line in listed.stdout.splitlines()[1:]}
    assert lines["ci-bot"].split()[-1] != "-" and lines["someone-else"].split()[-1] == "-", listed.stdout
    assert bot not in listed.stdout and bot[:12] in listed.stdout  # the prefix, never the key

    again = consa(srv, "keys", "revoke", "ci-bot")  # nothing active left by that name
    assert again.returncode == 2 and "no active key named 'ci-bot'" in again.stderr
    assert consa(srv, "keys", "revoke").returncode == 2  # argparse: the name is required
