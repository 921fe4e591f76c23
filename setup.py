from setuptools import find_packages, setup

setup(
    name="lstm-triton",
    version="0.1.0",
    description="A fused-kernel LSTM for PyTorch written in Triton: a drop-in for torch.nn.LSTM / LSTMCell",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["lstm_triton", "lstm_triton.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.5", "triton>=3.2", "numpy"],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "hypothesis"],
        "bench": ["matplotlib", "tqdm"],
    },
    license="MIT",
)
