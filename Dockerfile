# Production image: NVIDIA's Triton server (its own tritonserver and Python backend) + omni_backend.
#   docker build -t omni-triton .
#   docker run --gpus all -p 8000:8000 -p 8001:8001 -p 8002:8002 \
#       -v /path/to/checkpoints:/models omni-triton
# The repository's models name their checkpoint by the `model` parameter: a name under
# OMNI_MODEL_ROOT (/models here), an absolute path, or a Hugging Face id.
ARG TRITON_VERSION=24.10
FROM nvcr.io/nvidia/tritonserver:${TRITON_VERSION}-py3

WORKDIR /opt/omni-triton
COPY pyproject.toml README.md ./
COPY omni_backend ./omni_backend
COPY client ./client
COPY model_repository ./model_repository
# The image's python3 is the interpreter its Python backend stub embeds: install into it.
RUN pip install --no-cache-dir . ./client \
    && python3 -m omni_backend.testing.tiny --family flux --out /models/tiny-flux \
    && python3 -m omni_backend.testing.tiny --family qwen_image --out /models/tiny-qwen-image \
    && python3 -m omni_backend.testing.tiny --family wan22_t2v --out /models/tiny-wan22-t2v

ENV OMNI_MODEL_ROOT=/models
EXPOSE 8000 8001 8002
HEALTHCHECK --interval=30s --timeout=5s --start-period=300s \
    CMD curl -sf localhost:8000/v2/health/ready || exit 1
# --tritonserver: use the image's server and backends, not the copy inside the nvidia-pytriton wheel.
CMD ["python3", "-m", "omni_backend.serve", "--tritonserver", "/opt/tritonserver/bin/tritonserver", \
     "--model-repository", "/opt/omni-triton/model_repository"]
