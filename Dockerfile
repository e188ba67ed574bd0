# engram-serve image. Default: CUDA (PyTorch runtime base, CuPy via the "gpu" extra).
# CPU variant:
#   docker build --build-arg BASE=python:3.11-slim --build-arg EXTRAS= \
#     --build-arg PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu -t engram-serve:cpu .
ARG BASE=pytorch/pytorch:2.13.0-cuda12.8-cudnn9-runtime
FROM ${BASE}

ARG EXTRAS=gpu
ARG PIP_EXTRA_INDEX_URL=
ENV PIP_EXTRA_INDEX_URL=${PIP_EXTRA_INDEX_URL} \
    PYTHONUNBUFFERED=1 \
    ENGRAM_HOST=0.0.0.0 \
    ENGRAM_PORT=8000

RUN useradd --create-home --uid 1000 engram
WORKDIR /app
COPY --chown=engram:engram . /app
# The same install steps CI runs (.ci/install), with the image's extras.
RUN .ci/install "${EXTRAS}" && rm -rf /root/.cache

USER engram
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
  CMD python3 -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % (os.environ.get('ENGRAM_PORT') or 8000), timeout=4)"
# Settings come from ENGRAM_* environment variables (see `engram-serve --help`).
CMD ["engram-serve"]
