# The kvbm node image (`kvbm node`, the DaemonSet's container).
#   docker build -t kvbm-node:cpu .                                  # CPU (default)
#   docker build -t kvbm-node:cuda --build-arg VARIANT=cuda .         # CUDA 12
# NIXL comes lean: `nixl-cu12` (NIXL with UCX), not the `nixl` meta package,
# which would also pull the CUDA 13 build.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
FROM ${PYTHON_IMAGE}

ARG VARIANT=cpu
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1

WORKDIR /opt/kvbm
COPY pyproject.toml README.md ./
COPY kvbm ./kvbm
COPY transport ./transport
COPY discovery ./discovery

# PyTorch first and pinned (an unpinned resolve pulls a multi-GB CUDA build on CPU).
RUN if [ "$VARIANT" = "cuda" ]; then \
        pip install torch==2.13.0; \
    else \
        pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu; \
    fi \
 && pip install .

# Runs as root (with no capability: see k8s/base/node-daemonset.yaml): it writes the
# hostPaths /dev/shm/kvbm, /run/kvbm and the disk tier.
ENTRYPOINT ["kvbm"]
CMD ["node", "--config", "/etc/kvbm/node.toml"]
