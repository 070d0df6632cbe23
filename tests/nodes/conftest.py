import pytest

from tests.nodes.comfy_server import start_server


@pytest.fixture(scope="session")
def comfy(tmp_path_factory):
    server = start_server(tmp_path_factory.mktemp("comfyui"))
    yield server
    server.stop()
