# syntax=docker/dockerfile:1
# mpexport in a container. CPU image by default; VARIANT=gpu on an image with CUDA + TensorRT installs
# mpexport[tensorrt] beside the image's own TensorRT and CUDA torch.
#   docker build -t mpexport .
#   docker build -t mpexport:gpu --build-arg VARIANT=gpu --build-arg BASE_IMAGE=nvcr.io/nvidia/tensorrt:25.10-py3 .
#   docker run --rm -v "$PWD:/work" mpexport convert /work/model.pt2 --val-data /work/val.npz --out /work/build/m
# The base is one argument, not a stage picked by VARIANT: buildah (podman 4.x) does not resolve a stage name built
# from an argument, and the same file builds with docker and podman alike (scripts/container_check.sh).
ARG BASE_IMAGE=python:3.11-slim

# Build stage: a virtual environment with mpexport and its dependencies (no compilers needed: all wheels).
# hadolint ignore=DL3006
FROM ${BASE_IMAGE} AS build
ARG VARIANT=cpu
# TORCH_INDEX: a package index serving CPU-only torch wheels keeps the CPU image small (the default index
# serves CUDA builds on Linux). TORCH_SPEC pins a torch release.
ARG TORCH_INDEX=""
ARG TORCH_SPEC="torch>=2.6"
# PIP_FIND_LINKS: a folder of wheels pip looks in first (mounted at build time, e.g. a local CPU torch wheel).
ARG PIP_FIND_LINKS=""
WORKDIR /src
COPY pyproject.toml README.md ./
COPY mpexport ./mpexport
COPY docker/install.sh ./docker/install.sh
RUN if [ "$VARIANT" = "gpu" ]; then extras=tensorrt; flags=--system-site-packages; else extras=""; flags=""; fi \
 && VENV_FLAGS="$flags" TORCH_INDEX="$TORCH_INDEX" TORCH_SPEC="$TORCH_SPEC" PIP_FIND_LINKS="$PIP_FIND_LINKS" \
    sh docker/install.sh /opt/mpexport "$extras"

# Final stage: the environment only, a non-root user, mpexport as the entry point.
# hadolint ignore=DL3006
FROM ${BASE_IMAGE}
COPY --from=build /opt/mpexport /opt/mpexport
RUN useradd --create-home --uid 1000 mpexport
USER 1000
WORKDIR /work
ENV PATH=/opt/mpexport/bin:$PATH PYTHONUNBUFFERED=1
ENTRYPOINT ["mpexport"]
CMD ["--help"]
