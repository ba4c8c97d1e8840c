# syntax=docker/dockerfile:1
# Tokligence in a container: one Python file on Alpine, with h11 and certifi. Two editions:
#   docker build -t tokligence:personal .                           auth off (the default)
#   docker build --build-arg EDITION=team -t tokligence:team .      users and API keys
# (--target personal / --target team pick the same stages.) Step by step: docs/docker.md.
ARG PYTHON_VERSION=3.12
ARG EDITION=personal

FROM python:${PYTHON_VERSION}-alpine AS base
COPY requirements.txt /app/requirements.txt
RUN pip install --no-cache-dir --disable-pip-version-check -r /app/requirements.txt \
 && addgroup -S -g 10001 tokligence \
 && adduser -S -D -H -h /data -s /sbin/nologin -u 10001 -G tokligence tokligence \
 && mkdir -p /data/logs \
 && chown -R 10001:10001 /data \
 && ln -s /app/tokligence.py /usr/local/bin/tokligence
COPY --chmod=755 tokligence.py /app/tokligence.py
# Compiled once, here: the gateway starts from this bytecode as a module, which spares every start
# the parse of the file (about 70 ms) and keeps the parser's memory (about 18 MB) out of the server.
RUN python -m py_compile /app/tokligence.py
# Settings come from the environment; everything the gateway writes goes to the /data volume, and an
# optional settings file is read from /data/.tokligence/settings.ini (HOME is /data).
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONPATH=/app \
    PYTHONUNBUFFERED=1 \
    HOME=/data \
    TOKLIGENCE_HOST=0.0.0.0 \
    TOKLIGENCE_PORT=8081 \
    TOKLIGENCE_LEDGER_PATH=/data/ledger.db \
    TOKLIGENCE_ALIASES_FILE=/data/aliases.ini \
    TOKLIGENCE_LOG_FILE=/data/logs/gateway.log \
    TOKLIGENCE_CLI_LOG_FILE=/data/logs/cli.log
WORKDIR /data
VOLUME ["/data"]
USER 10001:10001
EXPOSE 8081
# No curl or wget in the image: Python asks /health itself (bypassing any HTTP proxy in the env).
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; u.build_opener(u.ProxyHandler({})).open('http://127.0.0.1:%s/health' % os.environ.get('TOKLIGENCE_PORT', '8081'), timeout=4)"]
ENTRYPOINT ["python", "-P", "-m", "tokligence"]
CMD ["serve"]

# Personal edition: no users or keys. Listening on 0.0.0.0 inside the container, the gateway still
# serves only requests whose Host is a loopback name (or in TOKLIGENCE_ALLOWED_HOSTS), so publish
# the port on 127.0.0.1: docker run -p 127.0.0.1:8081:8081 …
FROM base AS personal
LABEL org.opencontainers.image.title="tokligence" io.tokligence.edition="personal"
ENV TOKLIGENCE_AUTH_DISABLED=true

# Team edition: every /v1 and /api request needs an API key. The first start creates
# admin@localhost and prints its key once (docker logs), or uses TOKLIGENCE_ADMIN_KEY.
FROM base AS team
LABEL org.opencontainers.image.title="tokligence" io.tokligence.edition="team"
ENV TOKLIGENCE_AUTH_DISABLED=false

FROM ${EDITION}
