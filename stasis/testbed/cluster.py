"""Several stasis hosts on one machine: a controller plus agents, each agent in its own mount
namespace with its own podman store (fresh folders bind-mounted over podman's and runc's state).

Used by the end-to-end tests, the demo and the benchmarks. Everything started here is stopped by
`stop()`, by process id.
"""

from __future__ import annotations

import calendar
import json
import os
import shutil
import signal
import subprocess
import sys
import time

from stasis.security.pki import Authority
from stasis.testbed.images import rootfs_tar
from stasis.testbed.ports import free_port, wait_port

# Where podman, conmon and runc keep per-host state; each host gets its own copy of each. /dev/shm
# holds podman's lock table (libpod_lock): shared, a podman hung on one host could hold a lock
# another host's container was given.
HOST_STATE = {"/var/lib/containers": "lib", "/run/containers": "run", "/run/libpod": "libpod",
              "/run/runc": "runc", "/dev/shm": "shm"}


def stasis_argv() -> list[str]:
    exe = os.path.join(os.path.dirname(sys.executable), "stasis")
    return [exe] if os.path.exists(exe) else [sys.executable, "-m", "stasis.controller.cli"]


class Host:
    def __init__(self, name: str, root: str, port: int):
        self.name = name
        self.root = root
        self.port = port
        self.proc: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def nsenter(self) -> list[str]:
        assert self.proc is not None, f"host {self.name} is not running"
        return ["nsenter", f"--mount=/proc/{self.proc.pid}/ns/mnt", "--"]

    def podman(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        """Run podman inside this host's mount namespace (its own container store)."""
        return subprocess.run([*self.nsenter(), "podman", *args], capture_output=True, text=True,
                              check=check, timeout=timeout)

    def exec(self, container: str, *argv: str) -> str:
        return self.podman("exec", container, *argv).stdout

    def status(self, container: str) -> dict[str, str]:
        """The memhold workload's status line as a dict."""
        line = self.exec(container, "cat", "/tmp/status").strip()
        return dict(item.split("=", 1) for item in line.split())

    def verify_memory(self, container: str, timeout: float = 60) -> dict[str, str]:
        """Ask memhold to re-check its whole memory; return the status after the check."""
        before = int(self.status(container)["verifications"])
        self.podman("kill", "--signal", "USR1", container)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            st = self.status(container)
            if int(st["verifications"]) > before:
                return st
            time.sleep(0.1)
        raise TimeoutError(f"memhold in {container} on {self.name} did not verify its memory")

    def mutate_memory(self, container: str, timeout: float = 60) -> None:
        """Ask memhold to rewrite 5% of its pages (what changes between two backups)."""
        before = int(self.status(container).get("mutations", 0))
        self.podman("kill", "--signal", "USR2", container)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if int(self.status(container).get("mutations", 0)) > before:
                return
            time.sleep(0.1)
        raise TimeoutError(f"memhold in {container} on {self.name} did not rewrite its pages")

    def import_image(self, ref: str, with_workload: bool = True, label: str = "") -> str:
        args = ["import", "--quiet"]
        if label:
            args += ["--change", f"LABEL stasis.test={label}"]
        return self.podman(*args, rootfs_tar(with_workload), ref).stdout.strip()

    def run_workload(self, name: str, mib: int, image: str = "localhost/stasis-memhold:1",
                     compressible_percent: int = 0, labels: dict[str, str] | None = None) -> None:
        label_args = [a for k, v in (labels or {}).items() for a in ("--label", f"{k}={v}")]
        self.podman("run", "-d", "--network", "none", "--name", name, *label_args, image, "/bin/memhold",
                    str(mib), str(compressible_percent))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if int(self.status(name)["counter"]) > 0:
                    return
            except (subprocess.CalledProcessError, KeyError, ValueError):
                pass
            time.sleep(0.1)
        raise TimeoutError(f"workload {name} on {self.name} did not start")

    def containers(self) -> list[dict]:
        return json.loads(self.podman("ps", "-a", "--format", "json").stdout or "[]") or []


class DockerHost(Host):
    """A host whose engine is its own dockerd (own data root, exec root, socket; no bridge)."""

    runtime = "docker"

    def __init__(self, name: str, root: str, port: int, experimental: bool = True):
        super().__init__(name, root, port)
        self.experimental = experimental
        self.dockerd: subprocess.Popen | None = None

    @property
    def socket(self) -> str:
        return f"unix://{self.root}/docker.sock"

    def podman(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        """The same calls as on a podman host, answered by this host's dockerd."""
        return subprocess.run(["docker", "-H", self.socket, *args], capture_output=True, text=True,
                              check=check, timeout=timeout)

    def containers(self) -> list[dict]:
        out = self.podman("ps", "-a", "--format", "{{json .}}").stdout
        items = [json.loads(line) for line in out.splitlines() if line.strip()]
        for c in items:
            c["Names"] = [c.get("Names", "")]
        return items

    def import_image(self, ref: str, with_workload: bool = True, label: str = "") -> str:
        args = ["import"]
        if label:
            args += ["--change", f"LABEL stasis.test={label}"]
        out = self.podman(*args, rootfs_tar(with_workload), ref).stdout.strip()
        return out.split(":", 1)[1] if out.startswith("sha256:") else out

    def start_dockerd(self) -> None:
        os.makedirs(self.root, exist_ok=True)
        config = os.path.join(self.root, "daemon.json")
        with open(config, "w") as f:
            f.write("{}")   # so /etc/docker/daemon.json does not apply to this daemon
        argv = ["dockerd", "--data-root", f"{self.root}/data", "--exec-root", f"{self.root}/exec",
                "--pidfile", f"{self.root}/docker.pid", "-H", self.socket, "--config-file", config,
                "--bridge=none", "--iptables=false", "--ip-masq=false"]
        if self.experimental:
            argv.append("--experimental")
        with open(os.path.join(self.root, "dockerd.log"), "ab") as log:
            self.dockerd = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.dockerd.poll() is not None:
                raise RuntimeError(f"dockerd for {self.name} exited; see {self.root}/dockerd.log")
            try:
                if self.podman("version", check=False, timeout=10).returncode == 0:
                    return
            except subprocess.TimeoutExpired:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"dockerd for {self.name} did not start; see {self.root}/dockerd.log")

    def stop_dockerd(self) -> None:
        if self.dockerd is not None and self.dockerd.poll() is None:
            ids = self.podman("ps", "-aq", check=False).stdout.split()
            if ids:
                self.podman("rm", "-f", *ids, check=False, timeout=120)
        _stop(self.dockerd, timeout=60)
        self.dockerd = None


class Cluster:
    """Mutual TLS everywhere, as in production: a CA of its own in BASE/pki issues the controller's,
    each agent's and three users' bundles (admin, operator, viewer); `cli` acts as the admin."""

    def __init__(self, base: str, repo_url: str, env: dict[str, str] | None = None, heartbeat: float = 1.0):
        self.base = base
        self.repo_url = repo_url
        os.makedirs(base, exist_ok=True)
        self.ca = Authority.init(os.path.join(base, "pki"), force=True)
        self.ca.issue("controller", "controller")
        for role in ("admin", "operator", "viewer"):
            self.ca.issue("user", role, role=role)
        # Every cluster's repository is encrypted, with a password of its own.
        self.env = {**os.environ, "STASIS_PASSWORD": f"testbed-{os.urandom(8).hex()}", **(env or {}),
                    "STASIS_TLS": self.bundle("user", "admin")}
        self.heartbeat = heartbeat
        self.controller: subprocess.Popen | None = None
        self.controller_port = 0
        self.hosts: dict[str, Host] = {}

    @property
    def controller_address(self) -> str:
        return f"127.0.0.1:{self.controller_port}"

    def _spawn(self, argv: list[str], log_name: str, env: dict[str, str]) -> subprocess.Popen:
        with open(os.path.join(self.base, f"{log_name}.log"), "ab") as log:   # the child keeps its own fd
            return subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)

    def start_controller(self) -> None:
        # A restarted controller keeps its address, so running agents find it again.
        self.controller_port = self.controller_port or free_port()
        argv = [*stasis_argv(), "controller", "serve", "--listen", self.controller_address,
                "--state", os.path.join(self.base, "controller.db"), "--repo", self.repo_url,
                "--heartbeat", str(self.heartbeat), "--tls", self.bundle("controller", "controller")]
        self.controller = self._spawn(argv, "controller", self.env)
        if not wait_port(self.controller_port, 30, self.controller):
            raise RuntimeError(f"controller did not start; see {self.base}/controller.log")

    def stop_controller(self) -> None:
        _stop(self.controller)
        self.controller = None

    def add_host(self, name: str, extra_env: dict[str, str] | None = None, runtime: str = "podman") -> Host:
        root = os.path.join(self.base, "hosts", name)
        host = self.hosts.get(name)
        if host is None:
            host = DockerHost(name, root, free_port()) if runtime == "docker" else Host(name, root, free_port())
            if isinstance(host, DockerHost):
                host.start_dockerd()
        self.hosts[name] = host
        self.start_agent(host, extra_env)
        return host

    @staticmethod
    def in_host_namespace(host: Host, argv: list[str]) -> list[str]:
        """argv run in a new mount namespace that sees `host`'s podman, conmon and runc state."""
        # unshare without --fork execs in place: argv's pid is the namespace's first process.
        mounts = []
        for target, folder in HOST_STATE.items():
            src = os.path.join(host.root, folder)
            os.makedirs(src, exist_ok=True)
            mounts.append(f"mkdir -p {target} && mount --bind {src} {target}")
        script = " && ".join(mounts) + ' && exec "$@"'
        return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "stasis-host", *argv]

    def start_agent(self, host: Host, extra_env: dict[str, str] | None = None) -> None:
        if not os.path.exists(os.path.join(self.bundle("agent", host.name), "tls.crt")):
            self.ca.issue("agent", host.name)
        serve = [*stasis_argv(), "agent", "serve", "--listen", host.address, "--host-name", host.name,
                 "--controller", self.controller_address, "--work-dir", os.path.join(host.root, "work"),
                 "--tls", self.bundle("agent", host.name)]
        if isinstance(host, DockerHost):   # its own dockerd already separates its state
            argv = [*serve, "--runtime", "docker", "--docker-host", host.socket]
        else:
            argv = self.in_host_namespace(host, [*serve, "--runtime", "podman"])
        host.proc = self._spawn(argv, f"agent-{host.name}", {**self.env, **(extra_env or {})})
        if not wait_port(host.port, 30, host.proc):
            raise RuntimeError(f"agent {host.name} did not start; see {self.base}/agent-{host.name}.log")

    def stop_agent(self, host: Host) -> None:
        _stop(host.proc)

    def wait_hosts_up(self, names: list[str], timeout: float = 30) -> None:
        """Until each host has checked in since this call began: a restarted controller calls a host
        "up" on its last check-in before the restart, which its agent may not follow for seconds."""
        since = int(time.time())   # check-ins are recorded to the second
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = self.cli("hosts", "--json", check=False)
            if out.returncode == 0:
                up = {h["name"] for h in json.loads(out.stdout) if h["state"] == "up" and
                      calendar.timegm(time.strptime(h["last_seen"], "%Y-%m-%dT%H:%M:%SZ")) > since}
                if set(names) <= up:
                    return
            time.sleep(0.2)
        raise TimeoutError(f"hosts {names} did not register with the controller")

    def bundle(self, kind: str, name: str) -> str:
        return self.ca.bundle_path(kind, name)

    def cli(self, *args: str, check: bool = True, timeout: float = 600,
            user: str = "admin") -> subprocess.CompletedProcess:
        env = {**self.env, "STASIS_TLS": self.bundle("user", user)}
        result = subprocess.run([*stasis_argv(), "--controller", self.controller_address, *args],
                                capture_output=True, text=True, env=env, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"stasis {' '.join(args)} failed ({result.returncode}): {result.stderr.strip()}")
        return result

    def cli_json(self, *args: str):
        return json.loads(self.cli(*args, "--json").stdout)

    def stop(self) -> None:
        for host in self.hosts.values():
            if isinstance(host, DockerHost):
                _stop(host.proc)
                host.proc = None
                host.stop_dockerd()
                continue
            # Containers (and their conmon) would outlive the agent: remove them first, from the
            # agent's namespace or, if the agent is already gone, from a fresh one over the same state.
            rm = ["podman", "rm", "--all", "--force", "--time", "0"]
            alive = host.proc is not None and host.proc.poll() is None
            try:
                subprocess.run([*host.nsenter(), *rm] if alive else self.in_host_namespace(host, rm),
                               capture_output=True, timeout=120)
            except subprocess.TimeoutExpired:
                pass   # stop the rest regardless
            _stop(host.proc)
            host.proc = None
        self.stop_controller()
        for host in self.hosts.values():
            shutil.rmtree(host.root, ignore_errors=True)


def _stop(proc: subprocess.Popen | None, timeout: float = 15) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
