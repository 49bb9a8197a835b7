# The control-plane worker: `ctrl-worker run` by default (see README.md, "Docker image").
#
#   docker build -t ctrl-worker .
#   docker run -p 7092:7092 -e PREFECT_API_URL=... -e UNKEY_DATABASE_PRIMARY=... ctrl-worker
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN groupadd --system --gid 10001 ctrl \
    && useradd --system --uid 10001 --gid ctrl --create-home --home-dir /home/ctrl ctrl \
    && install -d -o ctrl -g ctrl -m 0750 /var/lib/ctrl-worker

WORKDIR /srv/ctrl-worker

# The source stays here besides the installed package: prefect.yaml's entrypoints
# (flows/<module>.py:<flow>) are loaded from this directory by a work-pool worker.
COPY pyproject.toml README.md prefect.yaml ./
COPY worker ./worker
COPY flows ./flows
COPY tasks ./tasks
COPY blocks ./blocks
COPY deployments ./deployments
RUN pip install . && rm -rf build ./*.egg-info

ENV UNKEY_STATE_DIR=/var/lib/ctrl-worker \
    UNKEY_HTTP_PORT=7092 \
    CTRL_WORKER_DIR=/srv/ctrl-worker \
    PREFECT_HOME=/home/ctrl/.prefect

USER ctrl
VOLUME ["/var/lib/ctrl-worker"]
EXPOSE 7092

# No curl in the slim image: Python asks /health/live (503 until started, then 200).
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('UNKEY_HTTP_PORT', '7092') + '/health/live', timeout=3)"]

ENTRYPOINT ["ctrl-worker"]
CMD ["run"]
