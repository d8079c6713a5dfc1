"""User plug-in examples for curvbench (not part of the distribution).

Run them from the repository root: curvbench resolves import paths such as
``examples.newton_step:newton_step`` from the working directory too (see
``examples/README.md``).
"""
