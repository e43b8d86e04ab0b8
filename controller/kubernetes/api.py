"""Call the Kubernetes API from asyncio: one blocking client call in a thread, transient failures retried.

Every controller-side API call goes through `call_with_retry`: connection errors, 408, 429 and 5xx are
retried with exponential backoff (0.2 s doubling to 10 s) until `retry_s` is spent, then surface as
`KubernetesUnavailable`, which callers treat as "try again later", never as a leg's or a run's outcome.
Any other error (404, 409, 422, ...) is raised at once for the caller to judge.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any, TypeVar

from kubernetes.client.rest import ApiException
from urllib3.exceptions import HTTPError

log = logging.getLogger(__name__)
T = TypeVar("T")
TRANSIENT_STATUS = frozenset({0, 408, 429, 500, 502, 503, 504})


class KubernetesUnavailable(RuntimeError):
    """The API server kept failing with transient errors; the caller retries later (not a leg failure)."""


def is_transient(exc: BaseException) -> bool:
    if isinstance(exc, ApiException):
        return (exc.status or 0) in TRANSIENT_STATUS
    return isinstance(exc, HTTPError | OSError)


async def call_with_retry(
    fn: Callable[..., T], *args: Any, retry_s: float, executor: Executor | None = None, **kwargs: Any
) -> T:
    """`fn(*args, **kwargs)` in `executor` (the loop's default when None), transient failures retried."""
    loop = asyncio.get_running_loop()
    deadline = time.monotonic() + retry_s
    delay = 0.2
    call = functools.partial(fn, *args, **kwargs)
    while True:
        try:
            return await loop.run_in_executor(executor, call)
        except Exception as exc:
            if not is_transient(exc):
                raise
            if time.monotonic() + delay > deadline:
                raise KubernetesUnavailable(f"Kubernetes API kept failing: {exc}") from exc
            log.warning("Kubernetes API call %s failed (%s); retrying in %.1fs", _name(fn), exc, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)


def _name(fn: Callable[..., Any]) -> str:
    return getattr(fn, "__name__", type(fn).__name__)
