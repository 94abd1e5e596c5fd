# ngx_chat_module demo image: Debian's nginx 1.22 + the module, PostgreSQL 15
# and the demo token server, all in one container.
#
#   docker build -t ngx-chat .
#   docker run --rm -p 8080:8080 ngx-chat
#   open http://127.0.0.1:8080/demo/?user=alice (and ?user=bob in another window)
FROM debian:bookworm

ENV DEBIAN_FRONTEND=noninteractive \
    HTTP_LISTEN=0.0.0.0:8080

WORKDIR /opt/ngx_chat
COPY . .

# scripts/install-deps.sh installs only what is missing (--runtime: not the
# test browsers) and keeps the packages from starting system services
RUN bash scripts/install-deps.sh --runtime \
    && make NODEPS=1 build \
    && rm -rf /var/lib/apt/lists/*

EXPOSE 8080

# make run initializes var/ on first start (cluster, secret, migrations) and
# starts PostgreSQL, nginx and the demo app in the background; the container
# then follows the logs in the foreground. `docker stop` sends SIGTERM to the
# shell, which stops the stack.
STOPSIGNAL SIGTERM
CMD ["bash", "-c", "trap 'make NODEPS=1 stop; exit 0' TERM INT; make NODEPS=1 run && { tail -n +1 -F var/logs/*.log & wait $!; }"]
