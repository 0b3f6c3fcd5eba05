import os

import torch
from hypothesis import HealthCheck, settings

# Batch-1 decoding of tiny models is dispatch-bound: a second OpenMP thread only adds synchronisation,
# and on a shared 2-core machine it can make every step many times slower.
torch.set_num_threads(1)

# "ci": bounded examples, no deadline (shared, noisy machines); "dev": more examples; "thorough": 500.
settings.register_profile("ci", max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))


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
