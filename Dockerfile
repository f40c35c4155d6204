# Image of the madseg ML backend and its fine-tune worker (see docker-compose.yml).
#   docker build -t madseg-backend .
#   docker run -p 127.0.0.1:9090:9090 -e MADSEG_MODEL=... \
#       -e BASIC_AUTH_USER=... -e BASIC_AUTH_PASS=... madseg-backend            (backend)
#   docker run -e REDIS_URL=redis://:PASSWORD@HOST:6379/0 madseg-backend madseg worker   (worker)
# Inside the container the backend listens on 0.0.0.0 (MADSEG_BACKEND_HOST below), which it
# refuses without credentials; docker-compose.yml sets them from .env.
# CPU-only PyTorch keeps the image small; on a GPU host install the CUDA wheels instead.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MADSEG_BACKEND_HOST=0.0.0.0 \
    MADSEG_BACKEND_PORT=9090

WORKDIR /app
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch torchvision

COPY pyproject.toml README.md requirements-nodeps.txt ./
COPY ml_backend ./ml_backend
COPY sampler ./sampler
COPY projects ./projects
# label-studio-ml without its old Flask/Werkzeug pins (see requirements-nodeps.txt)
RUN pip install . && pip install --no-deps -r requirements-nodeps.txt \
    && python -c "from label_studio_ml.model import LabelStudioMLBase" \
    && useradd --create-home --uid 1000 madseg && mkdir -p /models && chown madseg /models

USER madseg
EXPOSE 9090
CMD ["madseg", "backend"]
