#!/usr/bin/env bash
# Build the CPU container image and run the bundled demo inside it as its non-root user; check exit codes and the
# bundle. Minutes, needs root (or a working docker); not part of `make test`.
#
#   scripts/container_check.sh            # build, run, check; prints build time, image size, demo time
#   KEEP=1 scripts/container_check.sh     # keep the image and the work directory
#
# Engine: docker where its daemon answers, else podman (installed with apt-get where missing). Base image: the
# Dockerfile's python:3.11-slim where it can be pulled; else a Debian bookworm root built here with debootstrap
# (python3, venv, pip, this machine's CA bundle for the registry) stands in for it, and the output says so. Torch: a
# CPU-only build where one can be had (TORCH_INDEX, e.g. https://download.pytorch.org/whl/cpu, or a local folder of
# wheels, WHEELS, default /opt/wheels when it holds torch), else the registry's default (on Linux the CUDA build:
# several GB). Run: `run` where the runtime can start a container; where it is refused (no user namespaces, no
# setrlimit), the image is mounted and the demo run with chroot as uid 1000, and the output says so.
set -euo pipefail

REPO="$(cd "$(dirname "$0")/.." && pwd)"
IMAGE="${IMAGE:-localhost/mpexport:check}"
BASE="${BASE:-python:3.11-slim}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
TORCH_INDEX="${TORCH_INDEX:-}"
WHEELS="${WHEELS:-/opt/wheels}"
WORK="$(mktemp -d /tmp/mpexport-container.XXXXXX)"
say() { printf '[container_check] %s\n' "$*"; }
fail() { say "FAIL: $*"; exit 1; }
now() { date +%s.%N; }
seconds() { python3 -c "print(f'{$2 - $1:.0f}')"; }
cleanup() {
  if [ -n "${MOUNTED:-}" ]; then $ENGINE umount "$MOUNTED" >/dev/null 2>&1 || true; fi
  if [ -n "${CONTAINER:-}" ]; then $ENGINE rm -f "$CONTAINER" >/dev/null 2>&1 || true; fi
  if [ -z "${KEEP:-}" ]; then rm -rf "$WORK"; fi
}
trap cleanup EXIT

# -- engine ---------------------------------------------------------------------------------------------------
if command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then
  ENGINE=docker
else
  if ! command -v podman >/dev/null 2>&1; then
    [ "$(id -u)" = 0 ] || fail "neither a docker daemon nor podman, and not root to install podman"
    say "installing podman and debootstrap with apt-get"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman debootstrap >/dev/null
  fi
  ENGINE=podman
fi
say "engine: $ENGINE $($ENGINE --version | head -1)"
BUILD_FLAGS=()
[ "$ENGINE" = podman ] && BUILD_FLAGS+=(--isolation chroot)

# -- base image -----------------------------------------------------------------------------------------------
if $ENGINE pull -q "$BASE" >/dev/null 2>&1; then
  say "base image: $BASE (pulled)"
else
  BASE="localhost/mpexport-base:bookworm"
  if ! $ENGINE image exists "$BASE" 2>/dev/null; then
    command -v debootstrap >/dev/null 2>&1 || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
    say "base image: python:3.11-slim cannot be pulled here; building a Debian bookworm root with debootstrap instead"
    root="$WORK/rootfs"
    debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates bookworm "$root" \
      "${DEBIAN_MIRROR:-http://deb.debian.org/debian}" >"$WORK/debootstrap.log" 2>&1 \
      || { tail -5 "$WORK/debootstrap.log"; fail "debootstrap"; }
    ln -sf python3 "$root/usr/bin/python"
    # the registry is reached through this machine's TLS setup: its CA bundle goes into the stand-in base
    cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
    rm -rf "$root/var/cache/apt/archives"/*.deb "$root/var/lib/apt/lists"/*
    tar -C "$root" -c . | $ENGINE import --change "ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt" - "$BASE" >/dev/null
    rm -rf "$root"
  fi
  say "base image: $BASE (a stand-in for python:3.11-slim: Debian bookworm, Python $($ENGINE run --rm "$BASE" \
    python3 -c 'import platform; print(platform.python_version())' 2>/dev/null || echo 3.11))"
fi

# -- build ----------------------------------------------------------------------------------------------------
BUILD_ARGS=(--build-arg "BASE_IMAGE=$BASE" --build-arg "TORCH_SPEC=$TORCH_SPEC")
if [ -n "$TORCH_INDEX" ]; then
  BUILD_ARGS+=(--build-arg "TORCH_INDEX=$TORCH_INDEX")
  say "torch: $TORCH_SPEC from $TORCH_INDEX"
elif compgen -G "$WHEELS/torch-*.whl" >/dev/null; then
  BUILD_ARGS+=(--build-arg "PIP_FIND_LINKS=/wheels" -v "$WHEELS:/wheels:ro")
  say "torch: $TORCH_SPEC, the CPU build from $WHEELS where it lies there"
else
  say "torch: $TORCH_SPEC from the registry (on Linux its default build is the CUDA one: several GB)"
fi
started=$(now)
$ENGINE build "${BUILD_FLAGS[@]}" "${BUILD_ARGS[@]}" -t "$IMAGE" "$REPO" >"$WORK/build.log" 2>&1 \
  || { tail -20 "$WORK/build.log"; fail "image build (log: $WORK/build.log)"; }
BUILD_S=$(seconds "$started" "$(now)")
SIZE_MB=$($ENGINE image inspect "$IMAGE" --format '{{.Size}}' | python3 -c "print(round(int(input()) / 1e6))")
say "built $IMAGE in ${BUILD_S} s, ${SIZE_MB} MB"

# -- run the demo as the image's user ------------------------------------------------------------------------
mkdir -p "$WORK/work"
cp "$REPO/models/digits_resnet.pt2" "$REPO/models/digits_resnet.val.npz" "$WORK/work/"
chmod -R a+rwX "$WORK/work"
DEMO=(
  "convert digits_resnet.pt2 --val-data digits_resnet.val.npz --out build/resnet --engine off"
  "verify build/resnet"
  "package build/resnet --out repo"
  "inspect build/resnet"
)
if $ENGINE run --rm "$IMAGE" --version >/dev/null 2>"$WORK/run.err"; then
  say "run: $ENGINE run, as the image's user (uid 1000)"
  runner() { $ENGINE run --rm -v "$WORK/work:/work" "$IMAGE" "$@"; }
  RESULT="$WORK/work"
else
  say "run: '$ENGINE run' is refused here ($(head -c 160 "$WORK/run.err" | tr '\n' ' ')); mounting the image and" \
      "running it with chroot as uid 1000 instead"
  CONTAINER=$($ENGINE create "$IMAGE")
  MOUNTED="$CONTAINER"
  root=$($ENGINE mount "$CONTAINER")
  cp -r "$WORK/work/." "$root/work/"
  chown -R 1000:1000 "$root/work"
  runner() { chroot --userspec=1000:1000 "$root" env -i HOME=/home/mpexport PATH=/opt/mpexport/bin:/usr/bin:/bin \
               PYTHONUNBUFFERED=1 sh -c "cd /work && exec mpexport \"\$@\"" mpexport "$@"; }
  RESULT="$root/work"
fi
started=$(now)
for step in "${DEMO[@]}"; do
  # shellcheck disable=SC2086
  runner $step >"$WORK/step.log" 2>&1 || { cat "$WORK/step.log"; fail "mpexport $step exited $?"; }
  say "ok: mpexport $step"
done
DEMO_S=$(seconds "$started" "$(now)")
for file in manifest.json model.fp32.onnx model.mixed.onnx plan.json report.json report.html; do
  [ -s "$RESULT/build/resnet/$file" ] || fail "the bundle has no $file"
done
python3 - "$RESULT/build/resnet/manifest.json" <<'EOF' || fail "the manifest does not record a passing verify"
import json, sys
manifest = json.load(open(sys.argv[1]))
assert manifest["verify"]["verdict"] == "pass", manifest["verify"]
assert [event["command"] for event in manifest["history"]] == ["convert", "verify"]
EOF
[ -s "$RESULT/repo/digits_resnet/config.pbtxt" ] || fail "the repository has no config.pbtxt"
[ "$(stat -c %u "$RESULT/build/resnet/manifest.json")" = 1000 ] || fail "the bundle is not owned by uid 1000"
say "PASS: build ${BUILD_S} s, image ${SIZE_MB} MB, demo (convert, verify, package, inspect) ${DEMO_S} s"
if [ -z "${KEEP:-}" ]; then $ENGINE rmi -f "$IMAGE" >/dev/null 2>&1 || true; fi
