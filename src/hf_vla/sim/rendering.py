"""Picks MuJoCo's offscreen OpenGL backend before MuJoCo is imported.

MuJoCo reads `MUJOCO_GL` once, at import. On a machine without a display we want EGL (Mesa's llvmpipe on a CPU,
the NVIDIA driver on a GPU) and fall back to OSMesa; when neither library is installed the error names the Debian
packages that provide them rather than failing deep inside MuJoCo.

    python -m hf_vla.sim.rendering      # prints the backend this machine would use
"""

from __future__ import annotations

import ctypes.util
import os

# backend → (shared library to look for, Debian packages that provide it)
BACKENDS = {
    "egl": ("EGL", "libegl1 libegl-mesa0 libgl1-mesa-dri"),
    "osmesa": ("OSMesa", "libosmesa6"),
}


class RenderingUnavailable(RuntimeError):
    pass


def available_backends() -> list[str]:
    return [name for name, (library, _) in BACKENDS.items() if ctypes.util.find_library(library)]


def select_gl_backend() -> str:
    """Sets `MUJOCO_GL` (unless the user already did) and returns the backend in use."""
    chosen = os.environ.get("MUJOCO_GL")
    if chosen:
        return chosen
    found = available_backends()
    if not found:
        packages = " ".join(packages for _, packages in BACKENDS.values())
        raise RenderingUnavailable(
            "offscreen rendering needs EGL or OSMesa, and neither libEGL nor libOSMesa was found; "
            f"install them with `apt-get install {packages}` (or set MUJOCO_GL to a backend you have)"
        )
    os.environ["MUJOCO_GL"] = found[0]
    if found[0] == "osmesa":
        os.environ.setdefault("PYOPENGL_PLATFORM", "osmesa")
    return found[0]


if __name__ == "__main__":
    print(f"MUJOCO_GL={select_gl_backend()} (libraries found for: {available_backends() or 'none'})")
