"""The admission policy and the out-of-memory row limits, as plain values: no torch, no threads.

Which waiting jobs join the running batch (engine/batching/admission.py) and how many rows memory allows
(engine/serving/memory.py's governor). The worker tests check the same rules end to end on a tiny model.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from engine.batching.admission import Running, Waiting, admissions, resumptions, row_limit
from engine.serving.memory import OOM_CALM_STEPS, OutOfMemoryGovernor, jobs_to_keep

SQUARE, TALL = (64, 64), (48, 64)
PLAIN, WITH_LORA = ("tiny", ()), ("tiny", (("detail", "1"),))


def job(size=SQUARE, key=PLAIN, rows=1, arrived=0.0) -> Waiting:
    return Waiting(size, key, rows, arrived)


IDLE = Running()


def admit(waiting, running=IDLE, *, max_batch=8, lowered=None, window=10.0, now=0.0) -> list[int]:
    return admissions(waiting, running, max_batch=max_batch, lowered=lowered or {}, overtake_window=window, now=now)


def test_jobs_join_in_arrival_order_up_to_the_row_limit():
    waiting = [job(rows=2), job(rows=4), job(rows=2), job()]
    assert admit(waiting, max_batch=8) == [0, 1, 2]
    # Full: the job that does not fit and everything behind it keep their order.
    assert admit(waiting, Running(rows=7, size=SQUARE, key=PLAIN), max_batch=8) == []


def test_a_job_always_joins_an_empty_batch_however_many_rows_it_has():
    assert admit([job(rows=4), job()], max_batch=2) == [0]


def test_an_empty_batch_takes_the_first_jobs_size_and_key():
    waiting = [job(TALL), job(SQUARE), job(TALL, rows=2), job(TALL, WITH_LORA)]
    assert admit(waiting) == [0, 2]


def test_jobs_join_the_running_batch_only_with_its_size_model_and_lora_set():
    running = Running(rows=1, size=SQUARE, key=PLAIN)
    waiting = [job(TALL), job(key=WITH_LORA), job(key=("other-model", ())), job()]
    assert admit(waiting, running) == [3]


def test_jobs_overtake_one_that_cannot_join_until_its_window_has_passed():
    running = Running(rows=1, size=SQUARE, key=PLAIN)
    waiting = [job(TALL, arrived=0.0), job(arrived=1.0), job(arrived=2.0)]
    assert admit(waiting, running, window=5, now=4.9) == [1, 2]
    assert admit(waiting, running, window=5, now=5.0) == []  # it waited its window: nothing more joins
    assert admit(waiting, running, window=0, now=0.0) == []  # window 0: strict arrival order


def test_a_lowered_limit_for_a_size_caps_that_size_only():
    lowered = {SQUARE: 2}
    assert admit([job(), job(), job()], Running(rows=1, size=SQUARE, key=PLAIN), lowered=lowered) == [0]
    assert admit([job(TALL)] * 3, lowered=lowered) == [0, 1, 2]
    assert (
        row_limit(SQUARE, 8, lowered) == 2 and row_limit(SQUARE, 1, lowered) == 1 and row_limit(TALL, 8, lowered) == 8
    )


def test_no_waiting_job_overtakes_a_parked_one():
    assert admit([job()], Running(rows=1, size=SQUARE, key=PLAIN, parked=1)) == []
    assert admit([job()], Running(parked=2)) == []


def test_parked_jobs_rejoin_oldest_first_as_the_limit_allows():
    assert resumptions([2, 1, 1], running_rows=0, limit=3) == 2
    assert resumptions([2, 1], running_rows=2, limit=3) == 0  # the oldest does not fit: none overtakes it
    assert resumptions([4], running_rows=0, limit=2) == 1  # always into an empty batch
    assert resumptions([], running_rows=0, limit=2) == 0


# ---------------------------------------------------------------------------- out-of-memory governor


def test_a_failed_step_halves_its_sizes_limit_and_calm_steps_double_it_back():
    governor = OutOfMemoryGovernor(max_batch=8)
    assert governor.step_failed(SQUARE, rows=6) == 3
    assert governor.limit(SQUARE) == 3 and governor.limit(TALL) == 8
    for _ in range(OOM_CALM_STEPS - 1):
        governor.step_succeeded()
    assert governor.limit(SQUARE) == 3
    governor.step_succeeded()
    assert governor.limit(SQUARE) == 6
    for _ in range(OOM_CALM_STEPS):
        governor.step_succeeded()
    assert governor.limit(SQUARE) == 8 and governor.lowered == {}  # back at max_batch: forgotten


def test_a_failure_restarts_the_calm_count_and_one_row_is_the_floor():
    governor = OutOfMemoryGovernor(max_batch=8, calm_steps=3)
    governor.step_failed(SQUARE, rows=8)
    governor.step_succeeded()
    governor.step_succeeded()
    assert governor.step_failed(SQUARE, rows=1) == 1
    governor.step_succeeded()
    governor.step_succeeded()
    assert governor.limit(SQUARE) == 1
    governor.step_succeeded()
    assert governor.limit(SQUARE) == 2


def test_a_job_that_did_not_fit_beside_others_caps_the_size_at_what_runs():
    governor = OutOfMemoryGovernor(max_batch=8)
    governor.preparing_failed(SQUARE, running_rows=3)
    assert governor.limit(SQUARE) == 3
    governor.preparing_failed(TALL, running_rows=0)
    assert governor.limit(TALL) == 1


def test_after_a_failed_step_the_oldest_jobs_that_fit_go_on():
    assert jobs_to_keep([1, 1, 2], limit=2) == 2
    assert jobs_to_keep([2, 1, 1], limit=3) == 2
    assert jobs_to_keep([3, 1], limit=1) == 1  # the oldest goes on even when it alone is over


@pytest.mark.slow
def test_the_policy_modules_do_not_import_torch():
    code = "import sys, engine.batching.admission, engine.serving.memory; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
