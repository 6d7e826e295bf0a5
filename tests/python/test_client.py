"""tie's Python client against a live `tie serve` (started by tests/integration/python_client.rs,
which passes its endpoint, socket directory and the fixtures' directory in the environment).
Expected outputs are the fixtures': onnxruntime's answers for the example models."""

import json
import os
import pathlib
import threading
import time

import numpy as np
import pytest

import tie_client

ENDPOINT = os.environ["TIE_TEST_ENDPOINT"]
SOCKET_DIR = os.environ["TIE_TEST_SOCKET_DIR"]
FIXTURES = pathlib.Path(os.environ["TIE_TEST_FIXTURES"])


def client(model, **kw):
    return tie_client.Client(ENDPOINT, model, socket_dir=SOCKET_DIR, **kw)


def fixture(name):
    return json.loads((FIXTURES / f"{name}.json").read_text())


def answer(c, limit=5.0):
    """The next answer of ``c`` (polling), failing after ``limit`` seconds."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        a = c.poll()
        if a is not None:
            return a
    raise AssertionError("no answer in time")


def close(got, want):
    np.testing.assert_allclose(got, np.asarray(want, np.float32), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", sorted(p.stem for p in FIXTURES.glob("*.json")))
def test_predictions_match_onnxruntime_row_by_row_and_in_a_batch(name):
    f = fixture(name)
    with client(f["model"], version=f["version"]) as c:
        assert c.model_version == f["version"]
        assert c.feature_count == len(f["inputs"][0])
        assert c.output_count == len(f["outputs"][0])
        for row, want in zip(f["inputs"], f["outputs"]):
            close(c.predict(np.asarray(row, np.float32)), want)
        close(c.predict_batch(np.asarray(f["inputs"], np.float32)), f["outputs"])


def test_a_batch_of_ten_thousand_rows_answers_every_row_in_order():
    rows = np.random.default_rng(7).standard_normal((10_000, 64)).astype(np.float32)
    with client("mlp64") as c:
        out = c.predict_batch(rows)
        assert out.shape == (10_000, 1) and out.dtype == np.float32
        for i in (0, 1, 4_999, 9_999):
            close(out[i], c.predict(rows[i]))
        assert c.in_flight == 0


def test_pipelined_answers_come_in_submission_order():
    rows = np.random.default_rng(3).standard_normal((50, 64)).astype(np.float32)
    with client("mlp64") as c:
        ids = [c.submit(r, priority=p) for r, p in zip(rows, ["low", "normal", "high", "critical", "normal"] * 10)]
        answers = [answer(c) for _ in ids]
        assert [i for i, _ in answers] == ids
        batch = c.predict_batch(rows)
        for (_, out), want in zip(answers, batch):
            close(out, want)
        assert c.poll() is None


def test_inputs_of_other_types_and_layouts_are_converted_once():
    f = fixture("mlp64_v1")
    with client("mlp64") as c:
        want = c.predict(np.asarray(f["inputs"][0], np.float32))
        close(c.predict(np.asarray(f["inputs"][0], np.float64)), want)
        close(c.predict(list(f["inputs"][0])), want)
        wide = np.zeros((2, 128), np.float32)
        wide[0, ::2] = f["inputs"][0]
        close(c.predict(wide[0, ::2]), want)
        close(c.predict_batch(np.asfortranarray(np.asarray(f["inputs"][:3], np.float64))), f["outputs"][:3])


def test_every_error_is_a_tie_error_of_its_own_kind():
    with client("mlp64") as c:
        with pytest.raises(tie_client.WrongFeatureCount):
            c.predict(np.zeros(63, np.float32))
        with pytest.raises(tie_client.WrongFeatureCount):
            c.predict_batch(np.zeros((4, 65), np.float32))
        with pytest.raises(tie_client.NonFinite):
            c.predict(np.full(64, np.nan, np.float32))
        with pytest.raises(ValueError):
            c.submit(np.zeros(64, np.float32), priority="urgent")
        c.submit(np.zeros(64, np.float32))
        with pytest.raises(tie_client.RequestsInFlight):
            c.predict(np.zeros(64, np.float32))
        answer(c)
        # A deadline already passed: the server answers Timeout, on the request's id.
        late = c.submit(np.zeros(64, np.float32), deadline_ns=tie_client.monotonic_ns() - 1)
        with pytest.raises(tie_client.Timeout) as timeout:
            answer(c)
        assert timeout.value.request_id == late
    with pytest.raises(tie_client.ClosedError):
        c.predict(np.zeros(64, np.float32))
    with pytest.raises(tie_client.Refused) as refused:
        client("no-such-model")
    assert "no-such-model" in str(refused.value)
    with pytest.raises(tie_client.ServerNotRunning):
        tie_client.Client(ENDPOINT, "mlp64", socket_dir=str(pathlib.Path(SOCKET_DIR) / "nowhere"))


def test_a_second_thread_is_told_the_client_is_busy_and_runs_while_the_first_waits():
    rows = np.random.default_rng(5).standard_normal((10_000, 64)).astype(np.float32)
    with client("mlp64") as c:
        done = []
        worker = threading.Thread(target=lambda: done.extend(c.predict_batch(rows) for _ in range(10)))
        worker.start()
        busy = 0
        # This thread gets the GIL while the worker waits for answers, and is refused the client.
        while worker.is_alive():
            try:
                c.in_flight
            except tie_client.ClientBusy:
                busy += 1
        worker.join(timeout=30)
        assert len(done) == 10 and busy > 0
        assert c.in_flight == 0
