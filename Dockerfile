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

# The dependencies first, in a layer of their own: the ones listed in pyproject.toml, read with
# tomllib. A change to the code (below) reuses this layer and does not install torch again; only
# a change to pyproject.toml rebuilds it.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
      > /tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt \
 && rm /tmp/requirements.txt

# Then the code, without its dependencies (installed above). The demo's sample data (animal-mnist,
# foolbox; `make install` adds them) stays out of the production image: `zoofit demo` says so.
COPY README.md ./
COPY models ./models
COPY service ./service
COPY workers ./workers
RUN pip install --no-deps .

RUN useradd --create-home --uid 1000 zoofit && mkdir -p /data && chown zoofit /data
USER zoofit
VOLUME ["/data"]
# 8000: the API (and its /metrics); 9540: a worker's metrics (ZOOFIT_WORKER_METRICS_PORT)
EXPOSE 8000 9540

HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=5 \
  CMD curl -fsS http://127.0.0.1:8000/healthz || exit 1

CMD ["zoofit", "api"]
