# MLflow tracking server image for k8s/base/mlflow-deployment.yaml.
# The official image has mlflow only; the deployment needs the PostgreSQL driver (backend store)
# and boto3 (artifacts proxied to the S3 store). Versions match pyproject.toml / constraints.txt.
#
#   docker build -f images/mlflow.Dockerfile -t <registry>/dfka-mlflow:3.17.2-1 images/
#   docker push <registry>/dfka-mlflow:3.17.2-1
# then point the overlay at it (k8s/README.md, "MLflow image"). Bump the "-1" suffix whenever this
# file changes; never push "latest".
ARG MLFLOW_VERSION=3.17.2
FROM ghcr.io/mlflow/mlflow:v${MLFLOW_VERSION}

RUN python -m pip install --no-cache-dir --disable-pip-version-check \
        "psycopg2-binary==2.9.13" \
        "boto3==1.44.5" \
    && python -c "import mlflow, psycopg2, boto3; print('mlflow', mlflow.__version__)"

# Non-root, numeric so that Kubernetes can verify runAsNonRoot; matches the Deployment's runAsUser.
ENV HOME=/tmp
USER 10001:10001
EXPOSE 5000
CMD ["mlflow", "server", "--host", "0.0.0.0", "--port", "5000"]
