# Production image: NVIDIA's Triton server (its own tritonserver and Python backend) + omni_backend.
#   docker build -t omni-triton .
#   docker run --gpus all --shm-size=1g --stop-timeout=40 -p 8000:8000 -p 8001:8001 -p 8002:8002 \
#       -e OMNI_ADMIN_KEY=... -v /path/to/checkpoints:/models:ro omni-triton
# The repository's models name their checkpoint by the `model` parameter: a name under
# OMNI_MODEL_ROOT (/models here), an absolute path, or a Hugging Face id.
# --shm-size: every Python backend instance maps a /dev/shm region (Docker's default 64 MB is too small).
# --stop-timeout: above the exit timeout below, so SIGTERM drains before Docker's SIGKILL.
ARG TRITON_VERSION=24.10
FROM nvcr.io/nvidia/tritonserver:${TRITON_VERSION}-py3

WORKDIR /opt/omni-triton
COPY pyproject.toml README.md ./
COPY omni_backend ./omni_backend
COPY client ./client
COPY model_repository ./model_repository
COPY demo/flux-shapes /models/flux-shapes
# The image's python3 is the interpreter its Python backend stub embeds: install into it (as root), then
# build the other families' tiny checkpoints; the server itself runs as an unprivileged user that cannot change either.
RUN pip install --no-cache-dir . ./client \
    && python3 -m omni_backend.testing.tiny --family qwen_image --out /models/tiny-qwen-image \
    && python3 -m omni_backend.testing.tiny --family wan22_t2v --out /models/tiny-wan22-t2v \
    && useradd --create-home --uid 10001 --shell /usr/sbin/nologin omni

USER omni
ENV OMNI_MODEL_ROOT=/models HF_HOME=/home/omni/.cache/huggingface
EXPOSE 8000 8001 8002
HEALTHCHECK --interval=30s --timeout=5s --start-period=300s \
    CMD curl -sf localhost:8000/v2/health/ready || exit 1
# --tritonserver: use the image's server and backends, not the copy inside the nvidia-pytriton wheel.
# --host 0.0.0.0: reachable from outside the container; the launcher then requires the admin-key header
# ($OMNI_ADMIN_KEY; unset: a random key, i.e. closed) on the model-repository and other admin APIs.
CMD ["python3", "-m", "omni_backend.serve", "--tritonserver", "/opt/tritonserver/bin/tritonserver", \
     "--host", "0.0.0.0", "--model-repository", "/opt/omni-triton/model_repository", \
     "--", "--exit-timeout-secs=30"]
