import os

import pytest

os.environ.setdefault("LMSTACK_NO_PROGRESS", "1")


@pytest.fixture
def one_thread():
    """Tiny models train faster and steadier on one thread than on two that contend for a
    shared machine."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
