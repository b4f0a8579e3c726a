# syntax=docker/dockerfile:1
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md constraints.txt ./
COPY proxy ./proxy
COPY rules ./rules
# Dependencies pinned by constraints.txt: the image gets the versions the tests ran with.
RUN pip install --no-cache-dir --prefix=/install -c constraints.txt .

FROM python:3.11-slim
# The proxy runs as uid/gid 10001: a bind-mounted data folder must be writable by it
# (chown -R 10001:10001 ./data on the host).
RUN groupadd --gid 10001 proxy \
    && useradd --create-home --uid 10001 --gid 10001 proxy \
    && mkdir -p /home/proxy/data \
    && chown proxy:proxy /home/proxy/data
COPY --from=build /install /usr/local
USER proxy
# The listen address comes from the environment, not from CMD: `docker run image --port 9000`
# still listens on every interface.
ENV PROXY_HOST=0.0.0.0 \
    PROXY_PORT=8080 \
    PROXY_DATA_DIR=/home/proxy/data \
    PYTHONUNBUFFERED=1
VOLUME ["/home/proxy/data"]
EXPOSE 8080
# healthcheck finds the port the proxy was started with (flag or env) in the data folder.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s CMD ["python", "-m", "proxy", "healthcheck"]
ENTRYPOINT ["python", "-m", "proxy"]
CMD []
