import triton

from qlora_fast.kernels._utils import cdiv, next_power_of_2


def test_host_launch_arithmetic_matches_tritons():
    for n in list(range(1, 5000)) + [2**31 - 1, 2**31, 2**40 + 3]:
        assert next_power_of_2(n) == triton.next_power_of_2(n)
        for d in (1, 3, 64, 1024):
            assert cdiv(n, d) == triton.cdiv(n, d)
