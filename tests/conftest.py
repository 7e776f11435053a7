import os

# Triton kernels run in the interpreter on CPU-only machines; must be set before triton is imported.
if not os.environ.get("CUDA_VISIBLE_DEVICES_FORCE_GPU"):
    try:
        import torch

        _has_cuda = torch.cuda.is_available()
    except Exception:  # pragma: no cover
        _has_cuda = False
    if not _has_cuda:
        os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch


def _faster_triton_interpreter() -> None:
    """Two test-time speed-ups of the Triton interpreter, which runs the kernels' same code either way:
    no re-patching of ``triton.language`` at every ``@triton.jit`` helper call inside a kernel, and a
    memoised numpy dtype of each Triton dtype (together 1.5x to 2.7x faster interpreted kernel tests).

    The interpreter patches the language modules a kernel sees when the launch starts and restores them
    when it ends; a helper called inside the kernel patches them again (``InterpretedFunction.__call__``),
    which changes nothing while the launch's patches are in place (a helper's patches are never undone
    before the launch ends), but lists every module member each time: about a quarter of an interpreted
    paged-model test. Here a helper skips that when every language module it sees was patched in the
    running launch, by the launch or by an earlier helper call (``tl.sum``, ``tl.max``, ``tl.zeros`` see
    ``triton.language.core``). Applied only where the interpreter's code has the shape this relies on;
    otherwise nothing changes."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    try:
        import inspect

        from triton.runtime import interpreter as interp
    except Exception:  # pragma: no cover (no triton)
        return
    grid_executor, function = getattr(interp, "GridExecutor", None), getattr(interp, "InterpretedFunction", None)
    if grid_executor is None or function is None or not all(
            hasattr(interp, n) for n in ("_patch_lang", "InterpreterError", "tl")):
        return
    try:
        source = inspect.getsource(function.__call__)
    except (OSError, TypeError):  # pragma: no cover
        return
    if "_patch_lang(self.fn)" not in source or "self.rewrite()" not in source:
        return  # another interpreter: leave it alone
    tl = interp.tl
    langs_of: dict = {}
    active: list = []  # per launch in progress (innermost last), the language modules patched in it so far

    def langs(fn):
        key = id(fn.__globals__)
        if key not in langs_of:
            langs_of[key] = frozenset(id(v) for v in fn.__globals__.values() if inspect.ismodule(v)
                                      and v in (tl, tl.core))
        return langs_of[key]

    launch = grid_executor.__call__

    def patched_launch(self, *args, **kwargs):
        active.append(set(langs(self.fn)))
        try:
            return launch(self, *args, **kwargs)
        finally:
            active.pop()

    helper_call = function.__call__

    def patched_helper_call(self, *args, **kwargs):
        if not active:
            return helper_call(self, *args, **kwargs)
        if not langs(self.fn) <= active[-1]:
            active[-1].update(langs(self.fn))  # patched by this call, and left so until the launch ends
            return helper_call(self, *args, **kwargs)
        fn = self.rewrite()  # as InterpretedFunction.__call__, without the redundant _patch_lang
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            raise interp.InterpreterError(repr(e)) from e

    grid_executor.__call__, function.__call__ = patched_launch, patched_helper_call

    # The numpy dtype of a Triton dtype: a pure function of the element type that rebuilds a table of twenty
    # dtypes at every interpreted operation (a third of an interpreted sampler test); memoised per element
    # type (a block's is its element's; a pointer's, or a pointer block's, is uint64, looked up as before).
    np_dtype = getattr(interp, "_get_np_dtype", None)
    if np_dtype is not None and hasattr(tl, "block_type") and hasattr(tl, "pointer_type"):
        table: dict = {}

        def cached_np_dtype(tt_dtype):
            element = tt_dtype.element_ty if isinstance(tt_dtype, tl.block_type) else tt_dtype
            if isinstance(element, tl.pointer_type):
                return np_dtype(tt_dtype)
            try:
                return table[element]
            except KeyError:
                out = table[element] = np_dtype(element)
                return out
            except TypeError:  # unhashable: as before
                return np_dtype(tt_dtype)

        interp._get_np_dtype = cached_np_dtype


_faster_triton_interpreter()


def _share_the_cores_among_workers() -> None:
    """Under pytest-xdist, give each worker its share of the cores for torch's intra-op threads (and the
    subprocesses a test starts), unless ``OMP_NUM_THREADS`` is set. Torch's default is a thread per core
    in every worker: with ``-n 2`` on two cores that is four busy threads, and an OpenMP thread waiting
    for a preempted sibling spins. ``tests/test_demo.py`` with ``tests/test_paged_models.py`` under ``-n 2``
    took 387 and 401 s that way, 219 and 198 s with a thread per worker (2 cores, the two taking turns)."""
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if not workers or os.environ.get("OMP_NUM_THREADS"):
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = max(1, cores // max(1, int(workers)))
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)


_share_the_cores_among_workers()


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture
def device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def one_thread():
    """torch's CPU ops on one intra-op thread for the test (restored after). With several, torch's CPU attention and
    reductions may split one row's work between threads depending on how many rows a call holds, so a row's floats
    can differ in the last place between calls of different sizes; the row-slicing tests compare bits."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
