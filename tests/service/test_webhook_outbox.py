"""The webhook outbox in the job store, against real Redis: a job owes its webhook in the same
step that ends it, exactly once, on every path to an end; dispatchers lease entries so that two
never deliver one at once and a dead one's entries come back."""

from __future__ import annotations

import time

import pytest

from helpers import GOOD

HOOK = "https://hooks.no-such-host.invalid/x"  # accepted at submission; never called here


@pytest.fixture
def store(app):
    return app.extensions["imagepub"]["store"]


def owed(redis_client):
    return redis_client.zrange("imagepub:webhooks", 0, -1)


@pytest.mark.parametrize("end", ["succeeded", "failed", "cancelled"])
def test_a_job_owes_its_webhook_when_it_ends_once_however_often_it_is_saved(client, store, redis_client, end):
    job = client.post("/v1/publish", json={**GOOD, "callback_url": HOOK}).get_json()
    for state in ("running", "retrying", "running"):
        job["state"] = state
        store.save(job, event="state")
        assert owed(redis_client) == []  # nothing owed before the end
    job["state"] = end
    assert store.save(job, event="state") is True
    assert owed(redis_client) == [job["id"]]

    # delivered and forgotten: a duplicate terminal save (a late worker) owes nothing again
    (claimed_id, token, attempt), = store.claim_webhooks(10, 30)
    assert (claimed_id, attempt) == (job["id"], 1)
    assert store.settle_webhook(job["id"], token) is True
    assert store.save(job, event="state") is False
    assert owed(redis_client) == [] and redis_client.hlen("imagepub:webhooks:attempts") == 0


def test_a_job_without_a_callback_owes_nothing(client, store, redis_client):
    job = client.post("/v1/publish", json=GOOD).get_json()
    job["state"] = "succeeded"
    assert store.save(job, event="state") is True
    assert owed(redis_client) == []
    cancelled = client.post("/v1/publish", json=GOOD).get_json()
    assert client.post(f"/v1/jobs/{cancelled['id']}/cancel").status_code == 200
    assert owed(redis_client) == []


def test_cancelling_a_queued_job_owes_its_webhook_with_the_cancel(client, store, redis_client):
    job = client.post("/v1/publish", json={**GOOD, "callback_url": HOOK}).get_json()
    assert client.post(f"/v1/jobs/{job['id']}/cancel").status_code == 200
    assert owed(redis_client) == [job["id"]]
    # a running job's cancel is recorded by its worker's terminal save (tested above)
    running = client.post("/v1/publish", json={**GOOD, "callback_url": HOOK}).get_json()
    running["state"] = "running"
    store.save(running)
    assert client.post(f"/v1/jobs/{running['id']}/cancel").status_code == 202
    assert owed(redis_client) == [job["id"]]


def test_a_lease_keeps_an_entry_from_other_dispatchers_until_it_passes(store, redis_client):
    store.owe_webhook("job-a")
    store.owe_webhook("job-a")  # owed once
    (job_id, token, attempt), = store.claim_webhooks(10, 0.5)
    assert (job_id, attempt) == ("job-a", 1)
    assert store.claim_webhooks(10, 0.5) == []  # leased: nobody else takes it

    time.sleep(0.6)  # its dispatcher died: due again, with the attempt counted
    (job_id, token2, attempt), = store.claim_webhooks(10, 30)
    assert (job_id, attempt) == ("job-a", 2) and token2 != token
    # the first dispatcher, back late, settles nothing: the lease is the second one's
    assert store.settle_webhook("job-a", token) is False
    assert owed(redis_client) == ["job-a"]

    # a failed attempt makes it due again after the delay
    assert store.settle_webhook("job-a", token2, retry_in=0.3) is True
    assert store.claim_webhooks(10, 30) == []
    time.sleep(0.4)
    (_, token3, attempt), = store.claim_webhooks(10, 30)
    assert attempt == 3
    assert store.settle_webhook("job-a", token3) is True
    assert owed(redis_client) == [] and store.webhooks_pending() == 0


def test_a_claim_takes_at_most_what_it_asks_for(store):
    for i in range(5):
        store.owe_webhook(f"job-{i}")
    assert len(store.claim_webhooks(2, 30)) == 2
    assert len(store.claim_webhooks(10, 30)) == 3
    assert store.claim_webhooks(10, 30) == [] and store.webhooks_pending() == 5


def test_webhook_settings_bound_the_pool():
    from service import config

    assert config.parse({}, {}).webhooks.concurrency == 4
    assert config.parse({"webhooks": {"concurrency": 2, "timeout_seconds": 3}}, {}).webhooks.concurrency == 2
    for wrong in (0, 65, "many"):
        with pytest.raises(config.ConfigError, match="webhooks.concurrency"):
            config.parse({"webhooks": {"concurrency": wrong}}, {})
