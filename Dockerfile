# xdsproxy. Not built on the development machines (no Docker engine there): kept small and
# plain so it is right by reading. Build: docker build -t ghcr.io/xdsproxy/xdsproxy:0.1.0 .
FROM python:3.11.11-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY xdsproxy ./xdsproxy
RUN pip install --no-cache-dir --prefix=/install .

FROM python:3.11.11-slim-bookworm
COPY --from=build /install /usr/local
RUN useradd --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin xdsproxy
USER 10001:10001
EXPOSE 15010 15012 15014 15020
ENTRYPOINT ["xdsproxy"]
CMD ["serve", "--help"]
