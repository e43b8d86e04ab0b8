"""Connect to the controller's Temporal server: address, namespace and optional (m)TLS from files.

`relay controller` (its Temporal worker) and the CLI's remote commands (`relay status --task-queue ...`,
against the controller's frontend) connect the same way; this is that one way. Imports no Kubernetes client.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from temporalio.client import Client, TLSConfig


def tls_config(ca: Path | None, cert: Path | None, key: Path | None) -> TLSConfig | bool:
    """TLS settings from PEM files (CA bundle of the frontend; client certificate and key for mTLS), or False
    when neither a CA nor a certificate is given. An unreadable file raises OSError naming it."""
    from temporalio.client import TLSConfig

    if not (ca or cert):
        return False
    return TLSConfig(
        server_root_ca_cert=ca.read_bytes() if ca else None,
        client_cert=cert.read_bytes() if cert else None,
        client_private_key=key.read_bytes() if key else None,
    )


async def connect(address: str, namespace: str, tls: TLSConfig | bool = False) -> Client:
    """A client with Relay's data converter (pydantic models in and out of everything)."""
    from temporalio.client import Client

    from controller.worker import DATA_CONVERTER

    return await Client.connect(address, namespace=namespace, tls=tls, data_converter=DATA_CONVERTER)
