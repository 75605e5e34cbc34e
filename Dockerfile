# The API-token gateway: proxy (data plane) on 8080, admin API (control plane) on 8081, tokens in /data.
#
#   docker build -t api-token-gateway .     (podman: add --format docker, or the HEALTHCHECK is dropped)
#   docker run -d -p 8080:8080 -p 127.0.0.1:8081:8081 -v gateway-data:/data \
#     -e GATEWAY_UPSTREAM=http://api.internal:9000 -e GATEWAY_ADMIN_KEY=... api-token-gateway
#
# Configuration is by environment only (GATEWAY_<SETTING>, see config/gateway.toml for every setting).
# The admin API listens on 0.0.0.0 inside the container so that a published port can reach it: it manages
# every credential, so publish 8081 only on loopback or a private network, never publicly.
# SIGTERM drains in-flight requests for up to GATEWAY_SHUTDOWN_TIMEOUT (30 s) before exiting 0; give
# `docker stop --time` / Kubernetes' terminationGracePeriodSeconds more than that.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

# A fixed numeric id, so that `runAsNonRoot` can verify it and volume ownership is predictable.
RUN groupadd --gid 10001 gateway \
 && useradd --uid 10001 --gid gateway --home-dir /nonexistent --no-create-home --shell /usr/sbin/nologin gateway \
 && mkdir /data \
 && chown gateway:gateway /data

# Exactly the versions in constraints.txt (written by scripts/lock), nothing resolved at build time, so two
# builds of one commit run the same code: the pins are installed without their dependencies, the gateway's
# wheel is built with the pinned setuptools, and `pip check` stops the build when a dependency of the gateway
# is missing from constraints.txt (run scripts/lock after changing pyproject.toml's dependencies).
# config/ travels with gateway/: gateway/default_config.toml is a symlink to ../config/gateway.toml, which
# the wheel build follows, so the installed package holds the file itself. Were config/ missing, setuptools
# would silently leave the dangling link out of the wheel; the check after the install stops the build then.
# README.m[d]: the glob lets the build go on while the README (pyproject's `readme`) does not exist yet.
COPY constraints.txt /tmp/src/
RUN pip install --no-cache-dir --no-deps --only-binary=:all: -r /tmp/src/constraints.txt
COPY pyproject.toml README.m[d] /tmp/src/
COPY config/ /tmp/src/config/
COPY admin_api/ /tmp/src/admin_api/
COPY admin_cli/ /tmp/src/admin_cli/
COPY gateway/ /tmp/src/gateway/
RUN cd /tmp/src \
 && pip install --no-cache-dir --no-deps --no-build-isolation . \
 && pip check \
 && cd / \
 && rm -rf /tmp/src \
 && python -c "import gateway.settings as s; assert s.DEFAULT_CONFIG_PATH.is_file() and not s.DEFAULT_CONFIG_PATH.is_symlink()"

# The admin API must listen on 0.0.0.0 for a published port to reach it; the gateway refuses that without
# TLS unless told that the network protects it. Publish 8081 on loopback or a private network only.
ENV GATEWAY_PROXY_LISTEN=0.0.0.0:8080 \
    GATEWAY_ADMIN_LISTEN=0.0.0.0:8081 \
    GATEWAY_ADMIN_ALLOW_REMOTE=true \
    GATEWAY_DATABASE_URL=sqlite:////data/gateway.db

USER 10001:10001
WORKDIR /data
VOLUME /data
EXPOSE 8080 8081

# Asks the admin API where GATEWAY_ADMIN_LISTEN says, bypassing any HTTP_PROXY; /healthz is 200 only when the
# store answers.
HEALTHCHECK --interval=30s --timeout=5s --start-period=15s --retries=3 \
  CMD ["python", "-c", "import os, sys, urllib.request\nhost, _, port = os.environ.get('GATEWAY_ADMIN_LISTEN', '0.0.0.0:8081').rpartition(':')\nhost = host.strip('[]')\nhost = {'': '127.0.0.1', '0.0.0.0': '127.0.0.1', '::': '::1'}.get(host, host)\nhost = f'[{host}]' if ':' in host else host\nopener = urllib.request.build_opener(urllib.request.ProxyHandler({}))\ntry:\n    opener.open(f'http://{host}:{port}/healthz', timeout=4)\nexcept Exception as error:\n    sys.exit(f'unhealthy: {error}')"]

STOPSIGNAL SIGTERM
CMD ["gateway", "serve"]
