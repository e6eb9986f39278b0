# rotator: `rotator run` as an unprivileged user, on a pinned Python base.
#   docker build -t rotator:0.1.0 .
#   docker run --read-only -v /path/to/rotation-policies.toml:/etc/rotator/rotation-policies.toml:ro \
#              -v rotator-state:/var/lib/rotator -e VAULT_TOKEN rotator:0.1.0
# The image holds no secret and no policy file: both are given at run time (README.md, "Deploying").
# For reproducible builds pin the digest too: FROM python:3.11.14-slim-bookworm@sha256:...

FROM python:3.11.14-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY rotator ./rotator
COPY providers ./providers
# The package and its runtime dependencies only (no dev extras), compiled to bytecode here
# because the root filesystem is read-only at run time.
RUN python -m venv /opt/rotator \
 && /opt/rotator/bin/pip install /src \
 && /opt/rotator/bin/python -m compileall -q /opt/rotator

FROM python:3.11.14-slim-bookworm
RUN groupadd --system --gid 10001 rotator \
 && useradd --system --uid 10001 --gid rotator --no-create-home --home-dir /nonexistent \
            --shell /usr/sbin/nologin rotator \
 && install -d -o rotator -g rotator -m 0700 /var/lib/rotator \
 && install -d -m 0755 /etc/rotator
COPY --from=build /opt/rotator /opt/rotator
ENV PATH=/opt/rotator/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    ROTATOR_CONFIG=/etc/rotator/rotation-policies.toml \
    ROTATOR_LOG_FORMAT=json
# Numeric, so Kubernetes can check runAsNonRoot without reading /etc/passwd.
USER 10001:10001
WORKDIR /var/lib/rotator
EXPOSE 9464
ENTRYPOINT ["rotator"]
CMD ["run"]
