# SAFL recognition service: `safl serve` on port 8000, CPU PyTorch by default.
#
#   docker build -t safl .                                   # CPU torch from download.pytorch.org/whl/cpu
#   docker build -t safl:cuda \
#       --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .   # CUDA torch (see docker-compose.gpu.yml)
#
# Offline / mirror-only machines: put the torch wheel into ./wheels first; it is then installed
# from there instead of from TORCH_INDEX_URL (its dependencies still come from the normal index):
#   pip download --no-deps -d wheels 'torch==2.13.0+cpu'
#
# The model weights are baked in: weights/safl.safetensors and its .json sidecar must exist in
# the build context (or point SAFL_WEIGHTS at a mounted file at run time).
#
# Works with BuildKit (docker compose build, docker buildx) and with the classic builder.

# --- stage: the weights, made world-readable (save_checkpoint writes 0600 files, which the
#     unprivileged user could not read); copied from here so that the chmod costs no extra layer.
FROM python:3.11-slim AS weights
COPY weights /weights
RUN chmod -R u=rwX,go=rX /weights

# --- stage: build the virtual environment (torch + runtime dependencies + the safl wheel). The
#     torch wheel from ./wheels only ever lives in this stage, so it costs the final image nothing.
FROM python:3.11-slim AS build

# Index with the torch build to install when ./wheels holds no torch wheel:
#   https://download.pytorch.org/whl/cpu (default), or a CUDA one: .../whl/cu128 (the project's CUDA variant; cu126, cu130 ... for other drivers)
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# Must satisfy pyproject.toml's pin (2.13.0+cpu and 2.13.0+cu128 both satisfy ==2.13.0).
ARG TORCH_VERSION=2.13.0
# 1: delete torch's C++ headers and C++ test binaries (~180 MB; only needed for C++
# extensions and torch.compile's C++ backend, which the service does not use).
ARG TORCH_SLIM=1

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_INPUT=1 \
    PIP_ROOT_USER_ACTION=ignore \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv

# `wheel[s]` is a glob, so the build also works without ./wheels; pyproject.toml is listed so
# that the COPY always has a source.
COPY pyproject.toml wheel[s] /wheels/
# A wheel in ./wheels is used only when it is the build TORCH_INDEX_URL asks for: with the
# default .../whl/cpu that is torch-2.13.0+cpu-*.whl, with .../whl/cu128 torch-2.13.0+cu128-*.whl.
RUN set -eux; \
    index="${TORCH_INDEX_URL%/}"; variant="${index##*/}"; \
    wheel="$(ls /wheels/torch-"${TORCH_VERSION}+${variant}"-*.whl 2>/dev/null | head -n 1 || true)"; \
    if [ -n "$wheel" ]; then \
        pip install "$wheel"; \
    else \
        pip install --index-url "$TORCH_INDEX_URL" "torch==${TORCH_VERSION}"; \
    fi; \
    if [ "$TORCH_SLIM" = 1 ]; then \
        t=/opt/venv/lib/python3.11/site-packages/torch; \
        rm -rf "$t/include" "$t/test" "$t"/bin/test_* "$t"/bin/*Test; \
    fi

# The other runtime dependencies, read from pyproject.toml (no train/dev extras). torch is first
# imported here, once numpy is installed: imported before, it warns "Failed to initialize NumPy"
# (torch.from_numpy fails the build should torch and numpy not work together).
COPY pyproject.toml /src/pyproject.toml
RUN set -eux; \
    python -c "import tomllib; print('\n'.join(tomllib.load(open('/src/pyproject.toml', 'rb'))['project']['dependencies']))" > /tmp/requirements.txt; \
    pip install -r /tmp/requirements.txt; \
    python -c "import numpy, torch; torch.from_numpy(numpy.zeros(1)); print('torch', torch.__version__, 'cuda', torch.version.cuda, 'numpy', numpy.__version__)"

# The package itself (model, model.training, service, and the weights as safl_weights) as a wheel.
COPY model /src/model
COPY service /src/service
COPY --from=weights /weights /src/weights
RUN pip wheel --no-deps --wheel-dir /dist /src

# --- final image: Python + the venv (the weights inside, in safl_weights); no compilers, no pip cache, no wheels.
FROM python:3.11-slim

# ORT_DISABLE_TELEMETRY: ONNX Runtime's PyPI wheel sends usage events to Microsoft and keeps a
# device id under ~/.cache unless this is set before it loads (safl sets it too, in
# model/onnx_reader.py; here it also covers any other process started in the container).
ENV ORT_DISABLE_TELEMETRY=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# Dependencies (cached until pyproject.toml or the torch build changes), then the small safl
# wheel on top, so a code change rebuilds only a few hundred kB.
COPY --from=build /opt/venv /opt/venv
COPY --from=build /dist /dist
RUN set -eux; \
    pip install --no-deps --no-index /dist/*.whl; \
    rm -rf /dist; \
    pip check; \
    useradd --system --uid 10001 --user-group --create-home --home-dir /home/safl safl

WORKDIR /app
USER safl

EXPOSE 8000

# Readiness, not just liveness: "healthy" once /readyz is 200 (weights loaded and warmed up), so
# `docker compose up --wait` returns when the service takes traffic; the check fails again while
# it drains on SIGTERM (`docker inspect` shows the status and reason, e.g. 503 ... "warming up").
# Sends the API key when one is configured, in case SAFL_AUTH_HEALTH=true.
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, sys, http.client as h; k = os.environ.get('SAFL_API_KEY', '').strip(); c = h.HTTPConnection('127.0.0.1', 8000, timeout=4); c.request('GET', '/readyz', headers={'X-API-Key': k} if k else {}); r = c.getresponse(); print(r.status, r.read(300).decode(errors='replace')); sys.exit(r.status != 200)"]

# Exec form: `safl` is PID 1 and receives SIGTERM itself; it stops taking work, drains the
# admitted requests (up to SAFL_DRAIN_TIMEOUT_S, default 30 s) and exits 0.
STOPSIGNAL SIGTERM
CMD ["safl", "serve", "--host", "0.0.0.0", "--port", "8000"]
