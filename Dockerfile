# syntax=docker/dockerfile:1
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY proxy ./proxy
COPY rules ./rules
RUN pip install --no-cache-dir --prefix=/install .

FROM python:3.11-slim
RUN useradd --create-home --uid 10001 proxy \
    && mkdir -p /home/proxy/data \
    && chown proxy:proxy /home/proxy/data
COPY --from=build /install /usr/local
USER proxy
ENV PROXY_DATA_DIR=/home/proxy/data \
    PYTHONUNBUFFERED=1
VOLUME ["/home/proxy/data"]
EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=3s CMD python -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:8080/_proxy/health', timeout=2)" || exit 1
ENTRYPOINT ["python", "-m", "proxy"]
CMD ["--host", "0.0.0.0", "--port", "8080"]
