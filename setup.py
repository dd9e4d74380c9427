# zviz's compiled parts (see zviz/_stage.c and zviz/_init.c for why each is C):
# - zviz._stage, a CPython extension: the spawn path (_stage.c) and its binding (_stage_py.c);
# - zviz/_zviz_init, a static, libc-free executable: pid 1 of each sandbox.
import os
import subprocess

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

INIT_SRC = os.path.join("zviz", "_init.c")
INIT_NAME = "_zviz_init"


class BuildWithInit(build_ext):
    def run(self):
        super().run()
        out_dir = os.path.join("zviz") if self.inplace else os.path.join(self.build_lib, "zviz")
        os.makedirs(out_dir, exist_ok=True)
        target = os.path.join(out_dir, INIT_NAME)
        cc = os.environ.get("CC", "cc")
        cmd = [cc, "-Os", "-static", "-nostdlib", "-Izviz", "-fno-stack-protector", "-fno-builtin",
               "-fno-asynchronous-unwind-tables", "-Wall", "-Wextra", "-o", target, INIT_SRC]
        self.announce(" ".join(cmd), level=2)
        subprocess.check_call(cmd)
        os.chmod(target, 0o755)

    def get_outputs(self):
        return super().get_outputs() + [os.path.join(self.build_lib, "zviz", INIT_NAME)]


setup(
    ext_modules=[
        Extension(
            "zviz._stage",
            sources=["zviz/_stage_py.c", "zviz/_stage.c", "zviz/_pump.c", "zviz/_gate.c", "zviz/_flight.c"],
            depends=["zviz/_abi.h", "zviz/_stage.h", "zviz/_rsys.h", "zviz/_pump.h", "zviz/_gate.h", "zviz/_flight.h"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter",
                                "-Wno-missing-field-initializers"],
        )
    ],
    cmdclass={"build_ext": BuildWithInit},
)
