#!/usr/bin/env sh
# The image's install steps, shared by the Dockerfile and the test that runs them in a clean virtual
# environment: install.sh VENV [EXTRAS]
#   TORCH_SPEC   torch requirement (default: torch>=2.6)
#   TORCH_INDEX  optional package index for torch (e.g. one serving CPU-only wheels, for a small CPU image)
#   VENV_FLAGS   extra flags for `python -m venv` (the GPU image uses --system-site-packages to see its TensorRT)
#   PIP_FIND_LINKS  optional folder of wheels pip looks in first (e.g. a local CPU torch wheel)
set -eu
if [ -z "${PIP_FIND_LINKS:-}" ]; then unset PIP_FIND_LINKS; else export PIP_FIND_LINKS; fi
venv="$1"
extras="${2:-}"
src="$(cd "$(dirname "$0")/.." && pwd)"
# shellcheck disable=SC2086
python -m venv ${VENV_FLAGS:-} "$venv"
"$venv/bin/python" -m pip install --no-cache-dir --disable-pip-version-check --quiet --upgrade pip
if [ -n "${TORCH_INDEX:-}" ]; then
  "$venv/bin/python" -m pip install --no-cache-dir --disable-pip-version-check --quiet \
    --index-url "$TORCH_INDEX" "${TORCH_SPEC:-torch>=2.6}"
else
  "$venv/bin/python" -m pip install --no-cache-dir --disable-pip-version-check --quiet "${TORCH_SPEC:-torch>=2.6}"
fi
"$venv/bin/python" -m pip install --no-cache-dir --disable-pip-version-check --quiet "${src}${extras:+[$extras]}"
"$venv/bin/mpexport" --version
