# A hospital's sicfed site: validates its YAML, prepares its data cache and joins the
# federation as a Flower SuperNode (python -m client join). Build from the checkout's root:
#
#   docker build -f docker/site.Dockerfile -t sicfed-site .
#   docker run --rm -v /srv/hospital:/site sicfed-site \
#       --site /site/site.yaml --superlink coordinator.example.org:8000 \
#       --root-certificates /site/ca.crt
#
# The mounted folder holds the site YAML, the data it names (paths inside the container,
# e.g. /site/dicom) and its state_dir (cache, privacy ledger, reports): everything that must
# survive the container. Nothing else is written.
FROM python:3.11-slim

ENV PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1

# CPU wheels of the same torch and torchvision the project pins in the Makefile.
RUN pip install torch==2.14.1 torchvision==0.29.1 \
        --index-url https://download.pytorch.org/whl/cpu

WORKDIR /opt/sicfed
COPY pyproject.toml README.md ./
COPY sic_core sic_core
RUN pip install .
COPY client client
COPY server server

RUN useradd --create-home --uid 10001 site && mkdir /site && chown site /site
USER site
VOLUME ["/site"]

# `python -m client` runs from /opt/sicfed (the client and server packages live here).
ENTRYPOINT ["python", "-m", "client", "join"]
CMD ["--help"]
