"""The rq fine-tune queue's coalescing and locking on the real Redis (127.0.0.1:6379).

Every test uses its own queue name (= key prefix) and deletes only its own keys.
"""

from __future__ import annotations

import threading
import time
import uuid

import pytest

from ml_backend.jobs import (
    RedisFinetuneQueue,
    lock_key,
    mark_started,
    pending_key,
    project_lock,
    purge_queue,
    redis_connection,
)

pytestmark = pytest.mark.redis
REDIS_URL = "redis://127.0.0.1:6379/0"


@pytest.fixture()
def rq_queue():
    conn = redis_connection(REDIS_URL)
    name = f"madseg-test-{uuid.uuid4().hex[:10]}"
    q = RedisFinetuneQueue(conn, {"queue_name": name, "model_dir": "/nonexistent"})
    yield q
    purge_queue(conn, name)
    assert not list(conn.scan_iter(match=f"*{name}*"))


def test_events_coalesce_into_one_queued_job(rq_queue: RedisFinetuneQueue) -> None:
    subs = [rq_queue.submit(11) for _ in range(5)]
    assert not subs[0].coalesced and all(s.coalesced for s in subs[1:])
    assert {s.job_id for s in subs} == {subs[0].job_id}
    assert rq_queue.queue.count == 1
    job = rq_queue.queue.jobs[0]
    assert job.id == subs[0].job_id and job.args[:2] == (subs[0].job_id, 11)
    assert job.func_name == "ml_backend.jobs.rq_finetune"
    # another project gets its own job
    other = rq_queue.submit(12)
    assert not other.coalesced and rq_queue.queue.count == 2
    assert rq_queue.describe()["pending"] == {"11": subs[0].job_id, "12": other.job_id}


def test_concurrent_events_enqueue_exactly_one_job(rq_queue: RedisFinetuneQueue) -> None:
    results = []
    barrier = threading.Barrier(8)

    def fire() -> None:
        barrier.wait()
        results.append(rq_queue.submit(21))

    threads = [threading.Thread(target=fire) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert rq_queue.queue.count == 1
    assert len({s.job_id for s in results}) == 1
    assert sum(not s.coalesced for s in results) == 1


def test_event_while_running_schedules_exactly_one_follow_up(rq_queue: RedisFinetuneQueue) -> None:
    first = rq_queue.submit(31)
    # the worker takes the job and marks it started (what rq_finetune does before exporting)
    job = rq_queue.queue.dequeue_any([rq_queue.queue], timeout=None, connection=rq_queue.conn)[0]
    try:
        assert job.id == first.job_id
        assert mark_started(rq_queue.conn, rq_queue.queue_name, 31, first.job_id)
        follow = [rq_queue.submit(31) for _ in range(3)]
        assert not follow[0].coalesced and follow[0].job_id != first.job_id
        assert all(s.coalesced and s.job_id == follow[0].job_id for s in follow[1:])
        assert rq_queue.queue.count == 1
    finally:
        job.delete()  # taken off the queue by hand: no registry knows it


def test_a_stale_pending_marker_is_replaced(rq_queue: RedisFinetuneQueue) -> None:
    first = rq_queue.submit(41)
    rq_queue.queue.empty()  # the queued job vanished (e.g. Redis queue flushed) but the marker stayed
    assert rq_queue.conn.get(pending_key(rq_queue.queue_name, 41)).decode() == first.job_id
    again = rq_queue.submit(41)
    assert not again.coalesced and again.job_id != first.job_id
    assert rq_queue.queue.count == 1


def test_project_lock_excludes_a_second_holder(rq_queue: RedisFinetuneQueue) -> None:
    conn, name = rq_queue.conn, rq_queue.queue_name
    order: list[str] = []
    inside = threading.Event()

    def holder() -> None:
        with project_lock(conn, name, 51, ttl_s=3):
            order.append("a-in")
            inside.set()
            time.sleep(1.5)  # longer than ttl/3: the lock is renewed while held
            order.append("a-out")

    t = threading.Thread(target=holder)
    t.start()
    assert inside.wait(5)
    with project_lock(conn, name, 51, ttl_s=3):
        order.append("b-in")
    t.join()
    assert order == ["a-in", "a-out", "b-in"]
    assert conn.get(lock_key(name, 51)) is None
