# imagepub: one image for the API (`imagepub serve`, the default) and the
# workers (`imagepub worker`).
#
#   docker build -t imagepub .
#
# Offline (pip in the build cannot reach an index): make a wheelhouse in the
# build context first, with a Python of the image's minor version, then
#   pip wheel -w wheelhouse . setuptools wheel
#   docker build --build-arg PIP_NO_INDEX=1 --build-arg PIP_FIND_LINKS=/src/wheelhouse -t imagepub .
ARG BASE=python:3.11-slim-bookworm

# --- builder: wheels for imagepub and all its dependencies, then a venv
# installed from those wheels alone. The venv's own pip does the work, so the
# base needs nothing beyond python and its venv module.
FROM ${BASE} AS builder
# Unset unless given; pip reads them from the environment of the RUN below.
ARG PIP_NO_INDEX PIP_FIND_LINKS
COPY . /src/
RUN python -m venv /opt/imagepub \
 && /opt/imagepub/bin/pip --disable-pip-version-check wheel --no-cache-dir --wheel-dir /wheels /src \
 && /opt/imagepub/bin/pip --disable-pip-version-check install --no-cache-dir --no-index /wheels/*.whl

# --- runtime: the venv and a non-root user; no compiler, cache, wheel or test.
FROM ${BASE}
ARG VERSION=0.1.0 REVISION=unknown
LABEL org.opencontainers.image.title="imagepub" \
      org.opencontainers.image.description="Publishes container images from a Docker daemon to Amazon ECR and OCI registries, as an HTTP service." \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PATH=/opt/imagepub/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    IMAGEPUB_HEALTHCHECK_URL=http://127.0.0.1:8080/healthz
# skopeo (Debian's package) copies images registry to registry for the workers (POST /v1/copy),
# without a daemon. Its version follows the base's Debian release, with its security updates.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends skopeo \
 && rm -rf /var/lib/apt/lists/*
RUN groupadd --system --gid 10001 imagepub \
 && useradd --system --no-log-init --uid 10001 --gid imagepub \
      --home-dir /home/imagepub --create-home --shell /usr/sbin/nologin imagepub
EXPOSE 8080
# The API's liveness. A worker serves no HTTP: run it with --no-healthcheck.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(os.environ['IMAGEPUB_HEALTHCHECK_URL'], timeout=4)"]
# Numeric, so that Kubernetes' runAsNonRoot can verify it.
USER 10001:10001
ENTRYPOINT ["imagepub"]
CMD ["serve", "--bind", "0.0.0.0:8080"]
# Last: a code change rebuilds this one layer, and everything above stays cached.
# Owned by root, so the service cannot modify its own code.
COPY --from=builder /opt/imagepub /opt/imagepub
