# A hospital's sicfed site: validates its YAML, prepares its data cache and joins the
# federation as a Flower SuperNode (python -m client join). Build from the checkout's root
# (.dockerignore keeps the venv, data, runs and git history out of the build context):
#
#   docker build -f docker/site.Dockerfile -t sicfed-site .
#   docker run --rm -v /srv/hospital:/site sicfed-site \
#       --site /site/site.yaml --superlink coordinator.example.org:8000 \
#       --root-certificates /site/ca.crt
#
# The mounted folder holds the site YAML, the data it names (paths inside the container,
# e.g. /site/dicom) and its state_dir (cache, privacy ledger, reports): everything that must
# survive the container. Nothing else is written. The container runs as uid 10001, gid 10001
# (user and group "site"): that uid must be able to read the folder and write its state_dir
# (README, "Joining with Docker").
#
# Base image: an exact Python and Debian release, never a floating tag. No digest is given
# because none could be verified where this file was written (no registry access); to pin
# the bytes too, append the digest your registry reports, as
#   docker buildx imagetools inspect python:3.11.13-slim-bookworm
#   FROM python:3.11.13-slim-bookworm@sha256:<digest>
# in both stages (a test keeps them the same).

# Stage 1: the sicfed wheel (sic_core only), built with a pinned build backend.
FROM python:3.11.13-slim-bookworm AS wheel
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
RUN pip install hatchling==1.33.0 trove-classifiers==2026.9.21.13 packaging==25.0 \
        pathspec==1.1.1 pluggy==1.7.0
COPY pyproject.toml README.md ./
COPY sic_core sic_core
RUN pip wheel --no-deps --no-build-isolation --wheel-dir /wheels .

# Stage 2: the site.
FROM python:3.11.13-slim-bookworm
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1

# CPU wheels of the same torch and torchvision the project pins in the Makefile; their own
# dependencies come pinned from site-requirements.txt below.
RUN pip install --no-deps torch==2.14.1 torchvision==0.29.1 \
        --index-url https://download.pytorch.org/whl/cpu

WORKDIR /opt/sicfed
# Every package a site needs, pinned, and nothing else: no MLflow (sites never talk to the
# tracking server; docker/pin_site_requirements.py writes this list).
COPY docker/site-requirements.txt docker/site-requirements.txt
RUN pip install -r docker/site-requirements.txt
# sic_core without dependencies: pyproject's list also names the coordinator's MLflow.
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
