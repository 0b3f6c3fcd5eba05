import os

import torch
from hypothesis import HealthCheck, settings

# Batch-1 decoding of tiny models is dispatch-bound: a second OpenMP thread only adds synchronisation,
# and on a shared 2-core machine it can make every step many times slower.
torch.set_num_threads(1)

# "ci": bounded examples, no deadline (shared, noisy machines); "dev": more examples; "thorough": 500.
# "ci" is the default, so the README's test command is bounded with or without CI=true; the others are
# asked for by name (HYPOTHESIS_PROFILE=dev or thorough).
settings.register_profile("ci", max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


import sys  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture
def installed_plugin(tmp_path, monkeypatch):
    """Install a throwaway distribution that declares ``module`` under the ``blt_decode`` entry point.

    Writes ``<dist>.dist-info`` with METADATA and entry_points.txt into tmp_path (the module's source must
    be written there by the caller), puts tmp_path on sys.path and resets the plugin registry, so the
    plugin is found exactly as an installed package would be. Undone after the test."""
    from blt_decode import plugins

    added: list[str] = []

    def install(dist_name: str, entry_name: str, module: str) -> None:
        dist = tmp_path / f"{dist_name.replace('-', '_')}-0.1.0.dist-info"
        dist.mkdir()
        (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist_name}\nVersion: 0.1.0\n")
        (dist / "entry_points.txt").write_text(f"[blt_decode]\n{entry_name} = {module}\n")
        added.append(module)
        monkeypatch.syspath_prepend(str(tmp_path))
        plugins.reset()

    yield install
    plugins.reset()
    for module in added:
        sys.modules.pop(module, None)


@pytest.fixture
def address_space_limit():
    """``with address_space_limit(headroom):`` lets this process map at most ``headroom`` more bytes
    (RLIMIT_AS): an allocation past it fails in the real allocator, as under memory pressure, without
    touching any memory. Linux only (skipped elsewhere)."""
    import contextlib
    import resource
    from pathlib import Path

    status = Path("/proc/self/status")
    if not status.exists():
        pytest.skip("needs Linux's /proc to measure the address space")

    @contextlib.contextmanager
    def limit(headroom: int):
        size = int(status.read_text().split("VmSize:")[1].split()[0]) * 1024
        before = resource.getrlimit(resource.RLIMIT_AS)
        resource.setrlimit(resource.RLIMIT_AS, (size + headroom, before[1]))
        try:
            yield
        finally:
            resource.setrlimit(resource.RLIMIT_AS, before)

    return limit
