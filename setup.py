# The only compiled part of zviz: the spawn path (see zviz/_stage.c for why it is C).
from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "zviz._stage",
            sources=["zviz/_stage.c"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter",
                                "-Wno-missing-field-initializers"],
        )
    ]
)
