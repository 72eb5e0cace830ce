"""big_embed: contrastive embedding models in JAX/Flax, from one CPU to a pod."""

import setuptools

INSTALL_REQUIRES = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "tensorflow-datasets==4.9.10",
    "grain==0.2.18",
    "pysword==0.2.8",  # Reads the SWORD Bible modules of the bible corpus.
    "ml-collections==1.1.0",
    "absl-py",
    "numpy",
    "pillow",
    "importlib_resources",
    "safetensors",
    "tokenizers",
    "tqdm",
    "tensorboardX",
]

setuptools.setup(
    name="big_embed",
    version="0.1.0",
    description="Contrastive embedding models in JAX/Flax at any scale.",
    packages=setuptools.find_packages(include=["big_embed", "big_embed.*"]),
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require={
        # scikit-learn: independent metric and probe references; portpicker: ports for multi-process tests;
        # nbclient ... matplotlib: tests/test_notebook.py executes notebooks/analyze_checkpoint.ipynb;
        # pytest-xdist: the suite runs on two workers (pytest.ini).
        "test": ["pytest", "pytest-xdist", "hypothesis", "scikit-learn>=1.5", "portpicker", "nbclient", "nbformat",
                 "ipykernel", "matplotlib"],
        "notebooks": ["jupyter", "nbconvert", "nbclient", "ipykernel", "matplotlib"],
    },
    entry_points={"console_scripts": ["big-embed=big_embed.main:run"]},
)
