"""Build one kernel ahead of time (see ``_aot``): numba compiles it serially inside a
C-callable wrapper, the wrapper's LLVM module is emitted as position-independent object
code for the CPU numba compiles for, and the C compiler links it with one C file into a
shared library: the library's interface to Python (``embpress_call``, the kernel on one
packed argument block; ``embpress_split``, the kernel over chunks of a range on a pool of
threads; both described at ``_POOL``) and a few stand-ins for numba's helper symbols.

The stand-ins: a compiled wrapper names numba's error helpers (taking the GIL, raising)
and its reference-count release, on paths that kernels made for this do not take with
valid arguments (they neither allocate nor raise). The stand-ins let the loader bind
those names; a raise sets a per-thread flag, which ``embpress_call`` reports in its
``raised`` slot, and the caller reruns the kernel under numba, which raises its own
exception (the C wrapper can only print one). A kernel that allocates names numba's allocator too,
which has no stand-in: the library then fails to load here, before it is put in the
cache, and numba keeps running that kernel.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ._aot import _open, seal, slot_count
from ._kernel_cache import locked

__all__ = ["CC_ENV", "build", "compiler"]

CC_ENV = "CC"
ENTRY = "embpress_kernel"  # the exported name of the wrapper in every library

_STANDINS = r"""
#include <stdlib.h>
typedef struct _object PyObject;
extern PyObject *PyExc_RuntimeError;
extern int PyGILState_Ensure(void);
extern void PyGILState_Release(int);
extern void PyErr_SetString(PyObject *, const char *);
static const char MESSAGE[] = "embpress: a kernel compiled ahead of time raised (rerun under numba)";
static __thread int raised;
void numba_gil_ensure(int *state) { *state = PyGILState_Ensure(); }
void numba_gil_release(int *state) { PyGILState_Release(*state); }
void numba_do_raise(void *excinfo) {
    (void)excinfo;
    raised = 1;
    PyErr_SetString(PyExc_RuntimeError, MESSAGE);
}
void *numba_unpickle(const char *data, int size, const char *hashed) {
    (void)data; (void)size; (void)hashed;
    raised = 1;
    PyErr_SetString(PyExc_RuntimeError, MESSAGE);
    return NULL;
}
void *numba_runtime_build_excinfo_struct(void *a, void *b) { (void)a; (void)b; return NULL; }
void NRT_Free(void *p) { free(p); }
void NRT_MemInfo_call_dtor(void *meminfo) { (void)meminfo; }
"""

# The library's interface to Python (one C file with the stand-ins and the packed call):
#
#   int64_t embpress_call(const int64_t *argv, int64_t *raised)
#       the kernel on one argument block (``_aot.pack``: an array is its address and then
#       its shape, an int or bool one slot, a float its IEEE bits); sets *raised to 1 if
#       the kernel raised, and returns its result (0 for a kernel returning nothing).
#   int64_t embpress_split(int64_t *argvs, int64_t nargs, int64_t threads,
#                          int64_t lo_slot, int64_t hi_slot, int64_t count, int64_t chunk,
#                          int64_t *raised)
#       the kernel over items [0, count) in chunks of ``chunk`` on ``threads`` threads:
#       thread t takes the block ``argvs + t * nargs`` (its own scratch) and writes each
#       chunk's bounds into its slots ``lo_slot`` and ``hi_slot``; chunks are handed out
#       as threads ask for them. Returns the sum of the calls' results. The calling thread
#       takes part; the others are torch's OpenMP team where ``embpress_use_team`` gave
#       it (thread block t for the team's thread t; the call returns after the team's
#       barrier), else the library's own pool, started on first use, whose threads join
#       the job as they come (thread blocks 1, 2, ... in the order they join); the call
#       then returns once its own share is done and the helpers that joined have
#       finished. A call made while another thread's is running runs serially on the
#       calling thread.
#   void embpress_use_team(void *gomp_parallel, void *omp_get_thread_num)
#       split on the OpenMP team of these two functions (libgomp's ABI) from now on; a
#       forked child goes back to the pool.
_POOL = r"""
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

typedef struct {
    int64_t *argvs;
    int64_t nargs, threads, lo_slot, hi_slot, count, chunk;
    int64_t next, total, raised, joined, active; /* updated with __atomic builtins */
} job_t;

/* How long an idle thread (a worker between jobs, the caller waiting for its helpers)
   polls before it sleeps. Waking a sleeping thread costs tens of microseconds, far more
   on a virtual machine, where the wake-up goes through the hypervisor; lookups of a
   millisecond then scale poorly. The poll does not yield the core: where another
   runtime's threads poll too (OpenMP's, after torch's ops), a yielding thread left them
   the core and lost more than it saved (measured: bench/meaning.md). OpenMP's threads
   poll likewise, longer. */
#define SPIN_NS 200000
#define MAX_WORKERS 255
static pthread_mutex_t job_lock = PTHREAD_MUTEX_INITIALIZER; /* one parallel job at a time */
static pthread_mutex_t pool_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t pool_cv = PTHREAD_COND_INITIALIZER;
static pthread_cond_t done_cv = PTHREAD_COND_INITIALIZER;
static job_t *current; /* the job helpers may join; NULL once its caller has closed it */
static int64_t generation; /* raised (under pool_mu) for each job */
static int workers;
static int fork_handler;

static int64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

static inline void relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

/* Poll until (*word == value) == equal, for at most SPIN_NS; returns whether it came
   about (the clock read every 64 polls). */
static int spin_until(const int64_t *word, int64_t value, int equal) {
    int64_t deadline = now_ns() + SPIN_NS;
    for (int64_t polls = 1;; polls++) {
        if ((__atomic_load_n(word, __ATOMIC_ACQUIRE) == value) == equal) return 1;
        relax();
        if (polls % 64 == 0 && now_ns() > deadline) return 0;
    }
}

static void work(job_t *job, int64_t *argv) {
    for (;;) {
        int64_t lo = __atomic_fetch_add(&job->next, job->chunk, __ATOMIC_RELAXED);
        if (lo >= job->count) break;
        int64_t hi = job->count - lo > job->chunk ? lo + job->chunk : job->count;
        argv[job->lo_slot] = lo;
        argv[job->hi_slot] = hi;
        int64_t was = 0;
        int64_t result = embpress_call(argv, &was);
        if (was) __atomic_store_n(&job->raised, 1, __ATOMIC_RELAXED);
        __atomic_fetch_add(&job->total, result, __ATOMIC_RELAXED);
    }
}

/* A helper joins the current job under pool_mu, taking the next thread block; the
   caller closes the job (current = NULL, also under pool_mu) when its own share is done,
   so it waits only for helpers that joined, never for one still waking up. */
static void *worker(void *arg) {
    (void)arg;
    int64_t seen = 0;
    for (;;) {
        spin_until(&generation, seen, 0);
        pthread_mutex_lock(&pool_mu);
        while (__atomic_load_n(&generation, __ATOMIC_RELAXED) == seen) pthread_cond_wait(&pool_cv, &pool_mu);
        seen = __atomic_load_n(&generation, __ATOMIC_RELAXED);
        job_t *job = current;
        int64_t index = 0;
        if (job != NULL && job->joined + 1 < job->threads) {
            index = ++job->joined;
            __atomic_add_fetch(&job->active, 1, __ATOMIC_RELAXED);
        }
        pthread_mutex_unlock(&pool_mu);
        if (index == 0) continue;
        work(job, job->argvs + index * job->nargs);
        if (__atomic_sub_fetch(&job->active, 1, __ATOMIC_ACQ_REL) == 0) {
            /* the caller may be asleep on done_cv: under pool_mu, no wake-up is lost */
            pthread_mutex_lock(&pool_mu);
            pthread_cond_signal(&done_cv);
            pthread_mutex_unlock(&pool_mu);
        }
    }
    return NULL;
}

static void after_fork_in_child(void) {
    /* the child has none of the parent's threads: start afresh */
    pthread_mutex_init(&job_lock, NULL);
    pthread_mutex_init(&pool_mu, NULL);
    pthread_cond_init(&pool_cv, NULL);
    pthread_cond_init(&done_cv, NULL);
    current = NULL;
    generation = 0;
    workers = 0;
}

/* the pool's size raised to ``wanted`` workers where it can be (under pool_mu); returns
   how many of them a job may use: ``wanted``, or fewer where threads could not start */
static int grow(int wanted) {
    if (!fork_handler) {
        pthread_atfork(NULL, NULL, after_fork_in_child);
        fork_handler = 1;
    }
    while (workers < wanted) {
        pthread_t thread;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        int failed = pthread_create(&thread, &attr, worker, NULL);
        pthread_attr_destroy(&attr);
        if (failed) break;
        workers++;
    }
    return workers < wanted ? workers : wanted;
}

/* torch's OpenMP team (libgomp's GOMP_parallel and omp_get_thread_num, as torch's
   process loaded them), where ``embpress_use_team`` was given them: a job then runs on
   the threads that run torch's own parallel ops, which poll for a while after each of
   them, instead of on this pool's threads, which would compete with them for the cores. */
typedef void (*team_parallel_t)(void (*)(void *), void *, unsigned, unsigned);
typedef int (*team_thread_t)(void);
static team_parallel_t team_parallel;
static team_thread_t team_thread;

static void forget_team_in_child(void) {
    /* libgomp's team does not survive a fork: the child uses the pool */
    team_parallel = NULL;
    team_thread = NULL;
}

void embpress_use_team(void *parallel, void *thread_num) {
    static int registered;
    if (!registered) {
        pthread_atfork(NULL, NULL, forget_team_in_child);
        registered = 1;
    }
    team_thread = (team_thread_t)thread_num;
    team_parallel = (team_parallel_t)parallel;
}

static void team_body(void *data) {
    job_t *job = (job_t *)data;
    int64_t t = team_thread();
    if (t < job->threads) work(job, job->argvs + t * job->nargs);
}

int64_t embpress_split(int64_t *argvs, int64_t nargs, int64_t threads, int64_t lo_slot,
                       int64_t hi_slot, int64_t count, int64_t chunk, int64_t *raised_out) {
    job_t job;
    memset(&job, 0, sizeof job);
    job.argvs = argvs;
    job.nargs = nargs;
    job.lo_slot = lo_slot;
    job.hi_slot = hi_slot;
    job.count = count;
    job.chunk = chunk > 0 ? chunk : 1;
    if (threads > MAX_WORKERS + 1) threads = MAX_WORKERS + 1;
    if (threads > 1 && team_parallel != NULL && pthread_mutex_trylock(&job_lock) == 0) {
        job.threads = threads;
        team_parallel(team_body, &job, (unsigned)threads, 0);
        pthread_mutex_unlock(&job_lock);
    } else if (threads > 1 && pthread_mutex_trylock(&job_lock) == 0) {
        pthread_mutex_lock(&pool_mu);
        job.threads = grow((int)threads - 1) + 1;
        current = &job;
        __atomic_store_n(&generation, generation + 1, __ATOMIC_RELEASE);
        pthread_cond_broadcast(&pool_cv);
        pthread_mutex_unlock(&pool_mu);
        work(&job, argvs);
        pthread_mutex_lock(&pool_mu);
        current = NULL; /* closed: no helper joins from here on */
        pthread_mutex_unlock(&pool_mu);
        if (!spin_until(&job.active, 0, 1)) {
            pthread_mutex_lock(&pool_mu);
            while (__atomic_load_n(&job.active, __ATOMIC_ACQUIRE) > 0) pthread_cond_wait(&done_cv, &pool_mu);
            pthread_mutex_unlock(&pool_mu);
        }
        pthread_mutex_unlock(&job_lock);
    } else {
        job.threads = 1;
        work(&job, argvs);
    }
    *raised_out = job.raised;
    return job.total;
}
"""


def _packed_source(specs: Sequence[str], returns: str) -> str:
    """C source of ``embpress_call``: the kernel's C arguments read from one block."""
    params: list[str] = []
    values: list[str] = []
    floats: list[str] = []
    slot = 0
    for spec in specs:
        kind = spec[0]
        for k in range(slot_count(spec)):
            if kind == "a" and k == 0:
                params.append("void *")
                values.append(f"(void *)a[{slot}]")
            elif kind == "f":
                params.append("double")
                floats.append(f"    double f{slot};\n    memcpy(&f{slot}, a + {slot}, sizeof f{slot});\n")
                values.append(f"f{slot}")
            else:
                params.append("int64_t")
                values.append(f"a[{slot}]")
            slot += 1
    result = "int64_t" if returns == "int64" else "void"
    call = f"{ENTRY}({', '.join(values)})"
    body = f"    int64_t r = {call};\n" if returns == "int64" else f"    {call};\n    int64_t r = 0;\n"
    return (
        "#include <stdint.h>\n#include <string.h>\n"
        f"extern {result} {ENTRY}({', '.join(params) or 'void'});\n"
        "int64_t embpress_call(const int64_t *a, int64_t *raised_out) {\n"
        + "".join(floats)
        + body
        + "    if (raised) { raised = 0; *raised_out = 1; }\n    return r;\n}\n"
    )


def compiler() -> list[str] | None:
    """The command of the C compiler that links the libraries: ``$CC`` (with its own
    arguments, e.g. ``ccache gcc``), else cc, gcc or clang on PATH; None if none is found."""
    given = shlex.split(os.environ.get(CC_ENV, ""))
    if given:
        found = shutil.which(given[0])
        return [found, *given[1:]] if found else None
    for name in ("cc", "gcc", "clang"):
        found = shutil.which(name)
        if found:
            return [found]
    return None


def _wrapper_source(specs: Sequence[str], returns: str) -> tuple[str, list[str]]:
    """Python source of a wrapper taking C arguments (an array as a pointer and its
    shape) and calling ``kernel``; and the names of its parameters in order."""
    params: list[str] = []
    call: list[str] = []
    for i, spec in enumerate(specs):
        kind = spec[0]
        if kind == "a":
            ndim = int(spec[1])
            dims = [f"a{i}_{d}" for d in range(ndim)]
            params += [f"a{i}", *dims]
            call.append(f"carray(a{i}, ({', '.join(dims)}{',' if ndim == 1 else ''}))")
        elif kind == "t":
            items = [f"t{i}_{d}" for d in range(int(spec[1:]))]
            params += items
            call.append(f"({', '.join(items)}{',' if len(items) == 1 else ''})")
        elif kind == "b":
            params.append(f"b{i}")
            call.append(f"b{i} != 0")
        else:
            params.append(f"x{i}")
            call.append(f"x{i}")
    body = f"kernel({', '.join(call)})"
    source = f"def wrapper({', '.join(params)}):\n    {'return ' if returns != 'none' else ''}{body}\n"
    return source, params


def _loads(path: Path) -> bool:
    """Whether the library at ``path`` loads as ``_aot`` opens it (both entry points)."""
    try:
        _open(path)
    except (OSError, AttributeError):
        return False
    return True


def build(
    module: str, name: str, specs: Sequence[str], returns: str, target: Path, replace: bool = False
) -> None:
    """Compile ``module.name`` for arguments of kinds ``specs`` (``_aot.arg_spec``) into
    the shared library ``target`` (``replace``: over a file there that does not load).
    Raises on any failure, leaving ``target`` as it was."""
    import numba
    from llvmlite import binding as llvm
    from numba import types

    cc = compiler()
    if cc is None:
        raise RuntimeError("no C compiler ($CC, cc, gcc or clang) on PATH to link compiled kernels")
    target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    if not os.access(target.parent, os.W_OK):
        raise PermissionError(f"cannot write compiled kernels into {target.parent}")
    with locked(str(target)):
        if target.exists() and (not replace or _loads(target)):
            return  # built (or mended) by another process while this one waited
        kernel = getattr(importlib.import_module(module), name)
        dropped = ("parallel", "cache", "nopython")
        options = {k: v for k, v in kernel.targetoptions.items() if k not in dropped}
        serial = numba.njit(**options)(kernel.py_func)
        source, params = _wrapper_source(specs, returns)
        namespace: dict[str, Any] = {"kernel": serial, "carray": numba.carray}
        exec(compile(source, f"<embpress wrapper of {name}>", "exec"), namespace)
        arg_types: list[Any] = []
        for spec in specs:
            if spec[0] == "a":
                dtype = numba.from_dtype(np.dtype(spec[2:]))
                arg_types += [types.CPointer(dtype)] + [types.int64] * int(spec[1])
            elif spec[0] == "t":
                arg_types += [types.int64] * int(spec[1:])
            else:
                arg_types.append(types.float64 if spec == "f" else types.int64)
        result = types.int64 if returns == "int64" else types.void
        if len(arg_types) != len(params):  # pragma: no cover - the two loops above agree
            raise RuntimeError("wrapper parameters and C types disagree")
        wrapped: Any = numba.cfunc(result(*arg_types))(namespace["wrapper"])
        library = wrapped._library
        llvm_module = llvm.parse_assembly(str(library._final_module))
        llvm_module.get_function(wrapped.native_name).name = ENTRY
        codegen = library.codegen
        machine = llvm.Target.from_triple(llvm_module.triple).create_target_machine(
            cpu=codegen._get_host_cpu_name(),
            features=codegen._tm_features,
            opt=3,
            reloc="pic",
            codemodel="default",
        )
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=".build-") as work:
            obj = Path(work) / "kernel.o"
            obj.write_bytes(machine.emit_object(llvm_module))
            standins = Path(work) / "call.c"
            standins.write_text(_STANDINS + _packed_source(specs, returns) + _POOL)
            linked = Path(work) / "kernel.so"
            done = subprocess.run(
                [*cc, "-shared", "-fPIC", "-O2", "-pthread", "-o", str(linked), str(obj), str(standins)],
                capture_output=True,
                text=True,
                check=False,
            )
            if done.returncode != 0:
                raise RuntimeError(f"{cc[0]} could not link a compiled kernel: {done.stderr.strip()[:500]}")
            import ctypes

            seal(linked, target.name)
            ctypes.CDLL(str(linked))  # every symbol binds (RTLD_NOW), or this raises OSError
            with contextlib.suppress(FileNotFoundError):
                os.chmod(linked, 0o755)
            os.replace(linked, target)
