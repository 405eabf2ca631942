"""Build step: models.toml stays at the repo root (the registry people edit) and ships in the
wheel as pixlocal/models.toml package data, where pixlocal.cli.registry reads it. Everything else
is in pyproject.toml."""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPy(build_py):
    def run(self) -> None:
        super().run()
        if not self.editable_mode:  # an editable install reads the repo's own models.toml
            self.copy_file(str(Path(__file__).parent / "models.toml"),
                           str(Path(self.build_lib, "pixlocal", "models.toml")))


setup(cmdclass={"build_py": BuildPy})
