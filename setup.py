"""What pyproject.toml cannot say: the repository's top-level ``weights/`` installs as the data-only
package ``srnode_weights``, so ``pip install .`` gives a node that finds its weights from any directory
(pipelines/weights.py looks there after ``$SRNODE_WEIGHTS`` and the source tree)."""
from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["node", "node.*", "pipelines", "pipelines.*"]), "srnode_weights"],
    package_dir={"srnode_weights": "weights"},
    package_data={"srnode_weights": ["*.safetensors", "*.md", "qa_thresholds.json"], "node.http": ["templates/*.html"]},
)
