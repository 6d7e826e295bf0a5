"""tie's client for Python: predictions from a tie server over shared-memory rings.

    import numpy as np
    import tie_client

    with tie_client.Client("tie", "mlp64") as client:
        scores = client.predict(np.zeros(client.feature_count, np.float32))

Rows are float32. A row that already is contiguous float32 is written into the ring straight
from its buffer; any other input (float64, a list, a strided view) is converted once, with
``numpy.ascontiguousarray``, and ``predict_batch`` copies its array once. Waits for answers release the GIL. Every error is a
``TieError``; each kind has its own subclass (``ServerNotRunning``, ``WrongFeatureCount``,
``ModelNotFound``, ``Timeout``, ...).
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import numpy as np

from . import _native
from ._native import (
    BackendError,
    BatchProcessingError,
    ClientBusy,
    ClosedError,
    ConnectFailed,
    Disconnected,
    ExecutionFailed,
    InvalidInputShape,
    ModelNotFound,
    NonFinite,
    NotReady,
    OutOfMemory,
    PermissionDenied,
    QueueFull,
    Refused,
    Rejected,
    RequestsInFlight,
    ServerNotRunning,
    TieError,
    Timeout,
    UntrustedServer,
    WrongFeatureCount,
    monotonic_ns,
)

__all__ = [
    "Client",
    "monotonic_ns",
    "TieError",
    "ConnectFailed",
    "ServerNotRunning",
    "PermissionDenied",
    "UntrustedServer",
    "Refused",
    "WrongFeatureCount",
    "NonFinite",
    "QueueFull",
    "Disconnected",
    "Timeout",
    "RequestsInFlight",
    "ModelNotFound",
    "InvalidInputShape",
    "ExecutionFailed",
    "OutOfMemory",
    "BatchProcessingError",
    "BackendError",
    "Rejected",
    "NotReady",
    "ClosedError",
    "ClientBusy",
]

ArrayLike = Union[np.ndarray, "list[float]"]


def _rows(values: ArrayLike, ndim: int) -> np.ndarray:
    array = np.ascontiguousarray(values, dtype=np.float32)
    if array.ndim != ndim:
        raise WrongFeatureCount(
            f"expected a {ndim}-dimensional array of features, got shape {array.shape}"
        )
    return array


class Client:
    """A session with a tie server for one model.

    ``endpoint`` names the server (``tie`` by default in ``tie serve``); ``model`` the model,
    ``version`` a version of it (default: the server's default, followed across reloads).
    ``socket_dir`` is where the server's socket is (default: ``$TIE_SOCKET_DIR``, else
    ``$XDG_RUNTIME_DIR/tie``, else ``/run/tie``). ``layout`` is a layout file whose features
    the model must read, in order. ``expected_server_uid`` is a uid to trust besides this
    user's and root (the client refuses a server running as anyone else). ``timeout_ms``
    bounds each wait for an answer. With ``reconnect`` (the default) a session the server
    ended is opened again on the next call, as the Rust client does. ``capacity`` sets the
    ring slots (default: the Rust client's).

    One thread uses a client at a time: a call while another thread's is in progress raises
    ``ClientBusy``. ``predict`` writes the row into the ring from its own buffer;
    ``predict_batch`` copies the array once (its waits let other threads run, which could
    change the array meanwhile).
    """

    def __init__(
        self,
        endpoint: str,
        model: str,
        version: Optional[int] = None,
        socket_dir: Optional[str] = None,
        layout: Optional[str] = None,
        expected_server_uid: Optional[int] = None,
        timeout_ms: int = 1000,
        reconnect: bool = True,
        capacity: Optional[int] = None,
    ) -> None:
        self._native = _native.Client(
            endpoint,
            model,
            version=version,
            socket_dir=socket_dir,
            layout=layout,
            expected_server_uid=expected_server_uid,
            timeout_ms=timeout_ms,
            reconnect=reconnect,
            capacity=capacity,
        )

    @property
    def feature_count(self) -> int:
        """Features per row."""
        return self._native.feature_count

    @property
    def output_count(self) -> int:
        """Outputs per row."""
        return self._native.output_count

    @property
    def model_version(self) -> int:
        """The model version the session is bound to."""
        return self._native.model_version

    @property
    def in_flight(self) -> int:
        """Requests submitted and not yet polled."""
        return self._native.in_flight

    @property
    def reconnects(self) -> int:
        """Sessions opened again after the server went away."""
        return self._native.reconnects

    def predict(self, features: ArrayLike) -> np.ndarray:
        """One row's outputs (float32, ``output_count`` of them)."""
        return self._native.predict(_rows(features, 1))

    def predict_batch(self, rows: ArrayLike) -> np.ndarray:
        """Outputs of every row of an (n, ``feature_count``) array, in order, as an
        (n, ``output_count``) float32 array. Rows are submitted while the ring has room and
        answers read as they come."""
        return self._native.predict_batch(_rows(rows, 2))

    def submit(
        self,
        features: ArrayLike,
        priority: str = "normal",
        deadline_ns: Optional[int] = None,
    ) -> int:
        """Submits one row without waiting and returns its request id. ``priority``: low,
        normal, high or critical. ``deadline_ns``: a ``monotonic_ns()`` time after which the
        server answers ``Timeout`` instead of running it."""
        return self._native.submit(_rows(features, 1), priority, deadline_ns)

    def poll(self) -> Optional[Tuple[int, np.ndarray]]:
        """The next answer in submission order, ``(request_id, outputs)``, or ``None`` when
        none has come; never waits. An error answer raises its exception, whose
        ``request_id`` names the request."""
        return self._native.poll()

    def close(self) -> None:
        """Ends the session; later calls raise ``ClosedError``."""
        self._native.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
