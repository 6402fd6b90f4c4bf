"""The CPU thread count."""


import os

import torch


def test_threads_option_and_default():
    from rho1.threads import idle_cores, set_threads

    before = torch.get_num_threads()
    try:
        assert set_threads(1) == 1
        idle = idle_cores(0.05)
        assert idle is None or 1 <= idle <= (os.cpu_count() or 1)
    finally:
        torch.set_num_threads(before)
