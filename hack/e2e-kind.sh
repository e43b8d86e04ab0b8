#!/usr/bin/env bash
# End-to-end test on a kind cluster: the chart, the images and a preempted TrainingRun, for real.
#
#   make e2e-kind                      (needs docker, kind, kubectl, helm and network for the base images)
#   KEEP_CLUSTER=1 make e2e-kind       keep the cluster afterwards for a look around
#
# Steps: create the cluster (or reuse it), build both images as `make images` does (hack/build-images.sh: the
# controller and the CPU trainer) and load them into the node, `helm install`
# with the embedded Temporal dev server, apply manifests/examples/tiny-cpu.yaml, wait for a verified
# checkpoint, delete the trainer pod mid-run (a preemption: SIGTERM, emergency checkpoint, exit 75),
# and wait for the run to reach Succeeded after resuming in a second leg. On failure it prints what
# a person would look at: the run, its events, the pods and the controller's log.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\n==> %s\n' "$*"; }
die() { printf '\nE2E FAILED: %s\n' "$*" >&2; exit 1; }
for tool in docker kind kubectl helm; do
  command -v "$tool" > /dev/null || die "$tool is not installed (see README: end-to-end on kind)"
done

CLUSTER=${KIND_CLUSTER:-relay-e2e}
NAMESPACE=${E2E_NAMESPACE:-relay-e2e}
RELEASE=${E2E_RELEASE:-relay}
RUN=tiny-cpu
# Images: exactly the ones the rendered chart and the example name, so nothing is rewritten or pulled by the node.
RENDERED=$(helm template "$RELEASE" helm/relay --namespace "$NAMESPACE" -f hack/e2e-kind-values.yaml)
CONTROLLER_IMAGE=$(sed -n 's/^ *image: "\(.*relay-controller:[^"]*\)"$/\1/p' <<< "$RENDERED")
TEMPORAL_IMAGE=$(sed -n 's/^ *image: "\(.*temporal:[^"]*\)"$/\1/p' <<< "$RENDERED")
TRAINER_IMAGE=$(sed -n 's/^  image: *//p' "manifests/examples/${RUN}.yaml")
TIMEOUT_S=${E2E_TIMEOUT_S:-1200}
POLL_S=${E2E_POLL_S:-2}
[ -n "$CONTROLLER_IMAGE" ] && [ -n "$TEMPORAL_IMAGE" ] && [ -n "$TRAINER_IMAGE" ] || die "could not find the images to build"
KUBECTL=(kubectl --context "kind-${CLUSTER}")

diagnose() {
  local code=$?
  [ "$code" -eq 0 ] && return
  printf '\n==> diagnostics (exit %s)\n' "$code"
  "${KUBECTL[@]}" -n "$NAMESPACE" get trainingruns,jobs,pods,pvc -o wide || true
  "${KUBECTL[@]}" -n "$NAMESPACE" describe trainingrun "$RUN" || true
  "${KUBECTL[@]}" -n "$NAMESPACE" get events --sort-by=.lastTimestamp | tail -n 40 || true
  "${KUBECTL[@]}" -n "$NAMESPACE" logs "deployment/${RELEASE}" --tail=200 || true
  "${KUBECTL[@]}" -n "$NAMESPACE" logs -l "relay.dev/run=${RUN}" --tail=50 --prefix || true
}
cleanup() {
  diagnose
  if [ "${KEEP_CLUSTER:-0}" != 1 ]; then kind delete cluster --name "$CLUSTER" > /dev/null 2>&1 || true; fi
}
trap cleanup EXIT

# jsonpath of the TrainingRun, empty while absent.
run_field() { "${KUBECTL[@]}" -n "$NAMESPACE" get trainingrun "$RUN" -o "jsonpath={$1}" 2> /dev/null || true; }

wait_for() {  # wait_for <seconds> <description> <command...>: poll every POLL_S seconds
  local limit=$1 what=$2; shift 2
  local deadline=$((SECONDS + limit))
  until "$@"; do
    [ "$SECONDS" -lt "$deadline" ] || die "timed out after ${limit}s waiting for ${what}"
    sleep "$POLL_S"
  done
}

log "kind cluster ${CLUSTER}"
if ! kind get clusters 2> /dev/null | grep -qx "$CLUSTER"; then
  kind create cluster --name "$CLUSTER" --wait 180s
fi

log "images: ${CONTROLLER_IMAGE}, ${TRAINER_IMAGE}"
CONTROLLER_IMAGE="$CONTROLLER_IMAGE" TRAINER_IMAGE="$TRAINER_IMAGE" hack/build-images.sh
docker pull "$TEMPORAL_IMAGE"
kind load docker-image --name "$CLUSTER" "$CONTROLLER_IMAGE" "$TRAINER_IMAGE" "$TEMPORAL_IMAGE"

log "helm install ${RELEASE} (embedded Temporal dev server)"
helm --kube-context "kind-${CLUSTER}" upgrade --install "$RELEASE" helm/relay \
  --namespace "$NAMESPACE" --create-namespace -f hack/e2e-kind-values.yaml --wait --timeout 5m
"${KUBECTL[@]}" -n "$NAMESPACE" rollout status "deployment/${RELEASE}" --timeout=180s

log "TrainingRun ${RUN}"
"${KUBECTL[@]}" -n "$NAMESPACE" delete trainingrun "$RUN" --ignore-not-found --wait=true
"${KUBECTL[@]}" -n "$NAMESPACE" apply -f "manifests/examples/${RUN}.yaml"

has_checkpoint_and_runs() {
  local phase step pods
  phase=$(run_field .status.phase)
  [ "$phase" = Succeeded ] && die "the run finished before its pod could be deleted: make ${RUN} longer"
  [ "$phase" = Failed ] && die "the run failed before the preemption: $(run_field .status.message)"
  step=$(run_field .status.latestCheckpoint.step)
  pods=$("${KUBECTL[@]}" -n "$NAMESPACE" get pods -l "relay.dev/run=${RUN}" --field-selector=status.phase=Running -o name)
  printf '  phase=%s checkpoint-step=%s running=%s\n' "${phase:-?}" "${step:-none}" "${pods:-none}"
  [ -n "$step" ] && [ "$step" -gt 0 ] && [ -n "$pods" ]
}
wait_for 600 "a verified checkpoint while the first leg runs" has_checkpoint_and_runs

POD=$("${KUBECTL[@]}" -n "$NAMESPACE" get pods -l "relay.dev/run=${RUN}" --field-selector=status.phase=Running -o name | head -n 1)
log "preempting: kubectl delete ${POD} (SIGTERM; the trainer saves and exits 75)"
"${KUBECTL[@]}" -n "$NAMESPACE" delete "$POD" --wait=false

is_done() {
  local phase
  phase=$(run_field .status.phase)
  printf '  phase=%s step=%s legs=%s preemptions=%s\n' "${phase:-?}" "$(run_field .status.step)" \
    "$(run_field .status.legCount)" "$(run_field .status.preemptions)"
  [ "$phase" = Failed ] && die "the run failed: $(run_field .status.message)"
  [ "$phase" = Succeeded ]
}
wait_for "$TIMEOUT_S" "phase Succeeded" is_done

PREEMPTIONS=$(run_field .status.preemptions)
LEGS=$(run_field .status.legCount)
[ "${PREEMPTIONS:-0}" -ge 1 ] || die "expected at least one preemption in the status, got '${PREEMPTIONS}'"
[ "${LEGS:-0}" -ge 2 ] || die "expected a second leg after the preemption, got '${LEGS}'"
"${KUBECTL[@]}" -n "$NAMESPACE" get trainingrun "$RUN"
"${KUBECTL[@]}" -n "$NAMESPACE" get events --field-selector "involvedObject.name=${RUN}" --sort-by=.lastTimestamp

log "E2E PASSED: ${RUN} Succeeded after ${PREEMPTIONS} preemption(s) in ${LEGS} legs"
