# The emulator's fixtures for tests/kube. Other test packages: add
# `pytest_plugins = ["tests.kube.emulator"]` to the root tests/conftest.py (or import them likewise).
from tests.kube.emulator import kube, kube_api, kube_api_factory, kube_emulator, kube_url

__all__ = ['kube', 'kube_api', 'kube_api_factory', 'kube_emulator', 'kube_url']
