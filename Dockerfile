# The crmscore image: one image for every job (`crmscore flow`, `crmscore serve`,
# `crmscore topics`, ...); docker-compose.yml picks the command per service.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
# The dependencies install from wheels (checked on linux/amd64): the slim image needs no compiler.
COPY pyproject.toml README.md ./
COPY crmscore ./crmscore
COPY flows ./flows
COPY models ./models
COPY serving ./serving
COPY schemas ./schemas
RUN pip install . && rm -rf /src/build

# Run as an unprivileged user; the flow's recovery snapshots live on a volume here.
RUN useradd --system --uid 10001 --create-home --home-dir /home/crmscore crmscore \
    && mkdir -p /var/lib/crmscore/recovery \
    && chown -R crmscore /var/lib/crmscore
USER crmscore
WORKDIR /home/crmscore
ENV CRMSCORE_RECOVERY_DIR=/var/lib/crmscore/recovery \
    CRMSCORE_GRPC_ADDRESS=0.0.0.0:50051
EXPOSE 50051

CMD ["crmscore", "serve"]
