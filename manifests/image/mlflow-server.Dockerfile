# The MLflow tracking server of manifests/base/mlflow.yaml: MLflow pinned to the client
# version the project uses, with the PostgreSQL driver and MLflow's `auth` extra (Flask-WTF,
# which the basic-auth app needs). Artifacts go to a local directory (a PersistentVolume), so
# no storage SDK is needed. Build context is the repository root:
#   docker build -f manifests/image/mlflow-server.Dockerfile \
#     -t registry.example.com/lopt-mlflow-server:3.17.2 .
# Pin the base by digest for reproducible builds (see Dockerfile beside this one).
FROM python:3.11.7-slim-bookworm

ARG MLFLOW_UID=10001
ARG MLFLOW_GID=10001

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MLFLOW_DISABLE_TELEMETRY=true \
    HOME=/home/mlflow

RUN groupadd --gid "${MLFLOW_GID}" mlflow \
 && useradd --uid "${MLFLOW_UID}" --gid "${MLFLOW_GID}" --create-home --home-dir /home/mlflow \
        --shell /usr/sbin/nologin mlflow \
 && mkdir -p /mlflow/artifacts \
 && chown mlflow:mlflow /mlflow/artifacts

# MLflow's own dependencies at the versions the project's client runs with (constraints.txt
# pins mlflow==3.17.2 and everything it needs); the driver and the auth extra's packages are
# not in that set, so they are pinned here to what the tests ran the server with.
COPY manifests/image/constraints.txt /tmp/constraints.txt
RUN pip install --no-cache-dir --constraint /tmp/constraints.txt \
        "mlflow[auth]==3.17.2" psycopg2-binary==2.9.13 Flask-WTF==1.3.0 WTForms==3.3.2 \
 && pip check \
 && rm /tmp/constraints.txt

USER 10001:10001
WORKDIR /home/mlflow
EXPOSE 5000
# The Deployment passes the flags (backend store, artifacts, allowed hosts).
ENTRYPOINT ["mlflow", "server"]
CMD ["--host=0.0.0.0", "--port=5000"]
