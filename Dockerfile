# The compression-telemetry application image: `compression ingest` by default.
#
#   docker build -t compression-telemetry:local .
#   docker run --rm compression-telemetry:local --help
#
# docker-compose.yml builds it for the ingest service and runs the same image
# as monitor, registry (compression devices serve), and, in the demo profile,
# registry-seed and simulator. Settings come from COMPRESSION_* environment
# variables (see .env.example).
ARG PYTHON_IMAGE=python:3.11-slim
FROM ${PYTHON_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

# A system user without a login shell; its home holds the dead-letter file.
# The folders below are where docker-compose.yml mounts its named volumes
# (registry database, broker files, monitor state, demo credentials): a new
# named volume takes the owner of the folder it is first mounted on, so the
# services, which run as this user, can write them.
RUN groupadd --system --gid 10001 compression \
    && useradd --system --uid 10001 --gid compression --no-create-home \
        --home-dir /var/lib/compression --shell /usr/sbin/nologin compression \
    && install -d -o compression -g compression -m 0750 /var/lib/compression \
        /var/lib/compression/registry /var/lib/compression/broker \
        /var/lib/compression/monitor /var/lib/compression/demo

# Only what the package needs, named one by one: the build context also holds
# .venv/, var/ and perhaps .env (secrets), none of which belongs in the image.
WORKDIR /tmp/src
# The locked dependencies first (their own layer; hashes checked: exactly what the tests ran with), then the package.
COPY requirements/runtime.lock requirements/
RUN pip install --require-hashes -r requirements/runtime.lock
COPY pyproject.toml README.md ./
COPY compression/ compression/
COPY devices/ devices/
COPY ingest/ ingest/
COPY monitor/ monitor/
COPY simulators/ simulators/
COPY dashboards/ dashboards/
COPY records/ records/
COPY workspace/ workspace/
# A regular (not editable) install into site-packages, then the sources go.
RUN pip install --no-deps --no-build-isolation /tmp/src \
    && pip check \
    && cd / \
    && rm -rf /tmp/src \
    && compression --version

WORKDIR /var/lib/compression
USER compression

# Container defaults: serve metrics on every interface of the container (the
# port is published by docker-compose.yml), keep the last-resort dead letters
# on the volume mounted here, log JSON lines for the log collector.
ENV COMPRESSION_METRICS_HOST=0.0.0.0 \
    COMPRESSION_METRICS_PORT=9410 \
    COMPRESSION_DEAD_LETTER_FILE=/var/lib/compression/ingest-dead-letter.jsonl \
    COMPRESSION_LOG_FORMAT=json
EXPOSE 9410

# Healthy while /healthz answers 200, i.e. while the ingester is connected to
# the broker (it answers 503 otherwise). slim has no curl: Python's urllib,
# which raises on any status >= 400, so the command exits 1.
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('COMPRESSION_METRICS_PORT', '9410'), timeout=4)"]

# SIGTERM (docker stop) makes the ingester write and acknowledge what it has
# received, then exit: give it the time (stop_grace_period in docker-compose.yml).
STOPSIGNAL SIGTERM
ENTRYPOINT ["compression"]
CMD ["ingest"]
