# A hospital's sicfed site: validates its YAML, prepares its data cache and joins the
# federation as a Flower SuperNode (python -m client join), training on the site's GPU when
# the container is given one. Build from the checkout's root (`make image` picks docker or
# podman and tags sicfed-site:<version>; .dockerignore keeps the venv, data, runs and git
# history out of the build context):
#
#   make image
#   docker run -d --name sicfed-site --restart unless-stopped --gpus all \
#       --read-only --tmpfs /tmp -v /srv/hospital:/site sicfed-site:0.1.0 \
#       --site /site/site.yaml --superlink coordinator.example.org:8000 \
#       --root-certificates /site/ca.crt --auth-key /site/keys/site_ecdsa
#
# The mounted folder holds everything that must survive the container: the site YAML, the
# data it names (paths inside the container, e.g. /site/data), the site's key pair
# (`client keygen --out /site/keys`), the coordinator's CA certificate and the state_dir
# (cache, privacy ledger, reports); site_configs/docker_site.yaml is an example. Nothing else
# is written: the image runs with a read-only root. The container runs as uid 10001, gid
# 10001 (user and group "site"), which must be able to read the folder and write to it
# (keygen writes keys/, approve replaces site.yaml through a temporary file beside it, the
# site writes its state_dir). The hospital's guide, docs/how-to/site.md, walks through it.
#
# A GPU needs the NVIDIA Container Toolkit on the host (docker run --gpus all; podman: CDI,
# --device nvidia.com/gpu=all); `compute.device: auto` in the site YAML then trains on the
# first GPU the container sees, and on the CPU when it sees none.
#
# Build arguments:
#   BASE_IMAGE      an exact Python release on Debian (default below), or any Debian-based
#                   image with python3 and python3-venv (e.g. one made by docker/local-base.sh)
#   TORCH_VARIANT   cuda (default: torch's CUDA build from PyPI, for GPU servers) or cpu
#                   (torch's CPU build from TORCH_CPU_INDEX_URL: a 1 GB image instead of 6.5 GB)
#   PIP_INDEX_URL, PIP_EXTRA_INDEX_URL, PIP_FIND_LINKS, PIP_TRUSTED_HOST, PIP_CERT
#                   pip's own settings, for a hospital behind a proxy or with a mirror; with
#                   podman, a CA bundle is mounted for the build, e.g.
#                   -v /etc/ssl/certs/ca-certificates.crt:/tmp/proxy-ca.crt:ro
#                   --build-arg PIP_CERT=/tmp/proxy-ca.crt
#
# Base image: an exact Python and Debian release, never a floating tag. No digest is given
# because none could be verified where this file was written (no registry access); to pin
# the bytes too, append the digest your registry reports, as
#   docker buildx imagetools inspect python:3.11.13-slim-bookworm
#   --build-arg BASE_IMAGE=python:3.11.13-slim-bookworm@sha256:<digest>
ARG BASE_IMAGE=python:3.11.13-slim-bookworm

# Stage 1: the sicfed wheel (sic_core only), built with a pinned build backend.
FROM ${BASE_IMAGE} AS wheel
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_FIND_LINKS
ARG PIP_TRUSTED_HOST
ARG PIP_CERT
# Our own virtual environment: a plain Debian base has python3 but neither pip nor `python`.
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PATH=/opt/build/bin:$PATH
RUN python3 -m venv /opt/build
WORKDIR /src
RUN pip install hatchling==1.33.0 trove-classifiers==2026.9.21.13 packaging==25.0 tomlkit==0.15.3 \
        pathspec==1.1.1 pluggy==1.7.0
COPY pyproject.toml README.md ./
COPY sic_core sic_core
RUN pip wheel --no-deps --no-build-isolation --wheel-dir /wheels .

# Stage 2: the site.
FROM ${BASE_IMAGE}
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_FIND_LINKS
ARG PIP_TRUSTED_HOST
ARG PIP_CERT
ARG TORCH_VARIANT=cuda
ARG TORCH_CPU_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PATH=/opt/venv/bin:$PATH
RUN python3 -m venv /opt/venv

WORKDIR /opt/sicfed
COPY docker/site-requirements.txt docker/site-requirements.txt
# The torch and torchvision the project pins in the Makefile. The CUDA build brings the
# CUDA runtime wheels it pins itself (nvidia-*, triton); its other dependencies are held to
# site-requirements.txt. The CPU build comes without dependencies: the next step adds them.
RUN case "$TORCH_VARIANT" in \
      cuda) pip install -c docker/site-requirements.txt torch==2.14.1 torchvision==0.29.1 ;; \
      cpu) pip install --no-deps --index-url "$TORCH_CPU_INDEX_URL" \
             torch==2.14.1 torchvision==0.29.1 ;; \
      *) echo "TORCH_VARIANT must be cuda or cpu, not '$TORCH_VARIANT'" >&2; exit 1 ;; \
    esac
# Every package a site needs, pinned, and nothing else: no MLflow (sites never talk to the
# tracking server; docker/pin_site_requirements.py writes this list).
RUN pip install -r docker/site-requirements.txt
# sic_core without dependencies (they are all above).
COPY --from=wheel /wheels /wheels
RUN pip install --no-deps /wheels/*.whl && rm -rf /wheels
# The site CLI only: the coordinator's server/ (and its MLflow) has no place on a site, and
# the ClientApp itself comes from the app bundle the SuperLink sends.
COPY client client

RUN groupadd --gid 10001 site \
    && useradd --create-home --uid 10001 --gid 10001 site \
    && mkdir /site && chown site:site /site
USER site
VOLUME ["/site"]

# `python -m client` runs from /opt/sicfed (the client package lives here).
ENTRYPOINT ["python", "-m", "client", "join"]
CMD ["--help"]
