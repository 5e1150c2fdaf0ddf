# The dfka stage image (GPU): every KFP component of pipelines/dfka_pipeline.py runs in it on a cluster.
#
#   docker build -f images/stage.Dockerfile --build-arg DFKA_GIT_COMMIT=$(git rev-parse --short=12 HEAD) \
#       -t ghcr.io/dfka/dfka-stage:0.1.0 .            (context: the repository root; `make images`)
#
# Base: the official PyTorch CUDA runtime image of the pinned torch (2.13.0). The tag follows PyTorch's
# naming scheme but was not pulled here (no Docker engine, no registry access): check it exists
# before the first build, and keep the torch version in it equal to the torch pin in pyproject.toml
# (tests/test_images.py checks that). The base provides torch; everything else is installed from
# constraints.txt (the project's full lock) with torch removed from it.
ARG BASE_IMAGE=pytorch/pytorch:2.13.0-cuda12.8-cudnn9-runtime
FROM ${BASE_IMAGE}

ARG DFKA_GIT_COMMIT=unknown
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    OMP_NUM_THREADS=4 \
    DFKA_GIT_COMMIT=${DFKA_GIT_COMMIT}

WORKDIR /opt/dfka
COPY pyproject.toml constraints.txt README.md ./
COPY src ./src
# kfp is preinstalled so the components can use install_kfp_package=False (no pip at run time).
RUN grep -v '^torch==' constraints.txt > /tmp/constraints-image.txt \
    && python -m pip install -c /tmp/constraints-image.txt "kfp==2.17.0" "kfp-kubernetes==2.17.0" . \
    && python -c "import torch, dfka, kfp; assert torch.__version__.split('+')[0] == '2.13.0', torch.__version__; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'dfka', dfka.__version__, 'kfp', kfp.__version__)" \
    && rm -rf /tmp/constraints-image.txt /opt/dfka/src /root/.cache

# Non-root, numeric uid so that Kubernetes can verify runAsNonRoot.
RUN useradd --uid 10001 --create-home --home-dir /home/dfka --shell /usr/sbin/nologin dfka
ENV HOME=/home/dfka
WORKDIR /home/dfka
USER 10001:10001

# Docker/Podman only (Kubernetes ignores HEALTHCHECK): the stage code and kfp import.
HEALTHCHECK --interval=60s --timeout=30s --start-period=10s --retries=3 CMD python -c "import dfka, kfp" || exit 1
