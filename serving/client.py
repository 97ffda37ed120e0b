"""A small Python client of the scoring API::

    with ScoringClient("127.0.0.1:50051", api_key="crm_...") as client:
        score = client.get_score("c-42")
        print(score.rfm.frequency, score.net_monetary)

Every call carries the API key (``authorization: Bearer``) and a deadline; errors are
``grpc.RpcError`` with the server's status code and message.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from crmscore.settings import Settings
from crmscore.v1 import scoring_pb2, scoring_pb2_grpc


class ScoringClient:
    def __init__(
        self,
        address: str,
        api_key: str | None = None,
        *,
        tls: bool = False,
        root_certificates: bytes | None = None,
        private_key: bytes | None = None,
        certificate_chain: bytes | None = None,
        timeout: float = 5.0,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        """Connect to ``address``; TLS when ``tls`` or any certificate is given
        (``root_certificates`` None trusts the system's CAs)."""
        self.address = address
        self.timeout = timeout
        self._metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()
        if tls or root_certificates or certificate_chain:
            credentials = grpc.ssl_channel_credentials(
                root_certificates, private_key, certificate_chain
            )
            self.channel = grpc.secure_channel(address, credentials, options=list(options))
        else:
            self.channel = grpc.insecure_channel(address, options=list(options))
        self.stub = scoring_pb2_grpc.ScoringStub(self.channel)
        self._health = health_pb2_grpc.HealthStub(self.channel)

    @classmethod
    def from_settings(cls, settings: Settings, address: str | None = None) -> ScoringClient:
        def read(path: str) -> bytes | None:
            return Path(path).read_bytes() if path else None

        return cls(
            address or settings.grpc_address,
            settings.api_key or None,
            root_certificates=read(settings.tls_ca),
            private_key=read(settings.tls_client_key),
            certificate_chain=read(settings.tls_client_cert),
            tls=bool(settings.tls_ca),
            timeout=settings.grpc_timeout,
        )

    # -- calls ---------------------------------------------------------------------------

    def get_score(self, customer_id: str, timeout: float | None = None) -> Any:
        return self.stub.GetScore(
            scoring_pb2.GetScoreRequest(customer_id=customer_id), **self._opts(timeout)
        )

    def batch_get_scores(self, customer_ids: Iterable[str], timeout: float | None = None) -> Any:
        request = scoring_pb2.BatchGetScoresRequest(customer_ids=list(customer_ids))
        return self.stub.BatchGetScores(request, **self._opts(timeout))

    def watch(self, customer_id: str, timeout: float | None = None) -> Any:
        """The customer's score stream: iterate it; ``.cancel()`` ends it. No deadline
        unless ``timeout`` is given."""
        return self.stub.WatchCustomer(
            scoring_pb2.WatchCustomerRequest(customer_id=customer_id),
            timeout=timeout, metadata=self._metadata,
        )

    def pipeline_status(self, timeout: float | None = None) -> Any:
        return self.stub.GetPipelineStatus(
            scoring_pb2.GetPipelineStatusRequest(), **self._opts(timeout)
        )

    def model_report(self, timeout: float | None = None) -> Any:
        return self.stub.GetModelReport(scoring_pb2.GetModelReportRequest(), **self._opts(timeout))

    def alert_report(self, timeout: float | None = None) -> Any:
        return self.stub.GetAlertReport(scoring_pb2.GetAlertReportRequest(), **self._opts(timeout))

    def list_segments(self, timeout: float | None = None) -> Any:
        return self.stub.ListSegments(scoring_pb2.ListSegmentsRequest(), **self._opts(timeout))

    def health(self, service: str = "", timeout: float | None = None) -> str:
        """The server's health status name, e.g. 'SERVING'."""
        response = self._health.Check(
            health_pb2.HealthCheckRequest(service=service), timeout=timeout or self.timeout
        )
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))

    def wait_ready(self, timeout: float = 10.0) -> None:
        grpc.channel_ready_future(self.channel).result(timeout=timeout)

    # -- plumbing ------------------------------------------------------------------------

    def _opts(self, timeout: float | None) -> dict[str, Any]:
        return {"timeout": timeout or self.timeout, "metadata": self._metadata}

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> ScoringClient:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def stream(call: Any) -> Iterator[Any]:
    """Iterate a watch call, ending quietly when it was cancelled."""
    try:
        yield from call
    except grpc.RpcError as exc:
        if exc.code() != grpc.StatusCode.CANCELLED:
            raise
