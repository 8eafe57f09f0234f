"""Shim so older tooling (``pip install -e .`` on old pips, ``python setup.py``) works; metadata is in setup.cfg."""
from setuptools import setup

setup()
