"""The C++ host shim is built at install and importable."""

import hetero._host as host


def test_shim_reports_its_build():
    info = host.build_info()
    assert info["compiler"] and info["cplusplus"] >= 201703
    assert info["hardware_threads"] >= 1
