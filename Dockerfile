# mpexport in a container (CPU). A later revision adds the GPU/TensorRT variant.
#   docker build -t mpexport .
#   docker run --rm -v "$PWD:/work" mpexport convert /work/model.pt2 --val-data /work/val.npz --out /work/build/m
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY mpexport ./mpexport
# TORCH_INDEX: a package index serving CPU-only torch wheels keeps the image small (the default index
# serves CUDA builds on Linux).
ARG TORCH_INDEX=""
RUN python -m venv /opt/mpexport \
 && /opt/mpexport/bin/pip install --no-cache-dir ${TORCH_INDEX:+--index-url "$TORCH_INDEX"} "torch>=2.6" \
 && /opt/mpexport/bin/pip install --no-cache-dir .

FROM python:3.11-slim
COPY --from=build /opt/mpexport /opt/mpexport
RUN useradd --create-home --uid 1000 mpexport
USER mpexport
WORKDIR /work
ENV PATH=/opt/mpexport/bin:$PATH
ENTRYPOINT ["mpexport"]
CMD ["--help"]
