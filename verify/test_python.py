"""Checks for the python layer: the pinned Python, in a virtual environment first on PATH."""


def test_python_version(host, pins):
    out = host.check_output("python --version")
    assert out.startswith(f"Python {pins['python_version']}."), out


def test_python_is_the_venv(host, image_env):
    assert image_env.get("VIRTUAL_ENV") == "/opt/venv"
    assert host.check_output("command -v python") == "/opt/venv/bin/python"
    assert host.check_output("command -v pip") == "/opt/venv/bin/pip"
    assert host.check_output("python -c 'import sys; print(sys.prefix)'") == "/opt/venv"


def test_pip_installs_into_the_venv(host):
    assert "/opt/venv/" in host.check_output("pip --version")


def test_venv_owned_by_root_and_not_world_writable(host):
    venv = host.file("/opt/venv")
    assert venv.user == "root"
    assert not venv.mode & 0o002
