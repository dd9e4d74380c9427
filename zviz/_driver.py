"""zviz code-context driver: runs INSIDE the sandbox, under its python3.

Started as `python3 -c <this file> template|once <preload JSON>` with fd 0 a
unix socket to the host (the control channel). Standard library only; CPython >= 3.9.

Roles:
- template: imports the preload list once, then forks a context per
  "spawn" request (the request carries the new context's control socket by
  SCM_RIGHTS). It reaps its children, and kills each one's process group
  first (a zombie still holds its pid, so the group id cannot be reused).
- context: a long-lived fork. Runs cells ("exec": the code, and fresh
  stdout/stderr pipes for fd 1 and 2 by SCM_RIGHTS), sets and gets JSON
  variables, forks itself ("fork": the twin gets the new socket).
- once (run_python): a context that runs one cell in a fresh directory, then
  exits: forked off the template ("spawn" with "once"), or this interpreter
  itself when started as `once` (a sandbox that runs one snippet: no template
  and no fork; it imports the preload itself). That role pays only for what
  it uses: module imports are deferred (no json, re, ast, socket or
  traceback modules unless a cell needs them: the C parts _json, _ast,
  _socket and _signal do the work), so its start costs a bare `python3 -c`
  plus a few ms.

Frames: `>II` (JSON length, blob length), JSON, blob (see zviz/_contextproto.py).
The host treats everything here as hostile; this file only has to be correct
for honest cells.

Why this module is long: it is one file on purpose. It is sent as the `-c`
source of the sandbox's interpreter, which cannot import zviz (the package
is not inside the sandbox), so the template, the contexts, the frames and
the display code must all be here.
"""

import _ast
import _signal
import _socket
import builtins
import fcntl
import io
import os
import sys

# What the template role uses (imported by template_main, so forks share
# them), and what the once role imports only when a cell needs it.
TEMPLATE_MODULES = ("json", "linecache", "select", "shutil", "tempfile", "traceback")
HEADER_SIZE = 8
CTRL_FD_MIN = 100
VERSION = 1


class _State:
    def __init__(self):
        self.in_cell = False  # SIGINT raises KeyboardInterrupt only in a cell
        self.seq = 0  # the request being served
        self.ctrl = None  # the control socket
        self.twins = []  # forks of this context (reaped here)
        self.devnull = -1
        self.cell_no = 0
        self.rbuf = bytearray()  # bytes of the host's next request
        self.rfds = []  # fds that came with it
        self.workdir = None  # a once role's own directory (removed before its "done")


S = _State()


# ---------------------------------------------------------------- frames


# The host refuses (and breaks the context on) a frame over its caps
# (zviz/_contextproto.py: 4 MiB of JSON, 32 MiB of blob): an honest driver
# shrinks what it sends to fit instead.
MAX_JSON = 4 * 1024**2 - 4096
MAX_BLOB = 32 * 1024**2
MAX_STR = 512 * 1024


def _shrink(v):
    if isinstance(v, str) and len(v) > MAX_STR:
        return v[:MAX_STR] + f"... [{len(v) - MAX_STR} more characters not shown]"
    if isinstance(v, dict):
        return {k: _shrink(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_shrink(x) for x in v]
    return v


class _ScanContext:
    """What _json's scanner reads off a JSONDecoder (json.loads's defaults)."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    parse_constant = float
    memo = None


def _dumps(obj, default):
    """json.dumps(obj, separators=(",", ":"), default=default, allow_nan=False),
    by the same C encoder json.dumps uses, without importing json (and re)."""
    try:
        import _json

        encoder = _json.make_encoder({}, default, _json.encode_basestring_ascii, None, ":", ",", False, False,
                                     False)
    except (ImportError, AttributeError, TypeError):  # an interpreter without the C accelerator
        import json

        return json.dumps(obj, separators=(",", ":"), default=default, allow_nan=False)
    return "".join(encoder(obj, 0))


def _loads(data):
    """json.loads of the host's compact JSON, by json's C scanner."""
    text = data.decode("utf-8")
    try:
        import _json

        obj, end = _json.make_scanner(_ScanContext)(text, 0)
        if end == len(text):
            return obj
    except (ImportError, AttributeError, TypeError, ValueError, StopIteration):
        pass
    import json

    return json.loads(text)


def _strict(obj):
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")


def _encode(obj):
    return _dumps(obj, repr).encode()


def send(obj, blobs=()):
    blobs = [(m, b) for m, b in blobs if len(b) <= MAX_BLOB]
    if blobs:
        obj = dict(obj, blobs=[[m, len(b)] for m, b in blobs])
    try:
        js = _encode(obj)
    except ValueError:  # NaN in a display's JSON: not JSON
        obj = dict(obj, data={"text/plain": "<a display item that is not JSON (NaN or Infinity)>"})
        js = _encode(obj)
    if len(js) > MAX_JSON:
        js = _encode(_shrink(obj))
    if len(js) > MAX_JSON:
        kind = obj.get("t")
        note = f"<too large to send: {len(js)} bytes of JSON>"
        if kind == "display":
            obj, blobs = {"t": "display", "seq": obj["seq"], "data": {"text/plain": note}}, []
        elif kind == "done":
            obj = dict(obj, result={"text/plain": note} if obj.get("result") else None,
                       error=dict(obj["error"], traceback=[note]) if obj.get("error") else None)
        elif kind == "value":
            obj = dict(obj, value=None, error="TooLarge: " + note)
        js = _encode(_shrink(obj))
    blob = b"".join(b for _, b in blobs)
    S.ctrl.sendall(len(js).to_bytes(4, "big") + len(blob).to_bytes(4, "big") + js + blob)


def recv():
    """(frame, fds) from the host; EOFError when it hung up. One recvmsg
    per request in the common case. The kernel ends a read at a message
    that carries fds, so fds always come with the first bytes of their frame."""
    while True:
        if len(S.rbuf) >= HEADER_SIZE:
            jlen = int.from_bytes(S.rbuf[0:4], "big")
            blen = int.from_bytes(S.rbuf[4:8], "big")
            end = HEADER_SIZE + jlen + blen
            if len(S.rbuf) >= end:
                js = bytes(S.rbuf[HEADER_SIZE: HEADER_SIZE + jlen])
                del S.rbuf[:end]
                fds, S.rfds = S.rfds, []
                return _loads(js), fds
        data, anc, _flags, _addr = S.ctrl.recvmsg(262144, _socket.CMSG_SPACE(16 * 4))
        for level, kind, blob in anc:
            if level == _socket.SOL_SOCKET and kind == _socket.SCM_RIGHTS:
                S.rfds.extend(int.from_bytes(blob[i: i + 4], sys.byteorder, signed=True)
                              for i in range(0, len(blob) - len(blob) % 4, 4))
        if not data:
            raise EOFError
        S.rbuf += data


# ---------------------------------------------------------------- display


def _png_of_figure(fig):
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    return buf.getvalue()


_REPRS = (
    ("_repr_html_", "text/html"), ("_repr_markdown_", "text/markdown"), ("_repr_svg_", "image/svg+xml"),
    ("_repr_latex_", "text/latex"), ("_repr_json_", "application/json"), ("_repr_png_", "image/png"),
    ("_repr_jpeg_", "image/jpeg"),
)


def bundle(obj):
    """(data, blobs): a Jupyter MIME bundle for obj."""
    data = {}
    blobs = []
    try:
        data["text/plain"] = repr(obj)
    except Exception as e:  # noqa: BLE001 - a broken __repr__ is the object's problem
        data["text/plain"] = f"<repr failed: {type(e).__name__}: {e}>"
    if isinstance(obj, type):
        return data, blobs
    mod = type(obj).__module__ or ""
    if mod.startswith("matplotlib.figure"):
        try:
            blobs.append(("image/png", _png_of_figure(obj)))
        except Exception:  # noqa: BLE001
            pass
        return data, blobs
    for meth, mime in _REPRS:
        try:
            fn = getattr(obj, meth, None)
            if fn is None or not callable(fn):
                continue
            value = fn()
        except Exception:  # noqa: BLE001 - like IPython: a failing formatter is skipped
            continue
        if isinstance(value, tuple) and len(value) == 2:
            value = value[0]
        if value is None:
            continue
        if mime in ("image/png", "image/jpeg"):
            if isinstance(value, str):
                import base64

                try:
                    value = base64.b64decode(value)
                except ValueError:
                    continue
            if isinstance(value, (bytes, bytearray)):
                blobs.append((mime, bytes(value)))
        elif mime == "application/json":
            try:
                _dumps(value, _strict)
            except (TypeError, ValueError, RecursionError):
                continue
            data[mime] = value
        elif isinstance(value, str):
            data[mime] = value
    return data, blobs


def display(*objs, raw=False):
    """Show objects as rich output of the current cell (like IPython's)."""
    for obj in objs:
        if raw and isinstance(obj, dict):
            data = {k: v for k, v in obj.items() if not isinstance(v, (bytes, bytearray))}
            blobs = [(k, bytes(v)) for k, v in obj.items() if isinstance(v, (bytes, bytearray))]
        else:
            data, blobs = bundle(obj)
        send({"t": "display", "seq": S.seq, "data": data}, blobs)


def _flush_figures():
    plt = sys.modules.get("matplotlib.pyplot")
    if plt is None:
        return
    try:
        nums = plt.get_fignums()
    except Exception:  # noqa: BLE001
        return
    for num in nums:
        try:
            fig = plt.figure(num)
            send({"t": "display", "seq": S.seq, "data": {"text/plain": repr(fig)}},
                 [("image/png", _png_of_figure(fig))])
        except Exception:  # noqa: BLE001
            continue
    try:
        plt.close("all")
    except Exception:  # noqa: BLE001
        pass


# ---------------------------------------------------------------- cells


def _error(etype, value, tb):
    import traceback

    return {"ename": etype.__name__, "evalue": str(value),
            "traceback": traceback.format_exception(etype, value, tb)}


class _CellLines:
    """The cells' sources for linecache (tracebacks, warnings and inspect show
    their lines). When linecache is not imported yet (the once role), this
    import hook adds them when something first imports it."""

    lines = {}  # noqa: RUF012 - the driver imports no typing

    @classmethod
    def add(cls, filename, entry):
        linecache = sys.modules.get("linecache")
        if linecache is not None:
            linecache.cache[filename] = entry
            return
        cls.lines[filename] = entry
        if cls not in sys.meta_path:
            sys.meta_path.insert(0, cls)

    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name != "linecache":
            return None
        sys.meta_path.remove(cls)
        import linecache  # the real import (the import lock is reentrant)

        linecache.cache.update(cls.lines)
        cls.lines = {}
        # The import that called us finds the module loaded and takes its spec:
        # ours, whose loader hands it the module as it is.
        spec = sys.modules["_frozen_importlib"].ModuleSpec("linecache", cls, origin=linecache.__spec__.origin)
        linecache.__spec__ = spec
        return spec

    @staticmethod
    def create_module(spec):
        return sys.modules["linecache"]

    @staticmethod
    def exec_module(module):
        pass


def run_cell(code, ns):
    """(result bundle or None, error or None, interrupted)."""
    S.cell_no += 1
    filename = f"<cell {S.cell_no}>"
    try:
        tree = compile(code, filename, "exec", _ast.PyCF_ONLY_AST)  # ast.parse
    except (SyntaxError, ValueError, OverflowError, MemoryError) as e:
        return None, _error(type(e), e, None), False
    _CellLines.add(filename, (len(code), None, code.splitlines(True), filename))
    last = None
    if tree.body and isinstance(tree.body[-1], _ast.Expr):
        last = _ast.Expression(tree.body.pop().value)
    result = None
    try:
        try:
            exec(compile(tree, filename, "exec"), ns)
            if last is not None:
                value = eval(compile(last, filename, "eval"), ns)
                if value is not None:
                    ns["_"] = value
                    data, blobs = bundle(value)
                    for mime, _blob in blobs:  # images of a result are shown as display items
                        display({mime: _blob, "text/plain": data["text/plain"]}, raw=True)
                    result = data
        finally:
            _flush_figures()
    except KeyboardInterrupt as e:
        return result, _error(type(e), e, e.__traceback__.tb_next if e.__traceback__ else None), True
    except BaseException as e:  # noqa: BLE001 - SystemExit too: a cell does not end the context
        return result, _error(type(e), e, e.__traceback__.tb_next if e.__traceback__ else None), False
    return result, None, False


def _on_sigint(signum, frame):
    if S.in_cell:
        raise KeyboardInterrupt


def _set_stdio(out_fd, err_fd):
    for f in (sys.stdout, sys.stderr):
        try:
            f.flush()
        except Exception:  # noqa: BLE001 - a cell may have replaced or closed them
            pass
    os.dup2(out_fd, 1)
    os.dup2(err_fd, 2)


def _finalize(ns):
    """What interpreter shutdown would do before a one-shot run's exit (it
    ends with os._exit): drop its variables (files it left open are flushed
    and closed), run atexit handlers, flush stdout and stderr."""
    try:
        S.in_cell = True
        try:
            ns.clear()
            import atexit

            atexit._run_exitfuncs()
        finally:
            S.in_cell = False
    except BaseException:  # noqa: BLE001 - its exit is next either way
        pass


def do_exec(req, fds, ns, once=False):
    S.seq = req["seq"]
    if len(fds) != 2:
        for fd in fds:
            os.close(fd)
        send({"t": "done", "seq": S.seq, "result": None, "interrupted": False,
              "error": {"ename": "ProtocolError", "evalue": "exec without its two pipes", "traceback": []}})
        return
    _set_stdio(fds[0], fds[1])
    os.close(fds[0])
    os.close(fds[1])
    result, error, interrupted = None, None, False
    try:
        S.in_cell = True
        try:
            result, error, interrupted = run_cell(req["code"], ns)
        finally:
            S.in_cell = False
    except KeyboardInterrupt as e:  # landed between the cell's end and in_cell = False
        interrupted, error = True, _error(type(e), e, None)
    if once:
        _finalize(ns)
    _set_stdio(S.devnull, S.devnull)
    if S.workdir is not None:
        os.chdir("/")
        _rmtree(S.workdir)
    send({"t": "done", "seq": S.seq, "result": result, "error": error, "interrupted": interrupted})


def _rmtree(top):
    """shutil.rmtree(top, ignore_errors=True) without importing shutil."""
    for root, dirs, files in os.walk(top, topdown=False):
        for name in files + dirs:
            path = os.path.join(root, name)
            try:
                if name in dirs and not os.path.islink(path):
                    os.rmdir(path)
                else:
                    os.unlink(path)
            except OSError:
                pass
    try:
        os.rmdir(top)
    except OSError:
        pass


def _mkdtemp():
    """tempfile.mkdtemp(prefix="zviz-run-") without importing tempfile."""
    for base in (os.environ.get("TMPDIR"), os.environ.get("TEMP"), os.environ.get("TMP"), "/tmp", "/var/tmp",
                 "/usr/tmp"):
        if not base:
            continue
        for _ in range(8):
            path = os.path.join(os.path.abspath(base), "zviz-run-" + os.urandom(6).hex())
            try:
                os.mkdir(path, 0o700)
                return path
            except FileExistsError:
                continue
            except OSError:
                break
    return None


def _reap(pids):
    """Reap those of `pids` that died; their process group is killed first."""
    for pid in list(pids):
        try:
            info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            pids.remove(pid)
            continue
        if info is None:
            continue
        try:
            os.killpg(pid, _signal.SIGKILL)
        except OSError:
            pass
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass
        pids.remove(pid)


def context_main(ns, once):
    send({"t": "hello", "v": VERSION, "python": sys.version.split()[0], "errors": {}})
    while True:
        try:
            req, fds = recv()
        except (EOFError, OSError):
            os._exit(0)
        _reap(S.twins)
        kind = req.get("t")
        if kind == "exec":
            do_exec(req, fds, ns, once)
            if once:
                os._exit(0)
        elif kind == "set":
            ns.update(req["vars"])
            send({"t": "ack", "seq": req["seq"], "error": None})
        elif kind == "get":
            name = req["name"]
            if name not in ns:
                send({"t": "value", "seq": req["seq"], "value": None, "error": f"NameError: {name!r} is not defined"})
                continue
            try:
                import json

                json.dumps(ns[name], allow_nan=False)
            except (TypeError, ValueError, RecursionError) as e:
                send({"t": "value", "seq": req["seq"], "value": None,
                      "error": f"{name!r} is a {type(ns[name]).__name__}, not a JSON value ({e})"})
                continue
            send({"t": "value", "seq": req["seq"], "value": ns[name], "error": None})
        elif kind == "fork" and len(fds) == 1:
            try:
                pid = _fork(fds[0])
            except OSError as e:  # only a failure is answered here; success is the twin's hello
                send({"t": "ack", "seq": req["seq"], "error": f"fork: {e}"})
                os.close(fds[0])  # after the answer: the host reads it before this EOF
                continue
            if pid:
                S.twins.append(pid)
            else:
                send({"t": "hello", "v": VERSION, "python": sys.version.split()[0], "errors": {}})
        else:
            for fd in fds:
                os.close(fd)
            send({"t": "ack", "seq": req.get("seq", -1), "error": "unknown request"})


def _fork(ctrl_fd):
    """Fork; the child takes ctrl_fd as its channel and a session of its own
    (the host kills its process group), the parent closes it."""
    pid = os.fork()
    if pid == 0:
        os.setsid()
        old = S.ctrl
        S.ctrl = _socket.socket(fileno=_high(ctrl_fd))
        if old is not None:
            os.close(old.detach())  # the parent's channel is not the twin's to write to
        S.twins = []
        S.rbuf, S.rfds = bytearray(), []
        return 0
    os.close(ctrl_fd)
    return pid


def _high(fd):
    new = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, CTRL_FD_MIN)
    os.close(fd)
    return new


def new_namespace():
    main = type(sys)("__main__")
    main.__dict__["__builtins__"] = builtins
    main.__dict__["display"] = display
    sys.modules["__main__"] = main
    return main.__dict__


# ---------------------------------------------------------------- template


def _preload(preload):
    """Import the preload list: {module: error} of those that failed."""
    errors = {}
    for name in preload:
        try:
            __import__(name)
        except BaseException as e:  # noqa: BLE001 - reported to the host, which raises
            errors[name] = f"{type(e).__name__}: {e}"
    if "matplotlib" in sys.modules or "matplotlib.pyplot" in sys.modules:
        try:
            sys.modules["matplotlib"].use("Agg")
        except Exception:  # noqa: BLE001
            pass
    return errors


def _exit_when_read(status):
    """Exit once the host hung up: it learns who sent the hello from the
    kernel, which it cannot while that hello's sender is already gone."""
    try:
        while True:
            recv()
    except (EOFError, OSError):
        pass
    os._exit(status)


def once_main(preload):
    """This interpreter runs one cell (the host's "exec") and exits: the
    context a template would have forked, without the template."""
    errors = _preload(preload)
    if errors:
        send({"t": "hello", "v": VERSION, "python": sys.version.split()[0], "errors": errors})
        _exit_when_read(3)
    try:
        os.setsid()  # the host kills the process group (its id is our pid)
    except OSError:  # EPERM: already a group leader
        pass
    S.workdir = _mkdtemp()
    if S.workdir is not None:
        os.chdir(S.workdir)
    _signal.signal(_signal.SIGINT, _on_sigint)
    context_main(new_namespace(), True)
    os._exit(0)


def template_main(preload):
    for name in TEMPLATE_MODULES:
        __import__(name)
    import select
    import shutil
    import signal
    import tempfile

    errors = _preload(preload)
    send({"t": "hello", "v": VERSION, "python": sys.version.split()[0], "errors": errors})
    if errors:
        _exit_when_read(3)
    # What the preload made is shared by every fork: out of the collector's
    # reach, a child's first collection does not write (copy) those pages.
    import gc

    gc.collect()
    gc.freeze()
    kids = []
    dirs = {}
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda s, f: None)
    while True:
        ready, _, _ = select.select([S.ctrl, wake_r], [], [])
        if wake_r in ready:
            try:
                os.read(wake_r, 4096)
            except BlockingIOError:
                pass
            _reap(kids)
            for pid in [p for p in dirs if p not in kids]:
                shutil.rmtree(dirs.pop(pid), ignore_errors=True)
        if S.ctrl not in ready:
            continue
        try:
            req, fds = recv()
        except (EOFError, OSError):
            os._exit(0)
        if req.get("t") != "spawn" or len(fds) != 1:
            for fd in fds:
                os.close(fd)
            send({"t": "ack", "seq": req.get("seq", -1), "error": "bad spawn request"})
            continue
        _reap(kids)  # a child killed just now must not count against the process limit
        once = bool(req.get("once"))
        workdir = tempfile.mkdtemp(prefix="zviz-run-") if once else None
        try:
            pid = _fork(fds[0])
        except OSError as e:
            if workdir:
                shutil.rmtree(workdir, ignore_errors=True)
            send({"t": "ack", "seq": req["seq"], "error": f"fork: {e}"})
            continue
        if pid == 0:
            signal.set_wakeup_fd(-1)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            os.close(wake_r)
            os.close(wake_w)
            if workdir:
                os.chdir(workdir)
            signal.signal(signal.SIGINT, _on_sigint)
            context_main(new_namespace(), once)
            os._exit(0)
        kids.append(pid)
        if workdir:
            dirs[pid] = workdir
        send({"t": "ack", "seq": req["seq"], "error": None})


def main():
    # The control socket leaves fd 0 (a cell's stdin reads get EOF) for a
    # close-on-exec fd that a cell's subprocesses do not inherit.
    ctrl = _high(os.dup(0))
    S.devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    for fd in (0, 1, 2):
        os.dup2(S.devnull, fd)
    S.ctrl = _socket.socket(fileno=ctrl)
    S.ctrl.setblocking(True)
    sys.stdin = open(os.devnull)  # noqa: SIM115 - lives as long as the process
    sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), encoding="utf-8",
                                  errors="backslashreplace", line_buffering=True)
    sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), encoding="utf-8",
                                  errors="backslashreplace", line_buffering=True)
    _signal.signal(_signal.SIGINT, _signal.SIG_IGN)
    preload = _loads(sys.argv[2].encode()) if len(sys.argv) > 2 else []
    role = sys.argv[1] if len(sys.argv) > 1 else "template"
    del sys.argv[1:]  # a cell sees what `python -c` shows: ['-c']
    if role == "once":
        once_main(preload)
    template_main(preload)


if __name__ == "__main__":
    main()
