"""Strict test settings: two CPU devices, rank promotion raises, warnings are errors (pyproject)."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture(scope="module", autouse=True)
def _free_compiled_executables(request):
    """Drop every jit cache after each test module.

    Each XLA:CPU executable holds ~13-17 memory mappings (its LLVM-JIT code and data sections)
    for as long as a jit cache keeps it, and module-level jitted functions keep one per shape
    for the life of the process. The slow set compiles a few thousand, and at the kernel's
    vm.max_map_count (65530) the next mapping fails and LLVM aborts the process: the slow
    set's "Fatal Python error: Aborted" inside a training step, after a dozen earlier tests,
    which no test alone reproduces. (Reproduced directly by compiling one jitted function for
    ~4000 shapes in one process.)
    """
    yield
    used = memory_mappings()
    jax.clear_caches()
    _MAPPINGS.append((used, request.module.__name__))
    limit = max_memory_mappings()
    if used is not None and limit is not None and used > 0.9 * limit:
        raise RuntimeError(
            f"{request.module.__name__} left {used} of the process's {limit} memory mappings "
            "(vm.max_map_count) in use before its jit caches were cleared; one module this "
            "large will abort the process. Split the module or call jax.clear_caches() inside it."
        )


_MAPPINGS: list[tuple[int | None, str]] = []


def memory_mappings() -> int | None:
    """The number of memory mappings of this process (Linux's /proc/self/maps), else None."""
    try:
        with open("/proc/self/maps") as f:
            return sum(1 for _ in f)
    except OSError:
        return None


def max_memory_mappings() -> int | None:
    """The kernel's per-process limit, vm.max_map_count (Linux), else None."""
    try:
        with open("/proc/sys/vm/max_map_count") as f:
            return int(f.read())
    except (OSError, ValueError):
        return None


def pytest_terminal_summary(terminalreporter):
    """Report the largest number of memory mappings any module left before its caches cleared."""
    seen = [(n, m) for n, m in _MAPPINGS if n is not None]
    if seen:
        n, module = max(seen)
        terminalreporter.write_line(
            f"memory mappings: at most {n} at the end of a module ({module}); "
            f"limit vm.max_map_count = {max_memory_mappings()}"
        )


@pytest.fixture
def key():
    return jax.random.key(0)


@pytest.fixture(scope="session", autouse=True)
def _session_model_cache(tmp_path_factory):
    """Models trained by smoke runs go to one cache for the whole session (not ~/.cache), so the
    replications' smoke tests train each small model once and never touch the user's cache."""
    from feynkit.experiments.train import CACHE_ENV

    old = os.environ.get(CACHE_ENV)
    os.environ[CACHE_ENV] = str(tmp_path_factory.mktemp("feynkit_model_cache"))
    yield
    if old is None:
        os.environ.pop(CACHE_ENV, None)
    else:
        os.environ[CACHE_ENV] = old
