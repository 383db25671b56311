"""Packaging glue: the component library and the runtime live at the top of the repository
(``components/``, ``runtime/``) but install as ``physlm_graph.components`` and
``physlm_graph.runtime``; the family blueprints (``blueprints/families/*.yaml``, what ``import`` and
``export`` compile) install as ``physlm_graph/families/``. pyproject.toml holds everything else."""

from setuptools import find_packages, setup

SUBPACKAGES = {"components": "physlm_graph.components", "runtime": "physlm_graph.runtime"}

packages = ["physlm_graph", "physlm_graph.cli", "physlm_graph.families"]
for folder, name in SUBPACKAGES.items():
    packages += [name + p[len(folder):] for p in find_packages(".", include=[folder, f"{folder}.*"])]

setup(
    packages=packages,
    package_dir={"physlm_graph": "physlm_graph", "physlm_graph.families": "blueprints/families",
                 **{name: folder for folder, name in SUBPACKAGES.items()}},
    package_data={"physlm_graph": ["py.typed"], "physlm_graph.families": ["*.yaml"]},
)
