"""The package list, derived from the tree so that no sub-package can be left out of the wheel.

fxcompile/ is the core; passes/ and backends/ are installed as fxcompile.passes and
fxcompile.backends (docs/design.md, Layout). Everything else lives in pyproject.toml.
"""
from setuptools import find_packages, setup

ROOTS = {"fxcompile": "fxcompile", "fxcompile.passes": "passes", "fxcompile.backends": "backends"}
PACKAGES = [name for name in ROOTS] + [f"{name}.{sub}" for name, folder in ROOTS.items()
                                        for sub in find_packages(folder)]

setup(packages=PACKAGES, package_dir=ROOTS)
