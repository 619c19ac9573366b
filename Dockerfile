# One image for every smtpgw service (`smtpgw run receiver|scanner|delivery|quarantine|updater`)
# and for clamd (deploy/clamd-entrypoint.sh). docker-compose.yml and k8s/ run it.
FROM python:3.11-slim-bookworm

# ClamAV from Debian: clamd for the clamd container; clamscan and freshclam for the updater,
# which verifies new signatures with a throw-away engine before any clamd loads them.
RUN apt-get update \
    && apt-get install -y --no-install-recommends clamav clamav-daemon clamav-freshclam \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/smtpgw
# What `pip install .` needs first, so that a change elsewhere does not reinstall.
COPY pyproject.toml README.md ./
COPY shared/ shared/
COPY services/ services/
# The directories the volumes mount on belong to the service user in the image, so that
# Docker gives a new named volume that owner (Kubernetes does it with fsGroup).
RUN pip install --no-cache-dir . \
    && useradd --system --uid 10025 --user-group --home-dir /var/lib/smtpgw --create-home smtpgw \
    && install -d -o smtpgw -g smtpgw /var/lib/smtpgw/shared /var/lib/smtpgw/quarantine /var/lib/smtpgw/updater
# The bundled clamd settings and signatures, and the containers' own files.
COPY etc/ etc/
COPY deploy/ deploy/

# Not root: the receiver listens on 2525 and the host or the load balancer maps port 25 to it.
USER 10025:10025
ENV PYTHONUNBUFFERED=1
EXPOSE 2525 9101
# The service answers for itself on its metrics port (/healthz: its event loops run). The clamd
# container, from the same image, has a check of its own (docker-compose.yml).
HEALTHCHECK --interval=30s --timeout=10s --start-period=30s --retries=3 \
    CMD ["smtpgw", "health", "-c", "/etc/smtpgw/smtpgw.toml"]
ENTRYPOINT ["smtpgw"]
CMD ["run", "all", "-c", "/etc/smtpgw/smtpgw.toml"]
