"""Builds the C extensions (daxfs._fusehook, _pmemflush, _fastmaps); everything else is in pyproject.toml.

The extension interposes libfuse's fuse_session_new (see daxfs/_fusehook.c), so
it is linked against libfuse3 (flags from pkg-config) with a linker version
script that gives the interposer libfuse's symbol versions.
"""
import os
import shlex
import subprocess

from setuptools import Extension, setup

HERE = os.path.dirname(os.path.abspath(__file__))
MAP = os.path.join(HERE, "daxfs", "_fusehook.map")


def pkg_config(*args):
    try:
        out = subprocess.run(["pkg-config", *args, "fuse3"], check=True,
                             capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        raise SystemExit(f"pkg-config {' '.join(args)} fuse3 failed ({e}); "
                         "install pkg-config and the libfuse3 development package") from e
    return shlex.split(out)


fusehook = Extension(
    "daxfs._fusehook",
    # the interposer and the operations it answers; the data plane's threads, maps, io_uring
    # transport and COW breaks
    sources=["daxfs/_fusehook.c", "daxfs/_fuseops.c",
             "daxfs/_dataplane.c", "daxfs/_dpmaps.c", "daxfs/_uring.c", "daxfs/_uringio.c",
             "daxfs/_cowplane.c", "daxfs/_cowoverlay.c"],
    depends=["daxfs/_fusehook.map", "daxfs/_dataplane.h", "daxfs/_fusehook.h", "daxfs/_uring.h"],
    extra_compile_args=pkg_config("--cflags") + ["-std=gnu11", "-Wall", "-Wextra",
                                                 "-Wno-unused-parameter"],
    extra_link_args=pkg_config("--libs") + ["-ldl", "-lpthread", f"-Wl,--version-script={MAP}"],
)

# cache-line flushes for DAX mappings (pmem.py), where libpmem is not installed
pmemflush = Extension("daxfs._pmemflush", sources=["daxfs/_pmemflush.c"],
                      extra_compile_args=["-std=gnu11", "-Wall", "-Wextra",
                                          "-Wno-unused-parameter"])

# a COW break's leaf splices and journal encoding (extents.py, frames.py, journal.py keep
# Python fallbacks)
fastmaps = Extension("daxfs._fastmaps", sources=["daxfs/_fastmaps.c", "daxfs/_cowadopt.c"],
                     depends=["daxfs/_fastmaps.h"],
                     extra_compile_args=["-std=gnu11", "-O2", "-Wall", "-Wextra",
                                         "-Wno-unused-parameter"])

setup(ext_modules=[fusehook, pmemflush, fastmaps])
