"""Multi-host runs: joining the cluster (one process per host) before any JAX work.

Where the cluster comes from, each of its three values on its own, first match wins:
  1. the config: `config.cluster.coordinator_address`, `.num_processes`, `.process_id`;
  2. the environment: JAXUNLEARN_COORDINATOR_ADDRESS, JAXUNLEARN_NUM_PROCESSES,
     JAXUNLEARN_PROCESS_ID;
  3. with none of the three given, what `jax.distributed.initialize()` detects itself
     (Cloud TPU, SLURM, Open MPI).
Some of the three without the others is an error: outside a detected cluster
nothing fills in the rest (jax reads no JAX_NUM_PROCESSES / JAX_PROCESS_ID).

`config.cluster.timeout_seconds` (T) bounds every wait on the others:
- joining: every process must have reached process 0 within T of its start, else
  all stop with one line naming what is missing (`_rendezvous`: JAX itself would
  abort with a C++ stack dump);
- a lost peer: every process bumps a counter in the coordinator's key-value store
  and watches the others'; one that has not moved for T ends this process with one
  line (`error: multi-host: process 1 stopped responding ...`, exit status 1). The
  main thread cannot notice by itself: it may be blocked in a collective with the
  lost process, which on CPU (gloo) waits on and on. JAX's own heartbeat (2T) is
  the backstop; it, and a lost coordinator (process 0), end the process through
  JAX's abort ("the JAX distributed service detected fatal errors"), a C++ message
  with a stack dump rather than one line, but just as bounded;
- leaving: a finished process waits up to T at JAX's shutdown barrier for the others.

Once joined, and before any work or file, the processes compare their configs
(`check_same_config`): every field but the per-process ones (`LOCAL_FIELDS`) must
be equal, else every process stops with the same line naming the first field that
differs, after all have left the cluster together at JAX's shutdown barrier (so the
coordinator's exit cannot cut the others off mid-report). Processes that ran
different configs would write one mixed workdir.
"""
from __future__ import annotations

import atexit
import itertools
import json
import os
import socket
import sys
import threading
import time

import jax

ENV = {"coordinator_address": "JAXUNLEARN_COORDINATOR_ADDRESS",
       "num_processes": "JAXUNLEARN_NUM_PROCESSES",
       "process_id": "JAXUNLEARN_PROCESS_ID"}
# The config's defaults, which mean "not given here".
_UNSET = {"coordinator_address": "", "num_processes": 0, "process_id": -1}
_ALIVE = "jaxunlearn/alive/"  # + process id: that process's sign-of-life counter, or "exit"
_CONFIG = "jaxunlearn/config/"  # + call/process id: that process's config (`check_same_config`)
_calls = itertools.count()  # one key per call: a process may run several studies in a row
_leave_hooks = []  # stops this process's watchdog (`_watch_peers`) before it leaves the cluster
# Config fields (and sections: ".*") each process may set for itself: none changes a result.
LOCAL_FIELDS = ("progress", "compilation_cache", "cluster.*")


def _first_line(e: BaseException) -> str:
  return (str(e).strip().splitlines() or [type(e).__name__])[0]


def resolve(cluster, environ=os.environ) -> dict | None:
  """{coordinator_address, num_processes, process_id} from the config, else the environment.

  None when none of the three is given anywhere (jax detects the cluster); a
  one-line ValueError when only some are, or a value makes no sense.
  """
  out, where = {}, {}
  for name, env in ENV.items():
    value = cluster[name]
    if value != _UNSET[name]:
      out[name], where[name] = value, f"config.cluster.{name}"
    elif environ.get(env, "").strip():
      value = environ[env].strip()
      if name != "coordinator_address":
        try:
          value = int(value)
        except ValueError:
          raise ValueError(f"{env}={value!r}: expected an integer") from None
      out[name], where[name] = value, env
  if not out:
    return None
  missing = [n for n in ENV if n not in out]
  if missing:
    given = ", ".join(f"{where[n]}={out[n]!r}" for n in ENV if n in out)
    need = " and ".join(f"config.cluster.{n} (or {ENV[n]})" for n in missing)
    raise ValueError(f"multi-host: {given} is set, so set {need} too, or none of them to let "
                     "jax.distributed.initialize() detect the cluster (Cloud TPU, SLURM)")
  address, n, i = out["coordinator_address"], out["num_processes"], out["process_id"]
  host, _, port = address.rpartition(":")
  if not host or not port.isdigit():
    raise ValueError(f"{where['coordinator_address']}={address!r}: expected host:port of "
                     "process 0's coordinator (e.g. 10.0.0.1:1234)")
  if n < 1:
    raise ValueError(f"{where['num_processes']}={n}: expected at least 1")
  if not 0 <= i < n:
    raise ValueError(f"{where['process_id']}={i}: expected 0..{n - 1} "
                     f"({where['num_processes']}={n})")
  return out


def initialize(cluster) -> None:
  """Joins the cluster, once per process (see the module docstring); one-line errors.

  Must come before any JAX computation, as jax.distributed.initialize() itself.
  """
  if jax.distributed.is_initialized():
    return
  spec = resolve(cluster)
  timeout = int(cluster.timeout_seconds)
  if timeout < 1:
    raise ValueError(f"config.cluster.timeout_seconds={cluster.timeout_seconds}: expected >= 1")
  # The CPU backend sees other processes only through a collectives implementation;
  # gloo is jax's default, and one chosen through JAX (mpi) stays.
  if not jax.config.jax_cpu_collectives_implementation:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if spec is not None and spec["num_processes"] > 1:
    _rendezvous(**spec, timeout=timeout)
  try:
    jax.distributed.initialize(**(spec or {}), initialization_timeout=timeout,
                               heartbeat_timeout_seconds=2 * timeout,
                               shutdown_timeout_seconds=timeout)
  except Exception as e:  # ValueError, RuntimeError or JaxRuntimeError, often many lines
    if spec is None:
      raise ValueError(
          f"multi-host: no cluster given and none detected ({_first_line(e)}); set "
          "config.cluster.coordinator_address, num_processes and process_id, or "
          f"{', '.join(ENV.values())}") from e
    raise RuntimeError(
        f"multi-host: process {spec['process_id']} of {spec['num_processes']} could not join "
        f"the cluster at {spec['coordinator_address']} within {timeout} s "
        f"(config.cluster.timeout_seconds): {_first_line(e)}") from e
  _watch_peers(timeout)


def _rendezvous(coordinator_address: str, num_processes: int, process_id: int,
                timeout: int) -> None:
  """Waits (up to `timeout` s) until every process has reached process 0; one-line errors.

  jax.distributed.initialize() does not raise when a process is missing: it aborts
  the process (C++ LOG(FATAL), a stack dump). So the processes first meet on the
  coordinator's port over plain TCP: each worker sends "<id> <count>", process 0
  answers all of them at once, "ok" or the error, then frees the port for JAX.
  """
  host, port = coordinator_address.rsplit(":", 1)
  host, port = host.strip("[]"), int(port)
  deadline = time.monotonic() + timeout
  if process_id == 0:
    _gather(coordinator_address, port, num_processes, timeout, deadline)
  else:
    _reach_coordinator(coordinator_address, host, port, num_processes, process_id, timeout,
                       deadline)


def _gather(coordinator_address: str, port: int, n: int, timeout: int, deadline: float) -> None:
  """Process 0's side: waits for the n - 1 workers, then answers all of them at once."""
  with _listen(port) as server:
    waiting, error = _await_workers(server, n, deadline)
    missing = sorted(set(range(1, n)) - set(waiting))
    if error is None and missing:
      error = (f"process(es) {', '.join(map(str, missing))} of {n} did not reach process 0 "
               f"at {coordinator_address} within {timeout} s (config.cluster.timeout_seconds)")
    for conn in waiting.values():
      with conn:
        try:
          conn.sendall(b"ok\n" if error is None else f"error {error}\n".encode())
        except OSError:
          pass  # it gave up waiting; JAX's own connect will fail it
  if error is not None:
    raise RuntimeError(f"multi-host: {error}")


def _listen(port: int) -> socket.socket:
  """Process 0's server socket on the coordinator's port, IPv4 and IPv6 where it can."""
  try:
    return (socket.create_server(("", port), family=socket.AF_INET6, dualstack_ipv6=True)
            if socket.has_dualstack_ipv6() else socket.create_server(("", port)))
  except OSError as e:
    raise RuntimeError(f"multi-host: process 0 cannot listen on port {port} "
                       f"({os.strerror(e.errno)}); choose a free port in "
                       "config.cluster.coordinator_address") from None


def _await_workers(server: socket.socket, n: int, deadline: float):
  """Accepts workers until all n - 1 have come, one is wrong, or the deadline passes.

  Returns ({process id: its open connection}, the first error or None).
  """
  waiting, error = {}, None
  while len(waiting) < n - 1 and error is None and time.monotonic() < deadline:
    server.settimeout(max(deadline - time.monotonic(), 0.01))
    try:
      conn, _ = server.accept()
    except TimeoutError:
      break
    conn.settimeout(5)
    try:
      pid, count = map(int, conn.makefile().readline().split())
    except (OSError, ValueError):  # not one of ours (a port scan)
      conn.close()
      continue
    error = _arrival_error(pid, count, n, waiting)
    waiting.setdefault(pid, conn)
    if waiting[pid] is not conn:
      conn.sendall(f"error {error}\n".encode())
      conn.close()
  return waiting, error


def _arrival_error(pid: int, count: int, n: int, waiting: dict) -> str | None:
  """What is wrong with worker `pid` arriving with num_processes=`count`; None if nothing."""
  if count != n:
    return f"process {pid} has num_processes={count}, process 0 has {n}"
  if pid in waiting:
    return f"two processes have process_id={pid}"
  if not 0 < pid < n:
    return f"process_id={pid} is out of range 1..{n - 1}"
  return None


def _reach_coordinator(coordinator_address: str, host: str, port: int, n: int, process_id: int,
                       timeout: int, deadline: float) -> None:
  """A worker's side: sends "<id> <count>" to process 0, retrying until its answer or the
  deadline."""
  last = "no answer"
  while time.monotonic() < deadline:
    try:
      left = max(deadline - time.monotonic(), 0.01)
      with socket.create_connection((host, port), timeout=left) as conn:
        conn.sendall(f"{process_id} {n}\n".encode())
        conn.settimeout(timeout + 10)  # process 0 answers once all have arrived, or at its deadline
        reply = conn.makefile().readline().strip()
      if reply == "ok":
        return
      if reply.startswith("error "):
        raise RuntimeError(f"multi-host: {reply[len('error '):]}")
    except OSError as e:
      last = e.strerror or type(e).__name__
    time.sleep(0.5)
  raise RuntimeError(f"multi-host: process {process_id} could not reach process 0 at "
                     f"{coordinator_address} within {timeout} s ({last}); start process 0 "
                     "there, or fix config.cluster.coordinator_address")


def _client():
  """(JAX's distributed client, this process's id, process count), or None with one process."""
  from jax._src import distributed as jax_distributed  # the client: no public handle
  state = getattr(jax_distributed, "global_state", None)
  client = getattr(state, "client", None)
  if client is None or state.num_processes < 2:
    return None  # one process, or a jax without this handle
  return client, state.process_id, state.num_processes


def shared_fields(config) -> dict:
  """{dotted field: value} of every config field the processes must agree on."""
  def flat(d, prefix=""):
    for k, v in d.items():
      if isinstance(v, dict):
        yield from flat(v, f"{prefix}{k}.")
      else:
        yield prefix + k, v
  local = lambda f: any(f == l or (l.endswith(".*") and f.startswith(l[:-1]))
                        for l in LOCAL_FIELDS)
  return {f: v for f, v in flat(json.loads(config.to_json())) if not local(f)}


_MISSING = object()


def first_difference(configs: list[dict]) -> str | None:
  """Where a process's `shared_fields` first differ from process 0's (in field order); None
  when all agree."""
  shown = lambda v: "(missing)" if v is _MISSING else repr(v)[:100]
  for p, c in enumerate(configs[1:], 1):
    for field in [*configs[0], *(f for f in c if f not in configs[0])]:
      mine, theirs = configs[0].get(field, _MISSING), c.get(field, _MISSING)
      if mine != theirs:
        return f"process {p} has {field}={shown(theirs)}, process 0 has {shown(mine)}"
  return None


def check_same_config(config, timeout: int) -> None:
  """Stops every process with one line when their configs differ (`LOCAL_FIELDS` aside).

  Each process posts its `shared_fields` to the coordinator's key-value store and
  reads everyone's, so all reach the same verdict. A no-op with one process.
  """
  joined = _client()
  if joined is None:
    return
  client, me, n = joined
  prefix = f"{_CONFIG}{next(_calls)}/"
  client.key_value_set(f"{prefix}{me}", json.dumps(shared_fields(config)))
  configs = []
  for p in range(n):
    try:
      configs.append(json.loads(client.blocking_key_value_get(f"{prefix}{p}", timeout * 1000)))
    except Exception as e:  # it stopped before comparing
      raise RuntimeError(f"multi-host: process {p} did not share its config within {timeout} s "
                         f"(config.cluster.timeout_seconds): {_first_line(e)}") from None
  difference = first_difference(configs)
  if difference is not None:
    # Every process reached the same verdict; all leave the cluster together before any
    # reports it. Otherwise the coordinator's exit ends the others' connection while they
    # are still reporting, and JAX aborts them with a stack dump in place of this line.
    _leave_cluster()
    raise ValueError(f"multi-host: {difference}; start every process with the same config "
                     f"(only {', '.join(LOCAL_FIELDS[:-1])} and {LOCAL_FIELDS[-1]} may differ)")


def _leave_cluster() -> None:
  """Stops the watchdog, then leaves the cluster at JAX's shutdown barrier (every process
  waits there for the others, up to config.cluster.timeout_seconds)."""
  while _leave_hooks:
    leave = _leave_hooks.pop()
    atexit.unregister(leave)
    leave()
  try:
    jax.distributed.shutdown()
  except Exception:  # a process already gone: it gives its own line, as this one will
    pass


def _watch_peers(timeout: int) -> None:
  """Starts the watchdog thread (see the module docstring) and its stop at exit."""
  joined = _client()
  if joined is None:
    return  # one process, or a jax without this handle: JAX's heartbeat alone
  client, me, n = joined
  stop = threading.Event()
  interval = max(timeout / 10, 0.5)

  def watch():
    changed = {}  # process -> (its counter as last read, when that changed)
    while not stop.wait(interval):
      try:
        client.key_value_increment(f"{_ALIVE}{me}", 1)
        values = dict(client.key_value_dir_get(_ALIVE))
      except Exception as e:
        if stop.is_set():
          return
        _exit(f"lost the coordinator (process 0): {_first_line(e)}")
      now = time.monotonic()
      for p in range(n):
        value = values.get(f"{_ALIVE}{p}")
        if value == "exit":  # it is leaving (done or failed): JAX's shutdown barrier takes over
          continue
        if p not in changed or changed[p][0] != value:
          changed[p] = (value, now)
        elif now - changed[p][1] > timeout:
          _exit(f"process {p} stopped responding (no sign of life for {timeout} s, "
                "config.cluster.timeout_seconds)")

  thread = threading.Thread(target=watch, name="jaxunlearn-peer-watchdog", daemon=True)
  thread.start()

  def leave():  # runs before JAX's own exit handler (atexit: last registered, first run)
    stop.set()
    thread.join(timeout=interval + 5)
    try:
      client.key_value_set(f"{_ALIVE}{me}", "exit", allow_overwrite=True)
    except Exception:  # the coordinator is gone: nothing left to tell
      pass

  atexit.register(leave)
  _leave_hooks.append(leave)


def _exit(message: str) -> None:
  """Ends the process from the watchdog thread: the main one may never return from a collective."""
  sys.stdout.flush()
  sys.stderr.write(f"error: multi-host: {message}; stopping this process too\n")
  sys.stderr.flush()
  os._exit(1)
