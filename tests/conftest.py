import os

import pytest
import torch

# Keep the suite polite on 2-core machines; CI may raise it with SAEURON_TEST_THREADS.
torch.set_num_threads(int(os.environ.get("SAEURON_TEST_THREADS", "2")))

HOOK = "up_blocks.1.attentions.1"


@pytest.fixture(scope="session")
def tiny_pipe():
    from saeuron_core.hosts.tiny_pipeline import make_tiny_pipeline

    return make_tiny_pipeline(seed=0)


@pytest.fixture()
def fresh_tiny_pipe():
    from saeuron_core.hosts.tiny_pipeline import make_tiny_pipeline

    return make_tiny_pipeline(seed=0)


@pytest.fixture(scope="session")
def comfy(tmp_path_factory):
    """The real ComfyUI host (imported in-process, CPU) with this pack loaded; see tests/comfy_host.py."""
    import comfy_host

    return comfy_host.start(tmp_path_factory.mktemp("comfy"))
