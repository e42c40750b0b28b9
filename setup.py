"""Build sessmob: the Python package plus its cffi-compiled native helpers."""

from setuptools import find_packages, setup

setup(
    name="sessmob",
    version="0.1.0",
    description="Complete session mobility: move live TCP sessions between Linux devices",
    python_requires=">=3.11",
    packages=find_packages(include=["sessmob", "sessmob.*", "netns_testbed", "netns_testbed.*"]),
    setup_requires=["cffi>=1.15"],
    install_requires=["cffi>=1.15", "pyroute2>=0.7", "scapy>=2.5", "PyNaCl>=1.5", "msgpack>=1.0"],
    extras_require={"dev": ["pytest>=7", "ruff", "mypy"]},
    cffi_modules=["sessmob/_native/tcp_repair_build.py:ffi"],
    entry_points={"console_scripts": ["sessmob=sessmob.cli:main"]},
    zip_safe=False,
)
