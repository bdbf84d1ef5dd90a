"""fxshard: an automatic model-parallel compiler for PyTorch."""

from setuptools import find_packages, setup

setup(
    name="fxshard",
    version="0.1.0",
    description="Automatic model-parallel compiler for PyTorch: capture, cost, partition, plan, run.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["fxshard", "fxshard.*"]),
    package_data={"fxshard": ["templates/*.tmpl"]},  # export's train.py template
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "networkx>=3.0",
        "pymetis>=2023.1",
        "scipy>=1.9",  # the milp partitioner (scipy.optimize.milp, HiGHS)
        "numpy>=1.24",
        "rich>=13.0",
    ],
    extras_require={
        "plot": ["matplotlib>=3.7"],
        "test": ["pytest>=7.4", "pytest-timeout>=2.1", "pytest-xdist>=3.5", "hypothesis>=6.80", "matplotlib>=3.7", "psutil>=5.9",
                 "transformers>=4.45"],
    },
    entry_points={"console_scripts": ["fxshard=fxshard.cli:main"]},
    classifiers=["Programming Language :: Python :: 3", "Topic :: Scientific/Engineering :: Artificial Intelligence"],
)
