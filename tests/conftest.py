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
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="module")
def wrong_draft_backend():
    """The name of a registered backend whose drafter is always wrong (``testing.wrong_drafts``): every
    verification rejects the whole draft, so exactness cannot rest on the drafts."""
    from blt_decode import testing

    backend = testing.RewritingBackend("wrong-drafts", "test double: eager execution with a drafter that is always wrong",
                                       testing.wrong_drafts)
    with testing.registered_backend(backend) as name:
        yield name


@pytest.fixture
def installed_plugin(tmp_path, monkeypatch):
    """Install a throwaway distribution that declares ``module`` under the ``blt_decode`` entry point.

    Writes ``<dist>.dist-info`` with METADATA and entry_points.txt into tmp_path (the module's source must
    be written there by the caller), puts tmp_path on sys.path and resets the plugin registry, so the
    plugin is found exactly as an installed package would be. Undone after the test."""
    from blt_decode.plugins import registry as plugins
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


class UserVenv:
    """A fresh virtual environment as a plugin's user makes one, offline: it sees this test environment's
    packages (torch, blt-decode, pytest, hypothesis, pip, setuptools), pip installs with ``--no-deps
    --no-build-isolation``, and ``blt-decode`` on its PATH runs its interpreter. Every command is bounded
    by ``TIMEOUT_S``."""

    #: generous bounds for a shared, loaded machine; each step takes seconds
    TIMEOUT_S = 240

    def __init__(self, venv: Path):
        import os
        import site
        import subprocess
        from importlib.metadata import entry_points

        # --without-pip: pip and setuptools come from the test environment as well; Python 3.11's bundled
        # setuptools 65 would shadow them and needs `wheel` to build an editable install, which an offline
        # environment may not have
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", "--system-site-packages", str(venv)],
                       check=True, timeout=self.TIMEOUT_S)
        self.python = venv / "bin" / "python"
        purelib = subprocess.run([str(self.python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                                 check=True, capture_output=True, text=True, timeout=self.TIMEOUT_S).stdout.strip()
        # --system-site-packages exposes the base interpreter's site-packages, but when the tests run in a
        # venv themselves (CI does) the packages are in *that* venv, which a new venv does not inherit; a
        # .pth file adds its site directories (addsitedir, so that their .pth files, such as blt-decode's
        # editable install, are processed too)
        if sys.prefix != sys.base_prefix:
            dirs = [d for d in site.getsitepackages() if os.path.isdir(d)]
            with open(os.path.join(purelib, "_test_environment.pth"), "w") as pth:
                pth.write("import site; " + "; ".join(f"site.addsitedir({d!r})" for d in dirs) + "\n")
        # blt-decode's console script as pip would write it for this venv (the test environment's script
        # runs that environment's python, which does not see the new venv's packages); written from the
        # entry-point metadata instead of reinstalling blt-decode (offline, no build files in the checkout)
        (ep,) = entry_points(group="console_scripts", name="blt-decode")
        script = venv / "bin" / "blt-decode"
        script.write_text(f"#!{self.python}\nimport sys\nfrom {ep.module} import {ep.attr}\n"
                          f"if __name__ == '__main__':\n    sys.exit({ep.attr}())\n")
        script.chmod(0o755)
        self.env = {
            **{k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")},
            "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
            "VIRTUAL_ENV": str(venv),
            # offline and quiet: no index, no pip self-update check
            "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1",
            # one thread, as above: tiny models on a shared machine
            "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
        }

    def run(self, cmd: list[str], cwd: Path) -> str:
        """Run ``cmd`` to completion within TIMEOUT_S and return its standard output; a failure shows the
        command's output. Decoded leniently: a random model's generated bytes need not be UTF-8."""
        import subprocess

        try:
            result = subprocess.run(cmd, cwd=cwd, env=self.env, capture_output=True, timeout=self.TIMEOUT_S)
        except subprocess.TimeoutExpired as exc:
            pytest.fail(f"{cmd} ran past {self.TIMEOUT_S}s:\n{exc.stdout!r}\n{exc.stderr!r}")
        out, err = (result.stdout.decode(errors="replace"), result.stderr.decode(errors="replace"))
        assert result.returncode == 0, f"{cmd} exited {result.returncode}:\n{out[-3000:]}\n{err[-3000:]}"
        return out

    def install(self, package: Path) -> None:
        """``pip install -e PACKAGE``, offline (what the package's test extra brings is already here)."""
        self.run([str(self.python), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "-e",
                  str(package)], package.parent)


@pytest.fixture
def user_venv(tmp_path) -> UserVenv:
    """A :class:`UserVenv` in ``tmp_path/venv``, for installing and testing a plugin package as a user would."""
    return UserVenv(tmp_path / "venv")
