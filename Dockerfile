# The project image: the controlplane package (with bees/) in a venv at /opt/venv.
# Build it with scripts/build-images.sh, which first puts the project's wheel and its locked
# dependencies (requirements.lock, hashes checked) in build/wheels, so the build itself needs no
# network, and builds the local base image.
FROM controlplane-base:bookworm AS install
LABEL controlplane.stage=install
COPY build/wheels /wheels
RUN python3 -m venv /opt/venv \
 && /opt/venv/bin/pip install -q --no-index --find-links /wheels --require-hashes -r /wheels/requirements.lock \
 && /opt/venv/bin/pip install -q --no-index --no-deps /wheels/controlplane-*.whl

FROM controlplane-base:bookworm
COPY --from=install /opt/venv /opt/venv
# The one place the image's user may write (the gateway's SQLite file in docker-compose).
RUN mkdir -p /data && chown 10001:10001 /data
COPY scenarios /opt/controlplane/scenarios
ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PYTHONUNBUFFERED=1 \
    LANG=C.UTF-8 \
    CP_SCENARIOS_DIR=/opt/controlplane/scenarios
# Not root: the runtime also starts every container with this user (CP_CONTAINER_USER).
USER 10001:10001
CMD ["controlplane", "--help"]
