# edgeinspect line daemon, CPU image (amd64 and arm64: x86 boxes, ARM boxes, Docker on Apple silicon).
#   docker buildx build --platform linux/amd64,linux/arm64 -t edgeinspect:cpu .
#   docker run --rm -v "$PWD/bundles:/bundles:ro" -p 5555:5555 -p 9108:9108 edgeinspect:cpu \
#       serve --bundle /bundles/washer --camera rtsp://camera1.local/stream1 --publish tcp://0.0.0.0:5555 \
#       --metrics-port 9108 --metrics-host 0.0.0.0
# Torch-free: only the runtime extra (ONNX Runtime, OpenCV headless, pyzmq, prometheus-client).
ARG PYTHON_VERSION=3.12

FROM python:${PYTHON_VERSION}-slim-bookworm AS build
WORKDIR /src
COPY setup.cfg pyproject.toml README.md ./
COPY edgeinspect/ edgeinspect/
COPY train/ train/
COPY export/ export/
COPY runtime/ runtime/
COPY camera/ camera/
COPY configs/ configs/
COPY deploy/install-runtime.sh deploy/
RUN sh deploy/install-runtime.sh /opt/edgeinspect /src

FROM python:${PYTHON_VERSION}-slim-bookworm
LABEL org.opencontainers.image.title="edgeinspect" \
      org.opencontainers.image.description="edgeinspect line daemon (CPU, torch-free runtime)" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /opt/edgeinspect /opt/edgeinspect
RUN useradd --system --uid 10001 --create-home --home-dir /var/lib/edgeinspect edgeinspect \
    && mkdir /var/lib/edgeinspect/journal && chown 10001 /var/lib/edgeinspect/journal
ENV PATH=/opt/edgeinspect/bin:$PATH \
    PYTHONUNBUFFERED=1
USER 10001
WORKDIR /var/lib/edgeinspect
EXPOSE 5555 9108
# healthy while the serve loop publishes (needs --metrics-port 9108 --metrics-host 0.0.0.0)
HEALTHCHECK --interval=15s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9108/healthz', timeout=2)"]
ENTRYPOINT ["edgeinspect"]
CMD ["--help"]
