"""PEP 517 backend: setuptools, but able to see the torch installed in the target environment.

pip builds in an isolated environment that hides the caller's site-packages, so a torch extension
would either fail to import torch or pull a second multi-GB torch into the build. This backend
appends the target environment's own site-packages (same interpreter, same prefix) to sys.path,
after the isolated build requirements, so `pip install .` compiles against the torch the user
already has. With --no-build-isolation it changes nothing.
"""
import sys
import sysconfig

from setuptools import build_meta as _orig

for _key in ("purelib", "platlib"):
    _path = sysconfig.get_paths()[_key]
    if _path not in sys.path:
        sys.path.append(_path)

get_requires_for_build_wheel = _orig.get_requires_for_build_wheel
get_requires_for_build_sdist = _orig.get_requires_for_build_sdist
prepare_metadata_for_build_wheel = _orig.prepare_metadata_for_build_wheel
build_wheel = _orig.build_wheel
build_sdist = _orig.build_sdist
get_requires_for_build_editable = _orig.get_requires_for_build_editable
prepare_metadata_for_build_editable = _orig.prepare_metadata_for_build_editable
build_editable = _orig.build_editable
