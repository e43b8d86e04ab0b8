"""The controller process: kopf's TrainingRun handlers and the Temporal worker in one asyncio loop.

`relay controller ARGS` calls `main(argv)`. Flags fall back to env vars (RELAY_TEMPORAL_ADDRESS,
RELAY_TEMPORAL_NAMESPACE, RELAY_VOLUME_ROOT, RELAY_POD_NAMESPACE, RELAY_POLICY). `--policy` is the cluster's
allow-lists for TrainingRuns (`controller.policy`); `--metrics-bind-address` and `--health-bind-address` choose
the interface of each endpoint (default 0.0.0.0: the kubelet probes the pod IP, Prometheus scrapes it).
The Kubernetes connection is the in-cluster service account when present, else KUBECONFIG. The worker runs
the same workflows as `relay run`, with the KubernetesBackend (one Job per leg) and the KubernetesStatusSink.
TrainingSweeps (`controller.sweep.operator`) are handled beside TrainingRuns: their trials are TrainingRuns.

Replicas: every replica runs the Temporal worker; the handlers run only on the holder of a Lease
(`controller.kubernetes.leader`, `--leader-election-*`). A replica that loses the Lease exits (status 1) so
its pod restarts as a candidate: kopf cancels every task started after it in its loop when it stops (kopf's
run_tasks), the worker's activities among them, so handlers cannot stop alone while the worker goes on.
On SIGTERM the leader stops its handlers and releases the Lease, so the next leader starts at its next retry.

Queues: TrainingRuns start on `--task-queue`, predictions on `--inference-task-queue`; each replica polls both.
`--no-handlers` makes a worker-only process (no kopf, no Lease) that adds capacity to the queues it is given.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

import kopf
import kubernetes

from controller.cli import add_log_level_flag, log_level, setup_logging
from controller.kubernetes.backend import KubernetesBackend
from controller.kubernetes.handlers import STATUS_INTERVAL_S, OperatorContext, build_registry
from controller.kubernetes.leader import (
    LEASE_DURATION_S,
    RENEW_DEADLINE_S,
    RETRY_PERIOD_S,
    LeaderElectionError,
    LeadershipLost,
    LeaseElector,
)
from controller.kubernetes.status_sink import KubernetesStatusSink
from controller.kubernetes.temporal_client import connect, tls_config
from controller.policy import Policy, PolicyError
from controller.sweep.kubernetes import KubernetesTrialActivities
from controller.sweep.operator import register_sweep_handlers

log = logging.getLogger("relay.controller")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number")
    return value


def _positive_seconds(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds")
    return value


def _policy(text: str) -> Policy:
    try:
        return Policy.from_json(text)
    except PolicyError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    from controller.worker import INFERENCE_TASK_QUEUE, MAX_CONCURRENT_ACTIVITIES, TASK_QUEUE

    env = os.environ.get
    parser = argparse.ArgumentParser(prog="relay controller", description=__doc__.split("\n")[0])
    parser.add_argument("--temporal-address", default=env("RELAY_TEMPORAL_ADDRESS"), help="HOST:PORT")
    parser.add_argument("--temporal-namespace", default=env("RELAY_TEMPORAL_NAMESPACE", "default"))
    parser.add_argument("--temporal-tls-cert", type=Path, help="client certificate (mTLS)")
    parser.add_argument("--temporal-tls-key", type=Path, help="client key (mTLS)")
    parser.add_argument("--temporal-tls-ca", type=Path, help="CA bundle of the Temporal frontend")
    parser.add_argument("--volume-root", type=Path, default=Path(env("RELAY_VOLUME_ROOT", "/relay-volume")))
    parser.add_argument("--watch-namespace", action="append", default=[], help="repeatable")
    parser.add_argument("--all-namespaces", action="store_true")
    parser.add_argument("--metrics-port", type=int, default=9090)
    parser.add_argument("--health-port", type=int, default=8081)
    parser.add_argument("--metrics-bind-address", default="0.0.0.0", help="interface of /metrics")
    parser.add_argument("--health-bind-address", default="0.0.0.0", help="interface of /healthz and /readyz")
    parser.add_argument(
        "--policy",
        type=_policy,
        default=env("RELAY_POLICY", "{}"),  # a string default goes through type= too
        help='JSON allow-lists: {"priorityClasses": [...], "tolerations": [...], "imageRegistries": [...]}',
    )
    parser.add_argument("--task-queue", default=TASK_QUEUE, help="the training runs' queue (TrainingRuns start there)")
    parser.add_argument(
        "--inference-task-queue", default=INFERENCE_TASK_QUEUE, help="the predictions' queue (`relay predict`)"
    )
    parser.add_argument(
        "--handlers",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run the TrainingRun handlers (--no-handlers: a worker that only adds capacity to the queues)",
    )
    parser.add_argument(
        "--max-concurrent-activities",
        type=_positive_int,
        default=MAX_CONCURRENT_ACTIVITIES,
        help="each running leg holds one; keep it above the number of concurrent TrainingRuns",
    )
    parser.add_argument(
        "--status-interval",
        type=_positive_seconds,
        default=STATUS_INTERVAL_S,
        help="seconds between progress updates in a running TrainingRun's .status (phase changes are at once)",
    )
    parser.add_argument(
        "--leader-elect",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run the handlers only while holding a Lease (needed with more than one replica)",
    )
    parser.add_argument("--leader-election-name", default="relay-controller", help="the Lease's name")
    parser.add_argument(
        "--leader-election-namespace",
        default=env("RELAY_POD_NAMESPACE"),
        help="the Lease's namespace (default: RELAY_POD_NAMESPACE, else the first --watch-namespace)",
    )
    parser.add_argument("--lease-duration", type=_positive_seconds, default=LEASE_DURATION_S)
    parser.add_argument("--renew-deadline", type=_positive_seconds, default=RENEW_DEADLINE_S)
    parser.add_argument("--retry-period", type=_positive_seconds, default=RETRY_PERIOD_S)
    parser.add_argument("--kubeconfig", default=env("KUBECONFIG"), help=argparse.SUPPRESS)
    add_log_level_flag(parser, "info")
    return parser


def kube_configuration(kubeconfig: str | None) -> kubernetes.client.Configuration:
    configuration = kubernetes.client.Configuration()
    try:
        kubernetes.config.load_incluster_config(client_configuration=configuration)
    except kubernetes.config.ConfigException:
        kubernetes.config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)
    configuration.connection_pool_maxsize = 32
    return configuration


def kopf_settings(settings: kopf.OperatorSettings) -> None:
    """No cluster-wide needs: no peering objects, no CRD scanning; progress kept in annotations."""
    settings.peering.standalone = True
    settings.scanning.disabled = True
    settings.persistence.finalizer = "relay.dev/finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="relay.dev")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix="relay.dev", key="last-handled-configuration"
    )
    settings.posting.level = logging.WARNING
    settings.networking.request_timeout = 60


def bearer_token(authorization: str) -> str | None:
    """The token of an Authorization value; in-cluster config writes "bearer <t>", kubeconfigs "Bearer <t>"."""
    scheme, _, rest = authorization.partition(" ")
    token = rest if scheme.lower() == "bearer" else authorization
    return token.strip() or None


def register_login(registry: kopf.OperatorRegistry, configuration: kubernetes.client.Configuration) -> None:
    @kopf.on.login(registry=registry)
    def login(**_: Any) -> kopf.ConnectionInfo:
        auth = configuration.api_key.get("authorization", "") or configuration.api_key.get("BearerToken", "")
        token = bearer_token(auth)
        return kopf.ConnectionInfo(
            server=configuration.host,
            ca_path=configuration.ssl_ca_cert,
            insecure=not configuration.verify_ssl,
            token=token,
            certificate_path=configuration.cert_file,
            private_key_path=configuration.key_file,
        )


_operator = kopf.operator


async def run_controller(
    *,
    temporal: Any,
    configuration: kubernetes.client.Configuration,
    volume_root: Path,
    namespaces: list[str] | None,
    task_queue: str,
    stop: asyncio.Event,
    inference_task_queue: str | None = None,
    handlers: bool = True,
    ready: Any | None = None,
    metrics: Any | None = None,
    max_concurrent_activities: int | None = None,
    status_interval_s: float = STATUS_INTERVAL_S,
    policy: Policy | None = None,
    elector: LeaseElector | None = None,
) -> None:
    """Run until `stop` is set. `namespaces=None` watches all namespaces.

    Workers poll `task_queue` and `inference_task_queue` (None: the training queue alone serves both workflows).
    `handlers=False` runs the workers only: capacity on the queues, no TrainingRun handling, no Lease.

    With an `elector` the handlers start once this replica holds its Lease (the worker runs meanwhile), and
    LeadershipLost is raised, after the handlers stopped, when the Lease could not be renewed.
    """
    from controller.worker import MAX_CONCURRENT_ACTIVITIES, build_workers

    api_client = kubernetes.client.ApiClient(configuration)
    policy = policy or Policy()
    backend = KubernetesBackend(api_client, volume_root=volume_root, policy=policy)
    from controller.observability import MetricsStatusSink, RunEventLog

    sink: Any = RunEventLog(KubernetesStatusSink(api_client))  # each Event also one line of this log
    if metrics is not None:
        sink = MetricsStatusSink(sink, metrics)
    workers = build_workers(
        temporal,
        backend,
        volume_root,
        sink,
        [task_queue, inference_task_queue or task_queue],
        max_concurrent_activities=max_concurrent_activities or MAX_CONCURRENT_ACTIVITIES,
        # Every replica runs a sweep's trial activities: its trials are TrainingRuns the sweep owns.
        sweep_activities=KubernetesTrialActivities(temporal, volume_root, api_client),
    )
    ctx = OperatorContext(temporal, api_client, backend, volume_root, task_queue, status_interval_s, policy=policy)
    registry = build_registry(ctx)
    register_sweep_handlers(registry, temporal, task_queue)  # run, like the TrainingRun handlers, by the leader only
    register_login(registry, configuration)

    @kopf.on.cleanup(registry=registry)  # type: ignore[arg-type]
    async def shut_down_workers(**_: Any) -> None:
        """The workers stop with the handlers, while kopf runs its cleanup: kopf then waits 5 s for the tasks
        started while it ran and cancels the rest, and a worker poll task cancelled so failed its worker, whose
        context manager cancelled this process's main task: a CancelledError traceback and exit 1 on SIGTERM (kopf
        takes SIGTERM itself) once a replica had polled. Shut down one after the other: no new tasks."""
        for worker in workers:
            await worker.shutdown()

    settings = kopf.OperatorSettings()
    kopf_settings(settings)
    lost = asyncio.Event()
    try:
        async with contextlib.AsyncExitStack() as running:
            for worker in workers:
                await running.enter_async_context(worker)
            if not handlers:
                log.info("workers only (--no-handlers) on %s", ", ".join(w.task_queue for w in workers))
                await stop.wait()
                return
            if elector is not None and not await elector.acquire(stop):
                log.info("stopped before leading; shutting the Temporal worker down")
                return
            handlers_stop = stop
            holding: asyncio.Task[None] | None = None
            if elector is not None:
                # Started before kopf, so kopf's shutdown leaves it alone; it ends the handlers on either event.
                handlers_stop = asyncio.Event()
                holding = asyncio.create_task(_hold(elector, stop, lost, handlers_stop))
            try:
                await _operator(
                    registry=registry,
                    settings=settings,
                    standalone=True,
                    namespaces=namespaces or [],
                    clusterwide=namespaces is None,
                    stop_flag=handlers_stop,
                    ready_flag=ready,
                )
            finally:
                if holding is not None and elector is not None:
                    holding.cancel()
                    if not lost.is_set():
                        await asyncio.to_thread(elector.release)
            log.info("operator stopped; shutting the Temporal worker down")
    finally:
        await backend.close()
        api_client.close()
    if lost.is_set():
        raise LeadershipLost(f"lease {elector.namespace}/{elector.name} lost by {elector.identity}" if elector else "")


async def _hold(elector: LeaseElector, stop: asyncio.Event, lost: asyncio.Event, handlers_stop: asyncio.Event) -> None:
    """Renew the Lease until `stop` or a failed renewal, then stop the handlers."""
    try:
        await elector.hold(stop, lost)
    finally:
        handlers_stop.set()


async def _amain(args: argparse.Namespace) -> int:
    if not args.temporal_address:
        print("relay controller: --temporal-address (or RELAY_TEMPORAL_ADDRESS) is required", file=sys.stderr)
        return 2
    namespaces: list[str] | None
    if args.all_namespaces:
        namespaces = None
    else:
        namespaces = args.watch_namespace or [os.environ.get("RELAY_POD_NAMESPACE", "")]
        if not namespaces[0]:
            print("relay controller: give --watch-namespace, --all-namespaces or RELAY_POD_NAMESPACE", file=sys.stderr)
            return 2
    tls = tls_config(args.temporal_tls_ca, args.temporal_tls_cert, args.temporal_tls_key)
    configuration = kube_configuration(args.kubeconfig)
    elector = None
    if args.leader_elect and args.handlers:
        lease_namespace = args.leader_election_namespace or (namespaces[0] if namespaces else "")
        if not lease_namespace:
            print("relay controller: --leader-election-namespace (or RELAY_POD_NAMESPACE) is required", file=sys.stderr)
            return 2
        try:
            elector = LeaseElector(
                kubernetes.client.ApiClient(configuration),
                lease_namespace,
                args.leader_election_name,
                lease_duration_s=args.lease_duration,
                renew_deadline_s=args.renew_deadline,
                retry_period_s=args.retry_period,
            )
        except LeaderElectionError as exc:
            print(f"relay controller: {exc}", file=sys.stderr)
            return 2
    temporal = await connect(args.temporal_address, args.temporal_namespace, tls)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    observability = None
    try:
        from controller.observability import start_observability_server

        observability = start_observability_server(
            args.health_port,
            args.metrics_port,
            host=args.health_bind_address,
            metrics_host=args.metrics_bind_address,
        )
        observability.set_ready(True)
    except ImportError:
        log.warning("controller.observability not available: no health/metrics server")
    try:
        await run_controller(
            temporal=temporal,
            configuration=configuration,
            volume_root=args.volume_root,
            namespaces=namespaces,
            task_queue=args.task_queue,
            inference_task_queue=args.inference_task_queue,
            handlers=args.handlers,
            stop=stop,
            metrics=observability.metrics if observability is not None else None,
            max_concurrent_activities=args.max_concurrent_activities,
            status_interval_s=args.status_interval,
            policy=args.policy,
            elector=elector,
        )
    except LeadershipLost as exc:
        print(f"relay controller: {exc}; exiting so the pod restarts as a candidate", file=sys.stderr)
        return 1
    finally:
        if observability is not None:
            observability.close()
    return 0


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        setup_logging(log_level(args.log_level, args.log_level_default), timestamps=True)
    except ValueError as exc:
        print(f"relay controller: {exc}", file=sys.stderr)
        return 2
    try:
        return asyncio.run(_amain(args))
    except (OSError, kubernetes.config.ConfigException) as exc:
        print(f"relay controller: {exc}", file=sys.stderr)
        return 1
