# The Airflow image with this project's dependencies, for docker-compose.yaml. The project itself is mounted at
# /opt/airflow/project at run time, so the editable install below always runs the checked-out code.
ARG AIRFLOW_VERSION=3.3.2
FROM apache/airflow:${AIRFLOW_VERSION}-python3.11

COPY --chown=airflow:0 . /opt/airflow/project
# torch first, from the CPU index: with it installed nothing resolves a CUDA build.
RUN pip install --no-cache-dir "torch==2.13.0+cpu" --index-url https://download.pytorch.org/whl/cpu \
    && pip install --no-cache-dir -e "/opt/airflow/project[ml,local,report]"
