"""Test helper: the Triton launches a piece of code makes, intercepted at the autotuner (nothing runs)."""


def triton_launches(run_launchers):
    """[(kernel name, grid)] of the Triton launches ``run_launchers()`` makes, intercepted (nothing runs); the grid
    evaluated with the config the autotuner would run first."""
    from triton.runtime.autotuner import Autotuner

    from crate_kernels.ops import aot

    names, launches = {key: name for key, (_, name) in aot.registry().items()}, []

    def run(self, *args, grid, **kwargs):
        self.nargs = dict(zip(self.arg_names, args))
        config = self.prune_configs(kwargs)[0] if len(self.configs) > 1 else self.configs[0]
        self.nargs = None
        launches.append((names[id(self)], grid({**kwargs, **config.all_kwargs()}) if callable(grid) else grid))

    original, Autotuner.run = Autotuner.run, run
    try:
        run_launchers()
    finally:
        Autotuner.run = original
    return launches
