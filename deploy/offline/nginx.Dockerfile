# A stand-in for nginx:<version>-alpine where no registry can be reached: Debian's nginx on the
# debootstrapped base of base-image.sh, reading /etc/nginx/conf.d/*.conf as the official image does (the
# cluster file mounts deploy/nginx.conf there). Used by `deploy/smoke.py --offline` as NGINX_IMAGE.
ARG BASE_IMAGE=deltaserve-base:bookworm
FROM ${BASE_IMAGE}
RUN apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends nginx-light \
    && rm -rf /var/lib/apt/lists/* /etc/nginx/sites-enabled/* \
    && ln -sf /dev/stdout /var/log/nginx/access.log && ln -sf /dev/stderr /var/log/nginx/error.log \
    && nginx -v
EXPOSE 80
# As the official image: SIGQUIT is nginx's graceful stop (finish open requests).
STOPSIGNAL SIGQUIT
CMD ["nginx", "-g", "daemon off;"]
