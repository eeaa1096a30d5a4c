"""The per-key rate limit (CONSA_RATE_LIMIT_PER_MINUTE, a token bucket per key): a key past its budget
gets 429 problem+json with Retry-After, other keys are untouched, and the budget refills with time.
A real `consa serve` with a small budget (20 a minute: one request back every 3 s)."""

import time

import pytest

from service_fixtures import Server, assert_problem, server_env

pytestmark = pytest.mark.slow  # live servers or CLI subprocesses: out of the fast loop (pytest -m 'not slow'); CI runs it

PER_MINUTE = 20


@pytest.fixture(scope="module")
def limited(tmp_path_factory, tiny_model_dir, text_dir):
    var = tmp_path_factory.mktemp("var-rate-limit")
    server = Server(server_env(var, tiny_model_dir, text_dir, rate_limit_per_minute=PER_MINUTE), var / "serve.log")
    server.start()
    try:
        server.alice, server.bob = server.create_key("alice"), server.create_key("bob")
        yield server
    finally:
        server.stop()


def test_a_key_past_its_budget_gets_429_with_retry_after_and_others_do_not(limited):
    with limited.client(limited.alice) as alice, limited.client(limited.bob) as bob, limited.client() as anyone:
        answers = [alice.get("/v1/jobs").status_code for _ in range(PER_MINUTE + 5)]
        # A burst of a minute's worth passes (a token or two may refill while it runs), then 429s.
        assert answers[:PER_MINUTE] == [200] * PER_MINUTE, answers
        assert answers[-1] == 429, answers
        refused = alice.get("/v1/jobs")
        assert_problem(refused, 429, "rate_limited")
        wait = int(refused.headers["retry-after"])
        assert 1 <= wait <= 60 / PER_MINUTE + 1

        assert bob.get("/v1/jobs").status_code == 200  # the bucket is per key
        assert anyone.get("/healthz").status_code == 200  # unauthenticated probes are not limited

        time.sleep(wait)  # Retry-After is honest: after it, the key has a request again
        assert alice.get("/v1/jobs").status_code == 200
