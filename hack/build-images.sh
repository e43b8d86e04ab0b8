#!/usr/bin/env bash
# Build both images with the tags the chart and the TrainingRun default name: the controller and a CPU trainer.
#
#   make images                                   (or hack/build-images.sh)
#   PYTHON_IMAGE=python:3.11.11-slim-bookworm make images           the base of both images
#   CONTROLLER_IMAGE=... TRAINER_IMAGE=... hack/build-images.sh      other tags (hack/e2e-kind.sh: the chart's)
#
# The CPU trainer gets torch from a wheel put into the build context (build/wheels/, git-ignored) at the tests'
# pin (TORCH_SPEC, the Makefile's), so a leg in the image and a leg in the tests run the same torch build: from
# build/wheels or pip's own find-links when there (no download), else from TORCH_INDEX_URL (PyTorch's CPU index).
# The base: PYTHON_IMAGE when set; else relay-base/python:3.11-bookworm when present (a machine that cannot
# pull: ../shared/containers/base-image.sh makes it); else the Dockerfiles' default python:3.11 slim image.
# Both builds use --network host: pip inside a build needs it where the engine has no bridge network.
# DOCKER_BUILDKIT=1 builds with BuildKit (0: the legacy builder). A Docker CLI of 23 or later does BuildKit only
# through the buildx plugin; without it, name a client with BuildKit built in (CLI 18.09 to 22.x) in DOCKER, as
# here: DOCKER_BUILDKIT=1 DOCKER=/usr/bin/docker make images (Debian's docker.io 20.10 client beside a 28.x one).
set -euo pipefail
cd "$(dirname "$0")/.."

REGISTRY=${IMAGE_REGISTRY:-ghcr.io/relay-ml}
TAG=${IMAGE_TAG:-$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\}$/\1/p' helm/relay/Chart.yaml)}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
PYTHON=${PYTHON:-.venv/bin/python}
DOCKER=${DOCKER:-docker}
LOCAL_BASE=relay-base/python:3.11-bookworm
WHEELS=build/wheels

die() { printf 'build-images: %s\n' "$*" >&2; exit 1; }
command -v "$DOCKER" > /dev/null || die "no docker client: '$DOCKER' is not installed"
"$DOCKER" info > /dev/null 2>&1 || die "no Docker engine answers ($DOCKER info failed)"
if [ "${DOCKER_BUILDKIT:-}" = 1 ] && ! "$DOCKER" buildx version > /dev/null 2>&1; then
  client=$("$DOCKER" version --format '{{.Client.Version}}' 2> /dev/null || true)
  if [[ "${client%%.*}" =~ ^[0-9]+$ ]] && [ "${client%%.*}" -ge 23 ]; then
    die "DOCKER_BUILDKIT=1: docker client $client builds with BuildKit only through the buildx plugin, which is" \
      "not installed; install buildx, or set DOCKER to a client with BuildKit built in (CLI 18.09 to 22.x)"
  fi
fi
[ -x "$PYTHON" ] || PYTHON=python3
[[ "$TORCH_SPEC" == torch==* ]] || die "TORCH_SPEC must pin one version (torch==X.Y.Z), got '$TORCH_SPEC'"
TORCH_VERSION=${TORCH_SPEC#torch==}

if [ -z "${PYTHON_IMAGE:-}" ]; then
  if "$DOCKER" image inspect "$LOCAL_BASE" > /dev/null 2>&1; then PYTHON_IMAGE=$LOCAL_BASE; else
    PYTHON_IMAGE=$(sed -n 's/^ARG PYTHON_IMAGE=//p' controller/Dockerfile)
  fi
fi

# One torch wheel of the pinned version for CPython 3.11 (the base's Python); other versions are removed so that
# the build cannot pick a stale one. PyPI's own torch for Linux is the CUDA build (GBs with its nvidia wheels).
mkdir -p "$WHEELS"
find "$WHEELS" -name 'torch-*.whl' ! -name "torch-${TORCH_VERSION}+cpu-*" -delete
download=("$PYTHON" -m pip download -q "torch==${TORCH_VERSION}+cpu" --no-deps --only-binary=:all:
  --python-version 3.11 --platform manylinux_2_28_x86_64 -d "$WHEELS")
"${download[@]}" --no-index --find-links "$WHEELS" 2> /dev/null \
  || "${download[@]}" --index-url "${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}" \
  || die "no CPU wheel of $TORCH_SPEC in $WHEELS, pip's find-links or ${TORCH_INDEX_URL:-the PyTorch CPU index}"
WHEEL=$(cd "$WHEELS" && ls "torch-${TORCH_VERSION}+cpu-"*.whl | head -n 1)

CONTROLLER=${CONTROLLER_IMAGE:-$REGISTRY/relay-controller:$TAG}
TRAINER=${TRAINER_IMAGE:-$REGISTRY/relay-trainer:$TAG}
printf '==> %s from %s\n' "$CONTROLLER" "$PYTHON_IMAGE"
"$DOCKER" build -f controller/Dockerfile -t "$CONTROLLER" . --network host --build-arg "PYTHON_IMAGE=$PYTHON_IMAGE"
printf '==> %s from %s with %s\n' "$TRAINER" "$PYTHON_IMAGE" "$WHEEL"
"$DOCKER" build -f trainer_image/Dockerfile -t "$TRAINER" . --network host --build-arg "TORCH_IMAGE=$PYTHON_IMAGE" \
  --build-arg "TORCH_WHEEL=$WHEEL"
for image in "$CONTROLLER" "$TRAINER"; do
  printf '%s: %s bytes\n' "$image" "$("$DOCKER" image inspect -f '{{.Size}}' "$image")"
done
