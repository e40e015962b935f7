# proxy_service: the image proxy (default) and the refresher worker, one image.
#
#   docker build -t proxy-service .
#   docker run -p 8080:8080 -p 9090:9090 --env-file proxy.env proxy-service      # proxy
#   docker run --env-file proxy.env proxy-service refresher                      # refresher
#
# Settings are PROXY_* environment variables (README, "Configuration"); secrets never go in here.
# Linted by tests/test_deploy.py with hadolint (any finding fails the test).

# ---- builder: build the wheel, install it and its dependencies into /opt/venv ----------------
FROM python:3.11-slim AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY proxy_service ./proxy_service
# No compiler, even here: the compiled dependencies (uvloop, httptools, hiredis, orjson, aiohttp,
# pycryptodome) ship manylinux wheels, and crcmod (sdist only) builds its pure-Python fallback.
# The venv gets no pip of its own: the builder's pip installs into it and byte-compiles it (the
# root filesystem is read-only at run time).
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels . \
    && python -m venv --without-pip /opt/venv \
    && pip --python /opt/venv/bin/python install --no-cache-dir /wheels/*.whl

# ---- runtime: the same slim base, the venv only, a numeric non-root user ----------------------
FROM python:3.11-slim
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PROXY_HOST=0.0.0.0 \
    PROXY_INTERNAL_HOST=0.0.0.0
RUN groupadd --system --gid 10001 proxy \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin proxy
COPY --from=builder /opt/venv /opt/venv
WORKDIR /tmp
USER 10001:10001
# 8080: public images listener (PROXY_PORT); 9090: internal /metrics, /healthz, /readyz
# (PROXY_INTERNAL_PORT), for the proxy and the refresher alike.
EXPOSE 8080 9090
# The slim base has no curl: probe the internal listener with the standard library.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request; port = os.environ.get('PROXY_INTERNAL_PORT', '9090'); sys.exit(0 if urllib.request.urlopen(f'http://127.0.0.1:{port}/healthz', timeout=4).status == 200 else 1)"]
ENTRYPOINT ["proxy-service"]
CMD ["serve", "--host", "0.0.0.0", "--internal-host", "0.0.0.0"]
