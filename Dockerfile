# The ipbatch image: workers, producer, reaper and migrations all run from it (`ipbatch ...`).
# TORCH_INDEX picks torch's build: CUDA 12.8 for GPU machines (the default), or
# https://download.pytorch.org/whl/cpu for a CPU-only image.
FROM python:3.11-slim

ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1

# OpenCV (pulled by insightface) needs these at import time
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgl1 libglib2.0-0 \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
# torch first and pinned, from the chosen index, so nothing pulls another build
RUN pip install torch==2.13.0 --index-url "$TORCH_INDEX"
COPY pyproject.toml README.md ./
COPY core ./core
COPY ipbatch ./ipbatch
COPY pipeline ./pipeline
COPY storage ./storage
COPY workers ./workers
COPY migrations ./migrations
RUN pip install .

# the code stays root's and read-only to the service; it writes under /data (IPBATCH_HOME), a
# volume it owns (Docker copies this ownership into a new named volume)
RUN useradd --create-home --uid 1000 ipbatch \
    && mkdir -p /data && chown ipbatch:ipbatch /data
ENV IPBATCH_HOME=/data
VOLUME /data
USER ipbatch
ENTRYPOINT ["ipbatch"]
CMD ["--help"]
