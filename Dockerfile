# One image for the API and the training worker.
# CUDA wheels of torch run on CPU-only hosts too, so the same image serves both.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    ZOOFIT_DATA_DIR=/data \
    ZOOFIT_HOST=0.0.0.0

RUN apt-get update \
 && apt-get install -y --no-install-recommends curl libgomp1 \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY pyproject.toml README.md ./
COPY models ./models
COPY service ./service
COPY workers ./workers
RUN pip install . \
 && pip install --no-deps animal-mnist==0.4

RUN useradd --create-home --uid 1000 zoofit && mkdir -p /data && chown zoofit /data
USER zoofit
VOLUME ["/data"]
EXPOSE 8000

HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=5 \
  CMD curl -fsS http://127.0.0.1:8000/healthz || exit 1

CMD ["zoofit", "api"]
