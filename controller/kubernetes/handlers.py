"""The TrainingRun operator's kopf handlers: thin, each validates, then starts, signals or cancels a workflow.

- create / resume (controller restart): check what the schema cannot (PVC exists, paths stay inside the
  volume, dataset file present, name length); on bad input set a Failed condition naming the field and
  start nothing; else start `CheckpointedBertTrainingWorkflow` with id `trainingrun-<ns>.<name>` and
  conflict policy USE_EXISTING, so a running workflow of this object is adopted, never duplicated.
  "This object" is checked, not assumed (`controller.run_workflows`): the workflow's input must name this
  namespace, name and metadata.uid. A run started by an older controller under the legacy id is adopted
  only on that proof; a workflow under the id that belongs to another (deleted) object of the same name,
  or to nobody, is terminated and this object starts fresh.
- `spec.suspend` changes: signal `pause` / `resume` (the value spec.suspend holds now) to this object's
  workflow; other spec changes are reported, not applied. A timer re-signals a run whose phase still
  contradicts spec.suspend once the object has been quiet for SUSPEND_RECONCILE_S (a lost edge never strands it).
- delete: kopf's finalizer holds the object until this object's workflow is cancelled and the leg Jobs
  deleted (owner references would remove them too); a same-named object's workflow is never touched.
- stop (SIGTERM, e.g. `helm uninstall`): the finalizer is taken off every TrainingRun this controller
  handled, so deleting a run, or its namespace, does not hang once no controller runs. Nothing depends on
  it: leg and predict Jobs are owned by the TrainingRun (the garbage collector deletes them), and a
  workflow whose object is gone fails at its next launch (`RunIdentityMismatch`: not found). A controller
  that starts again puts its finalizer back on every object it resumes.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, cast

import kopf
import kubernetes
from kubernetes.client.rest import ApiException
from temporalio.client import Client
from temporalio.common import WorkflowIDConflictPolicy, WorkflowIDReusePolicy
from temporalio.exceptions import WorkflowAlreadyStartedError
from temporalio.service import RPCError, RPCStatusCode

from controller.kubernetes.backend import KubernetesBackend, multinode_refusal
from controller.policy import Policy, check_policy
from controller.run_workflows import describe_run_workflow, find_run_workflow
from controller.spec import (
    API_GROUP,
    API_VERSION,
    PLURAL,
    CustomResourceStatus,
    InvalidTrainingRun,
    legacy_workflow_id,
    parse_training_run,
    workflow_id,
)
from controller.status import Phase, RunStatus, rfc3339
from controller.visibility import check_search_attributes, initial_attributes

log = logging.getLogger(__name__)
WORKFLOW = "CheckpointedBertTrainingWorkflow"
FINISHED_PHASES = {Phase.SUCCEEDED.value, Phase.FAILED.value, Phase.CANCELLED.value}
# How often a running TrainingRun's progress (step, loss, newest checkpoint) reaches its .status: each time
# costs two workflow tasks, two activities and a status PATCH per run, which with hundreds of runs is most of
# what the controller and Temporal do. Phase changes (a leg ends, is preempted, the run pauses or finishes)
# do not wait for it: the Job/pod watch wakes the workflow at once. `relay controller --status-interval`.
STATUS_INTERVAL_S = 30.0
# How often a leg's watch (await_leg) re-reads progress from the volume and heartbeats within that interval;
# every interval still ends with a fresh read, the one .status shows.
PROGRESS_POLL_S = 10.0
# How long a TrainingRun's phase may disagree with spec.suspend, the object unchanged, before it is re-signalled.
SUSPEND_RECONCILE_S = 5.0
RUNNING_PHASES = {Phase.PENDING.value, Phase.SNAPSHOTTING.value, Phase.RUNNING.value}


@dataclass
class OperatorContext:
    """What the handlers need, handed in by main (or a test)."""

    temporal: Client
    api_client: kubernetes.client.ApiClient
    backend: KubernetesBackend
    volume_root: Path
    task_queue: str
    status_interval_s: float = STATUS_INTERVAL_S
    policy: Policy = field(default_factory=Policy)  # `relay controller --policy`


def check_beyond_schema(document: dict[str, Any], volume_root: Path, core: kubernetes.client.CoreV1Api) -> list[str]:
    """`field: message` lines for what the CRD schema cannot express; empty when the run may start."""
    try:
        run = parse_training_run(document, "TrainingRun")
    except InvalidTrainingRun as exc:
        return [f"{field}: {message}" for field, message in exc.errors]
    errors = []
    spec, namespace = run.spec, run.metadata.namespace
    model = PurePosixPath(spec.model)
    if model.is_absolute() or ".." in model.parts:
        errors.append(f"spec.model: {spec.model!r} must be 'tiny', a hub id or a path inside the volume")
    if spec.dataset.path is not None and not (volume_root / spec.dataset.path).is_file():
        errors.append(f"spec.dataset.path: {spec.dataset.path!r} not found on the volume")
    try:
        core.read_namespaced_persistent_volume_claim(spec.storage.claim_name, namespace)
    except ApiException as exc:
        if exc.status != 404:
            raise
        errors.append(
            f"spec.storage.claimName: PersistentVolumeClaim {spec.storage.claim_name!r} not found in {namespace}"
        )
    return errors


def suspend_mismatch(body: Any) -> bool | None:
    """The spec.suspend value to signal again when the run's phase contradicts it; None when they agree."""
    wanted = bool((body.get("spec") or {}).get("suspend"))
    status = body.get("status") or {}
    phase = status.get("phase")
    if wanted:
        return True if phase in RUNNING_PHASES and status.get("workflowId") else None
    paused_by_spec = any(
        c.get("type") == "Suspended" and c.get("status") == "True" and c.get("message") == "spec.suspend"
        for c in status.get("conditions") or []
    )
    return False if phase == Phase.PAUSED.value and paused_by_spec else None


def invalid_status(errors: list[str]) -> dict[str, Any]:
    now = rfc3339(time.time())
    status = RunStatus(phase=Phase.FAILED, message="; ".join(errors), finished_at=now)
    status.set_condition("Failed", "True", "Invalid", "; ".join(errors), now)
    status.set_condition("Ready", "False", "Invalid", "the TrainingRun cannot run as written", now)
    return CustomResourceStatus.from_run_status(status).model_dump(mode="json", by_alias=True)


def build_registry(ctx: OperatorContext) -> kopf.OperatorRegistry:
    registry = kopf.OperatorRegistry()
    resource = (API_GROUP, API_VERSION, PLURAL)
    core = kubernetes.client.CoreV1Api(ctx.api_client)
    custom = kubernetes.client.CustomObjectsApi(ctx.api_client)
    handled_namespaces: set[str] = set()  # where this controller's finalizer may be, released on stop

    async def start(body: kopf.Body, patch: kopf.Patch, reason: str) -> None:
        document = {key: body[key] for key in ("apiVersion", "kind", "metadata", "spec") if key in body}
        namespace, name = body["metadata"]["namespace"], body["metadata"]["name"]
        handled_namespaces.add(namespace)
        if (body.get("status") or {}).get("phase") in FINISHED_PHASES:
            return
        from controller.workflows import TrainingRunInput  # temporalio workflow module: import when needed

        errors = await ctx.backend.call(check_beyond_schema, document, ctx.volume_root, core)
        if not errors:  # the cluster's allow-lists (controller.policy), on a spec that parses
            errors = check_policy(parse_training_run(document).spec, ctx.policy)
        if not errors:  # what this API server can run (a multi-node leg needs Indexed Jobs)
            refused = multinode_refusal(parse_training_run(document).spec, await ctx.backend.server())
            errors = [refused] if refused else []
        if errors:
            log.warning("%s/%s is invalid: %s", namespace, name, "; ".join(errors))
            patch.status.update(invalid_status(errors))
            kopf.warn(body, reason="Invalid", message="; ".join(errors))
            return
        run = parse_training_run(document)
        uid = str(body["metadata"]["uid"])
        wf_id = workflow_id(namespace, name)
        current = await describe_run_workflow(ctx.temporal, wf_id)
        if current is None or not current.belongs_to(namespace, name, uid):
            legacy = await describe_run_workflow(ctx.temporal, legacy_workflow_id(namespace, name))
            if legacy is not None and legacy.belongs_to(namespace, name, uid):
                # Started by a controller before issue 11 for this very object: adopt it where it is (signals
                # and deletion find it through find_run_workflow). Once finished it is not run again.
                log.info("%s/%s: adopted workflow %s (legacy id)", namespace, name, legacy.workflow_id)
                return
        foreign = current is not None and not current.belongs_to(namespace, name, uid)
        if current is not None and foreign and current.running:
            # Another object's (a same-named run deleted while no controller watched) or nobody's (started by
            # hand): it must not train into this object's folder nor be adopted as this object's.
            await current.handle(ctx.temporal).terminate(reason=f"not TrainingRun {namespace}/{name} uid {uid}")
            log.warning("%s/%s: terminated workflow %s, whose input is not this object's", namespace, name, wf_id)
        run_input = TrainingRunInput(
            namespace=namespace,
            name=name,
            spec=run.spec,
            owner_uid=uid,
            await_window_s=ctx.status_interval_s,
            poll_interval_s=min(PROGRESS_POLL_S, ctx.status_interval_s),
        )
        check = await check_search_attributes(ctx.temporal)
        if not check.complete:  # the run works without them; `relay list` reads the memo
            log.warning("%s/%s: %s", namespace, name, check.message(ctx.temporal.namespace))
            kopf.warn(body, reason="SearchAttributesMissing", message=check.message(ctx.temporal.namespace))
        try:
            await ctx.temporal.start_workflow(
                WORKFLOW,
                run_input,
                id=wf_id,
                task_queue=ctx.task_queue,
                id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
                search_attributes=initial_attributes(namespace, name, run.spec.model, check.registered),
                # A restarted controller must not re-run this object's finished workflow; a new object may
                # reuse the id of a same-named predecessor's.
                id_reuse_policy=(
                    WorkflowIDReusePolicy.ALLOW_DUPLICATE
                    if reason == "create" or foreign
                    else WorkflowIDReusePolicy.REJECT_DUPLICATE
                ),
            )
        except WorkflowAlreadyStartedError:
            log.info("%s/%s: workflow already ran; not started again", namespace, name)
            return
        log.info("%s/%s: workflow %s running", namespace, name, wf_id)

    @kopf.on.create(*resource, registry=registry)
    async def on_create(body: kopf.Body, patch: kopf.Patch, **_: Any) -> None:
        await start(body, patch, "create")

    @kopf.on.resume(*resource, registry=registry)
    async def on_resume(body: kopf.Body, patch: kopf.Patch, **_: Any) -> None:
        await start(body, patch, "resume")

    async def signal_suspend(body: kopf.Body, suspend: bool) -> None:
        """Signal the state spec.suspend wants now; the workflow's pause/resume are idempotent."""
        from controller.workflows import PauseRequest, ResumeRequest

        namespace, name = body["metadata"]["namespace"], body["metadata"]["name"]
        found = await find_run_workflow(ctx.temporal, namespace, name, str(body["metadata"]["uid"]))
        if found is None:
            raise kopf.TemporaryError(f"no workflow of {namespace}/{name} yet to signal", delay=5)
        handle = found.handle(ctx.temporal)
        if suspend:
            await handle.signal("pause", PauseRequest(reason="spec.suspend"))
        else:
            await handle.signal("resume", ResumeRequest(reason="spec.suspend"))

    # One handler for the whole update cause: kopf's default lifecycle runs one handler per cycle and marks it
    # done for the cause, so with a second spec handler a spec.suspend true -> false flip that landed between
    # the two cycles was never signalled (the run stayed Paused with spec.suspend false).
    @kopf.on.update(*resource, field="spec", registry=registry)
    async def on_spec_change(body: kopf.Body, diff: kopf.Diff, old: Any, **_: Any) -> None:
        paths = {tuple(map(str, d[1])) for d in diff}
        if any(path[:1] == ("suspend",) for path in paths):
            # The value the object holds now (level), not the diff's: a retry may see a later body.
            wanted = bool(body["spec"].get("suspend"))
            await signal_suspend(body, wanted)
            if wanted != bool((old or {}).get("suspend")):
                kopf.info(body, reason="Suspended" if wanted else "Resumed", message=f"spec.suspend set to {wanted}")
        changed = sorted(".".join(path) for path in paths if path[:1] != ("suspend",))
        if changed:
            kopf.warn(
                body,
                reason="SpecChangeIgnored",
                message=f"spec.{', spec.'.join(changed)} changed; a running TrainingRun only honours spec.suspend",
            )

    # Level-triggered safety net: a run whose phase disagrees with spec.suspend for SUSPEND_RECONCILE_S, with
    # nothing changing on the object, is signalled again. Only a spec.suspend pause is undone (`relay pause`
    # pauses with another reason).
    @kopf.timer(
        *resource,
        interval=SUSPEND_RECONCILE_S,
        idle=SUSPEND_RECONCILE_S,
        when=lambda body, **_: suspend_mismatch(body) is not None,
        registry=registry,
    )
    async def reconcile_suspend(body: kopf.Body, **_: Any) -> None:
        wanted = suspend_mismatch(body)
        if wanted is None:
            return
        namespace, name = body["metadata"]["namespace"], body["metadata"]["name"]
        await signal_suspend(body, wanted)
        log.info("%s/%s: phase disagreed with spec.suspend %s; signalled again", namespace, name, wanted)
        if not wanted:  # a Paused run the resume never reached: the change the handler missed
            kopf.info(body, reason="Resumed", message="spec.suspend set to False")

    @kopf.on.delete(*resource, registry=registry)
    async def on_delete(body: kopf.Body, **_: Any) -> None:
        namespace, name = body["metadata"]["namespace"], body["metadata"]["name"]
        try:
            found = await find_run_workflow(ctx.temporal, namespace, name, str(body["metadata"]["uid"]))
            if found is not None and found.running:
                await found.handle(ctx.temporal).cancel()
                log.info("%s/%s: deleted; workflow %s cancelled", namespace, name, found.workflow_id)
        except RPCError as exc:
            if exc.status != RPCStatusCode.NOT_FOUND:
                raise kopf.TemporaryError(f"cannot cancel the workflow yet: {exc}", delay=5) from exc
        await ctx.backend.cleanup(namespace, name)

    @kopf.on.cleanup(registry=registry)
    async def release_finalizers(settings: kopf.OperatorSettings, **_: Any) -> None:
        """Take this controller's finalizer off its TrainingRuns as it stops: a finalizer without a controller
        left `helm uninstall`'s runs, and their namespaces, stuck in Terminating (issue 11). kopf runs this
        after its watches have ended, so nothing puts the finalizer back until a controller starts again."""
        finalizer = settings.persistence.finalizer
        for namespace in sorted(handled_namespaces):
            listing = await ctx.backend.call(
                custom.list_namespaced_custom_object, API_GROUP, API_VERSION, namespace, PLURAL
            )
            for item in cast(dict[str, Any], listing).get("items", []):  # the client types custom objects as object
                metadata = item["metadata"]
                if finalizer not in (metadata.get("finalizers") or []):
                    continue
                kept = [f for f in metadata["finalizers"] if f != finalizer]
                # resourceVersion: a concurrent change wins (409), and the next controller sees the object.
                body = {"metadata": {"finalizers": kept, "resourceVersion": metadata["resourceVersion"]}}
                try:
                    await ctx.backend.call(
                        custom.patch_namespaced_custom_object,
                        API_GROUP,
                        API_VERSION,
                        namespace,
                        PLURAL,
                        metadata["name"],
                        body,
                    )
                except ApiException as exc:
                    if exc.status not in (404, 409):
                        raise
            log.info("%s: finalizers released (controller stopping)", namespace)

    return registry
