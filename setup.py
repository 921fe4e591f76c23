from setuptools import find_packages, setup

setup(
    name="lstm-triton",
    version="0.1.0",
    description="A fused-kernel LSTM for PyTorch written in Triton: a drop-in for torch.nn.LSTM / LSTMCell",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["lstm_triton", "lstm_triton.*"]),
    # Exactly the range CI tests (.ci/run): the GPU machines' stack (Python 3.12, torch 2.11, triton 3.6,
    # numpy 2.5) up to the newest this project pins (Python 3.11 with torch 2.13, triton 3.9, numpy 2.4).
    python_requires=">=3.11,<3.13",
    install_requires=["torch>=2.11,<=2.13.0", "triton>=3.6,<=3.9.0", "numpy>=2.4,<=2.5.2"],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "hypothesis"],
        "bench": ["matplotlib", "tqdm"],
    },
    license="MIT",
)
